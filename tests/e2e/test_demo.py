"""`make demo` runs the seed's story end to end, then its second act across pools: `python -m dev.demo --once`
exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.e2e import processes_marked

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root (loop devices and mounts)")
async def test_demo_once_plays_the_story_and_cleans_up() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dev.demo", "--once", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=280)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "disk now on SR Local A2" in text, text[-4000:]  # act one: another host, vdi.migrate
    assert "disk now on SR NFS B (pool B)" in text, text[-4000:]  # act two: another pool, a content stream
    assert "read back on node-b1" in text and text.count("matches") == 2
    assert "matches" in text and "Timeline" in text and "Where to look" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root (loop devices and mounts)")
async def test_demo_stopped_by_sigterm_stops_everything_it_started(tmp_path: Path) -> None:
    """`timeout -s TERM ... make demo` (or a service manager's stop): RabbitMQ, Redis, the simulator, the frontends
    and the migrators it started are all gone afterwards, as after Ctrl-C. Every process of this demo carries a
    marker in its environment, so processes of other tests running meanwhile are not counted."""
    marker = f"XOCSI_DEMO_RUN={uuid.uuid4().hex}"
    name, _, value = marker.partition("=")
    proc = await asyncio.create_subprocess_exec(
        "timeout", "-s", "TERM", "600", sys.executable, "-m", "dev.demo", "--workdir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200", name: value})
    assert proc.stdout is not None
    seen: list[str] = []
    async with asyncio.timeout(240):
        while "The stack stays up" not in (line := (await proc.stdout.readline()).decode(errors="replace")):
            assert line, "".join(seen)[-4000:]  # EOF: the demo exited before its story ended
            seen.append(line)
    started = processes_marked(marker)
    assert len(started) >= 8, started  # RabbitMQ, Redis, xo-sim, controller, 3 node plugins, 2 migrators
    proc.send_signal(signal.SIGTERM)  # what `timeout` does when its time is up: it passes TERM to the demo
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output.decode(errors="replace")[-4000:]
    assert "SIGTERM: stopping everything the demo started" in output.decode(errors="replace")
    assert processes_marked(marker) == []
