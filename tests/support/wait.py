"""Polling waits for tests (the implementation lives in dev/wait.py, shared with demo and soak)."""

from dev.wait import eventually, wait_until

__all__ = ["eventually", "wait_until"]
