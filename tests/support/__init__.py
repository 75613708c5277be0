"""Test support shared by integration and e2e tests: real brokers (brokers.py), polling waits (wait.py) and
services run as separate processes (dev/process.py). Nothing here is imported by the project."""
