"""XO client round-trip latency and throughput against the simulator (no injected latency).

    make bench-xo            # or: .venv/bin/python -m bench.xo_client --calls 20000 --concurrency 50

Targets (issue 2): p50 <= 1 ms per call; >= 2,000 calls/s with 50 concurrent callers on one connection.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench.report import percentiles, show
from dev import signals
from dev.stack import sim_client, simulator_process
from shared.logging import configure_logging
from shared.xo.client import XoClient

QUERY = {"type": "pool"}


async def sequential(client: XoClient, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.get_objects(QUERY, limit=1)
        samples.append(time.perf_counter() - started)
    return samples


async def concurrent(client: XoClient, calls: int, concurrency: int) -> tuple[float, list[float]]:
    samples: list[float] = []
    per_worker = calls // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            started = time.perf_counter()
            await client.get_objects(QUERY, limit=1)
            samples.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return time.perf_counter() - started, samples


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-xo-") as work:
        async with simulator_process(Path(work), "--topology", args.topology, "--log-level", "warning") as (_, url):
            await measure(args, sim_client(url))


async def measure(args: argparse.Namespace, client: XoClient) -> None:
    try:
        await sequential(client, 200)  # warm-up: connect, sign in, JIT-free but caches warm
        show(f"sequential ({args.calls} calls, 1 caller)", percentiles(await sequential(client, args.calls)))
        elapsed, samples = await concurrent(client, args.calls, args.concurrency)
        show(f"concurrent ({len(samples)} calls, {args.concurrency} callers, 1 connection)",
             {"calls_per_s": len(samples) / elapsed, **percentiles(samples)})
        print(f"connections opened: {client.session.connections_opened}")
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--topology", default="two-hosts")
    configure_logging("warning")
    sys.exit(signals.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
