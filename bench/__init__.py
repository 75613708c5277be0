"""Benchmark commands (not tests): each starts what it measures and prints numbers."""
