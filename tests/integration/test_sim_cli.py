"""The xo-sim command line: starts as a process, prints its URL within 2 s, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from tests.support.sim import RpcClient

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.xo_simulator", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_cli_prints_its_url_quickly_and_serves_json_rpc() -> None:
    proc = await _spawn("--topology", "shared-pool", "--listen", "127.0.0.1:0", "--log-level", "debug",
                        "--fault", '{"method": "vdi.delete", "xapi": "VDI_IN_USE"}')
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 2.0)).decode().strip()
        assert line.startswith("xo-sim listening on ws://127.0.0.1:") and line.endswith("/api/")
        rpc = await RpcClient.open(line.rsplit(" ", 1)[1])
        assert (await rpc.call("session.signIn", {"email": "admin@example.org", "password": "admin"}))["email"]
        srs = await rpc.objects(type="SR", tags=["k8s-shared"])
        assert [sr["name_label"] for sr in srs.values()] == ["NFS Shared"]
        await rpc.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    log = stderr.decode()
    assert "rpc_finished" in log
    assert "password" not in log and "sim-token" not in log


async def test_cli_rejects_bad_flags() -> None:
    proc = await _spawn("--fault", '{"method": "x"}')
    _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 2
    assert b"--fault" in stderr
