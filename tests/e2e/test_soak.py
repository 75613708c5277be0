"""The short soak (CI): every fault kind while volumes migrate; every invariant must hold."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@pytest.mark.skipif(os.geteuid() != 0, reason="the soak needs root (loop devices and mounts)")
async def test_short_soak_with_every_fault_kind_passes_every_invariant(tmp_path: object) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dev.soak", "--duration", "75s", "--seed", "1", "--volumes", "6",
        "--workers", "3", "--fault-interval", "5", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=400)
    text = output.decode(errors="replace")
    print(text[-3000:])
    assert proc.returncode == 0, text[-6000:]
    assert "soak PASSED" in text
