"""The xo-sim command line: starts as a process, prints its URL within 2 s, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from services.xo_simulator.topology import derived_id
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


@pytest.mark.parametrize(("flag", "value"), [("--fault", '{"method": "x"}'), ("--cache-lag-ms", "150-20"),
                                            ("--noise-events-per-s", "-1"), ("--migrate-retry-ms", "soon")])
async def test_cli_rejects_bad_flags(flag: str, value: str) -> None:
    proc = await _spawn(flag, value)
    _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 2
    assert flag.encode() in stderr


async def test_cli_starts_with_a_lost_pool_and_softened_knobs() -> None:
    pool = derived_id("pool", "Shared Pool")
    fault = json.dumps({"kind": "pool_disconnect", "pool": pool, "duration_s": 60})
    proc = await _spawn("--topology", "shared-pool", "--listen", "127.0.0.1:0", "--fault", fault,
                        "--cache-lag-ms", "0", "--noise-events-per-s", "0")
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 2.0)).decode().strip()
        rpc = await RpcClient.open(line.rsplit(" ", 1)[1])
        await rpc.sign_in()
        assert await rpc.call("xo.getAllObjects") == {}  # the only pool is lost: XO shows nothing
        await rpc.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0


async def test_cli_help_lists_the_harsh_defaults_and_their_knobs() -> None:
    proc = await _spawn("--help")
    stdout, _ = await asyncio.wait_for(proc.communicate(), 10)
    text = " ".join(stdout.decode().split())
    for expected in ("--cache-lag-ms LOW-HIGH", "(default 20-150); 0 = instant", "--noise-events-per-s N",
                     "(default 20); 0 = off", "--migrate-retry-ms MS", "--destroy-retry-ms MS", "pool_disconnect"):
        assert expected in text
