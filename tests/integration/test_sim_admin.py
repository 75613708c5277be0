"""XO simulator admin API and fault injection: state, stats, faults, reset, dropped sockets, expired sessions."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from shared.units import GiB
from tests.support.sim import (
    ROOT_A1,
    ROOT_A2,
    SR_LOCAL_A1,
    SR_LOCAL_A2,
    VM_A1,
    RpcClient,
    RpcError,
    cached,
    client,
    running,
)

pytestmark = pytest.mark.integration


async def test_admin_api_is_off_by_default() -> None:
    async with running() as sim, aiohttp.ClientSession() as http:
        for path in ("/_sim/state", "/_sim/stats"):
            async with http.get(f"{sim.http_url}{path}") as response:
                assert response.status == 404
        async with http.post(f"{sim.http_url}/_sim/reset") as response:
            assert response.status == 404


async def test_state_cache_stats_and_reset() -> None:
    async with running(admin=True, migration_rate_bps=0, cache_lag_ms="300-300") as sim, client(sim) as rpc, \
            aiohttp.ClientSession() as http:
        vdi_id = await rpc.call("disk.create", {"name": "pv-s", "size": 1024, "sr": SR_LOCAL_A1})
        new_id = await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2})  # a copy: source removal lags
        async with http.get(f"{sim.http_url}/_sim/state") as response:
            state = await response.json()
        assert state[new_id]["name_label"] == "pv-s" and vdi_id not in state
        async with http.get(f"{sim.http_url}/_sim/cache") as response:
            cache = await response.json()
        assert cache[new_id]["name_label"] == "pv-s" and vdi_id in cache  # XO still shows the source
        async with http.get(f"{sim.http_url}/_sim/stats") as response:
            stats = await response.json()
        assert stats["calls"] == {"session.signIn": 1, "disk.create": 1, "vdi.migrate": 1}
        assert stats["migrations"] == {"pv-s": 1}
        assert stats["active_migrations"] == 0 and stats["open_connections"] == 1
        assert (stats["cache_lag_ms"], stats["disconnected_pools"]) == ("300", [])
        assert stats["cache_pending"] > 0 and stats["noise_events"] >= 0
        async with http.post(f"{sim.http_url}/_sim/reset") as response:
            assert (await response.json())["topology"] is False
        assert sim.simulator.stats.calls == {} and new_id in sim.state
        async with http.post(f"{sim.http_url}/_sim/reset", json={"topology": True}) as response:
            assert response.status == 200
        assert new_id not in sim.state and sim.state.get(SR_LOCAL_A2)["usage"] == 10 * GiB  # the root disk
        assert new_id not in sim.cache and vdi_id not in sim.cache  # a reset brings the cache up to date at once
        # same socket still works after a reload
        assert set(await rpc.objects(type="VDI")) == {ROOT_A1, ROOT_A2}


async def test_injected_errors_with_count_and_clear() -> None:
    async with running(admin=True) as sim, client(sim) as rpc, aiohttp.ClientSession() as http:
        rules = [{"method": "disk.create", "xapi": "SR_BACKEND_FAILURE_46", "xapi_params": ["", "busy", ""],
                  "count": 1},
                 {"method": "vdi.set", "error": {"code": 21, "message": "operation failed", "data": {"x": 1}}}]
        async with http.post(f"{sim.http_url}/_sim/faults", json=rules) as response:
            assert len((await response.json())["rules"]) == 2
        params = {"name": "x", "size": 1, "sr": SR_LOCAL_A1}
        with pytest.raises(RpcError) as info:
            await rpc.call("disk.create", params)
        assert info.value.error["message"] == "SR_BACKEND_FAILURE_46(, busy, )"
        vdi_id = await rpc.call("disk.create", params)  # count exhausted
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.set", {"id": vdi_id, "name_label": "y"})
        assert info.value.error == {"code": 21, "message": "operation failed", "data": {"x": 1}}
        async with http.delete(f"{sim.http_url}/_sim/faults") as response:
            assert (await response.json())["rules"] == []
        assert await rpc.call("vdi.set", {"id": vdi_id, "name_label": "y"}) is True
        async with http.post(f"{sim.http_url}/_sim/faults", json={"method": "x"}) as response:
            assert response.status == 400


async def test_drop_socket_closes_without_answer_and_the_server_keeps_serving() -> None:
    faults = [{"kind": "drop_socket", "method": "vbd.connect", "count": 1}]
    async with running(faults=faults) as sim:
        rpc = await RpcClient.open(sim.url)
        await rpc.sign_in()
        vdi_id = await rpc.call("disk.create", {"name": "d", "size": 1, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        await cached(sim, vbd_id)
        await rpc.call("vbd.disconnect", {"id": vbd_id})
        with pytest.raises(ConnectionError):
            await rpc.call("vbd.connect", {"id": vbd_id})
        await rpc.closed.wait()
        assert rpc.ws.close_code in (None, 1006)  # no close frame: an abrupt drop
        await rpc.close()
        assert sim.state.get(vbd_id)["attached"] is False  # the call never ran
        async with client(sim) as again:
            assert await again.call("vbd.connect", {"id": vbd_id}) is True
        assert sim.simulator.stats.dropped_sockets == 1


async def test_expire_sessions_closes_signed_in_sockets_without_error() -> None:
    async with running(admin=True) as sim, aiohttp.ClientSession() as http:
        signed_in = await RpcClient.open(sim.url)
        await signed_in.sign_in()
        anonymous = await RpcClient.open(sim.url)
        async with http.post(f"{sim.http_url}/_sim/faults", json={"kind": "expire_sessions"}) as response:
            assert response.status == 200
        await signed_in.closed.wait()
        assert signed_in.ws.close_code == 1000
        assert await anonymous.call("system.getServerVersion")
        await signed_in.close()
        await anonymous.close()


async def test_latency_is_added_per_method() -> None:
    async with running(latency="vdi.set=80,*=0") as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "l", "size": 1, "sr": SR_LOCAL_A1})
        started = time.perf_counter()
        await rpc.call("vdi.set", {"id": vdi_id, "name_label": "m"})
        assert time.perf_counter() - started >= 0.08


async def test_many_concurrent_calls_on_one_socket() -> None:
    async with running() as sim, client(sim) as rpc:
        results = await asyncio.gather(*(rpc.call("xo.getAllObjects", {"filter": {"type": "SR"}})
                                         for _ in range(200)))
        assert [len(r) for r in results] == [3] * 200


async def test_latency_can_be_changed_at_run_time() -> None:
    from services.xo_simulator.server import start_simulator

    async with await start_simulator("two-hosts", admin=True) as handle:
        import httpx

        async with httpx.AsyncClient(base_url=handle.http_url) as http:
            response = await http.put("/_sim/latency", json={"spec": "xo.getAllObjects=25"})
            assert response.status_code == 200
            assert handle.simulator.faults.latency.for_method_s("xo.getAllObjects") == 0.025
            assert (await http.put("/_sim/latency", json={"spec": "nonsense=x"})).status_code == 400
            assert (await http.put("/_sim/latency", json={"spec": ""})).status_code == 200
            assert handle.simulator.faults.latency.for_method_s("xo.getAllObjects") == 0
