"""Shared pieces of the benchmarks: start the simulator as a separate process, percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import sys
from collections.abc import AsyncIterator, Sequence

URL_RE = re.compile(rb"xo-sim listening on (ws://\S+)")


@contextlib.asynccontextmanager
async def simulator(*args: str, timeout_s: float = 20.0) -> AsyncIterator[str]:
    """Run ``xo-sim`` (no injected latency unless asked) and yield its ws:// URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.xo_simulator", "--listen", "127.0.0.1:0", "--log-level", "warning", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError("xo-sim exited before it was ready")
                if match := URL_RE.search(line):
                    break
        yield match.group(1).decode()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds."""
    ordered = sorted(samples_s)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000, "p99_ms": q[98] * 1000, "max_ms": ordered[-1] * 1000}


def show(title: str, values: dict[str, float]) -> None:
    print(f"{title}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
