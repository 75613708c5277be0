"""A benchmark stopped by SIGTERM (`timeout`, a CI runner's time limit) or SIGHUP (a closed terminal) stops the stack
it started, as after Ctrl-C (dev/signals.py): no RabbitMQ node, Redis, simulator or service is left running to load
the machine under the next run. The demo's own test is in test_demo.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.e2e import kill_marked, processes_marked

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
async def test_a_benchmark_stopped_by_a_signal_stops_everything_it_started(sig: signal.Signals) -> None:
    marker = f"XOCSI_BENCH_RUN={uuid.uuid4().hex}"
    name, _, value = marker.partition("=")
    # redis-server writes its title over its environment, so the marker cannot find it: new ones are counted
    redis_before = _redis_servers()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.migration", "--attaches", "2", "--herd", "0", "--per-sr-limit", "0",
            "--cross-pool-size", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", name: value})
        assert proc.stdout is not None and proc.stderr is not None
        seen: list[str] = []
        async with asyncio.timeout(180):
            while not (line := (await proc.stdout.readline()).decode(errors="replace")).startswith("stack up in"):
                assert line, "".join(seen)[-4000:]  # EOF: the benchmark exited before its stack was up
                seen.append(line)
        started = processes_marked(marker)
        assert len(started) >= 8, started  # RabbitMQ, Redis, xo-sim, controller, 2 node plugins, 4 migrators

        proc.send_signal(sig)
        _, errors = await asyncio.wait_for(proc.communicate(), timeout=120)

        assert proc.returncode == 128 + signal.SIGTERM, errors.decode(errors="replace")[-4000:]
        assert f"{sig.name}: stopping everything this command started" in errors.decode(errors="replace")
        assert processes_marked(marker) == []
        assert _redis_servers() - redis_before == set()
    finally:
        kill_marked(marker)
        for pid in _redis_servers() - redis_before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _redis_servers() -> set[int]:
    """The running redis-server processes (a zombie, gone but not yet reaped by init, does not count)."""
    found = set()
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if not proc.name.isdigit() or (proc / "comm").read_text().strip() != "redis-server":
                continue
            if (proc / "stat").read_text().rpartition(")")[2].split()[0] != "Z":
                found.add(int(proc.name))
    return found
