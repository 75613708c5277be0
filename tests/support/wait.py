"""Polling waits for tests (the implementation lives in services/devstack/wait.py, shared with demo and soak)."""

from services.devstack.wait import eventually, wait_until

__all__ = ["eventually", "wait_until"]
