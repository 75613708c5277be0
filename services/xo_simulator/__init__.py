"""XO simulator: a server speaking Xen Orchestra's JSON-RPC over WebSocket (``/api/``), for tests, demos, benchmarks.

Entry points: ``xo-sim`` (__main__.py) and ``server.start_simulator()``. See README.md for the deviations from XO.
"""
