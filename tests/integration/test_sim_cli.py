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


async def _started_and_url(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    """The start-up line (what was loaded, how fast) and the URL of the listening line after it."""
    assert proc.stdout is not None
    started = (await asyncio.wait_for(proc.stdout.readline(), 10.0)).decode().strip()
    assert started.startswith("xo-sim started in ")
    line = (await asyncio.wait_for(proc.stdout.readline(), 2.0)).decode().strip()
    assert line.startswith("xo-sim listening on ws://127.0.0.1:") and line.endswith("/api/")
    return started, line.rsplit(" ", 1)[1]


async def test_cli_prints_its_url_quickly_and_serves_json_rpc() -> None:
    proc = await _spawn("--topology", "shared-pool", "--listen", "127.0.0.1:0", "--log-level", "debug",
                        "--fault", '{"method": "vdi.delete", "xapi": "VDI_IN_USE"}')
    try:
        started, url = await _started_and_url(proc)
        assert started.endswith(" s: 14 objects (1 pool, 2 host, 2 VM-controller, 1 SR, 2 VM, 2 VDI, 2 VBD)")
        rpc = await RpcClient.open(url)
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
        _, url = await _started_and_url(proc)
        rpc = await RpcClient.open(url)
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


async def test_cli_generates_an_xo_of_the_size_asked_for() -> None:
    proc = await _spawn("--topology", "generated:pools=2,hosts=4,vms=40,vdis=200,seed=3", "--listen", "127.0.0.1:0")
    try:
        started, url = await _started_and_url(proc)
        # same seed, same XO
        assert started.endswith(" s: 436 objects (2 pool, 4 host, 4 VM-controller, 6 SR, 40 VM, 200 VDI, 172 VBD)")
        rpc = await RpcClient.open(url)
        await rpc.sign_in()
        nodes = await rpc.objects(type="VM", power_state="Running", name_label="node-1-01")
        assert [vm["name_label"] for vm in nodes.values()] == ["node-1-01"]
        await rpc.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
