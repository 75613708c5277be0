"""`make demo` runs the seed's story end to end: `python -m dev.demo --once` exits 0."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root (loop devices and mounts)")
async def test_demo_once_plays_the_story_and_cleans_up() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dev.demo", "--once", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=280)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "disk now on SR Local A2" in text, text[-4000:]
    assert "matches" in text and "Timeline" in text and "Where to look" in text
