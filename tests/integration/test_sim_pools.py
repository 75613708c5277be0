"""XO losing a pool (pool_disconnect fault): its objects leave the cache at once and come back; XAPI keeps running."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from dev.wait import eventually
from services.xo_simulator.topology import derived_id
from shared.units import MiB
from tests.support.sim import RpcError, client, items_of, running

pytestmark = pytest.mark.integration
POOL_A, POOL_B = derived_id("pool", "Pool A"), derived_id("pool", "Pool B")
NFS_A, NFS_B = derived_id("sr", "Pool A", "NFS A"), derived_id("sr", "Pool B", "NFS B")
LOCAL_A1 = derived_id("sr", "Pool A", "host-a1", "Local A1")
QUIET = {"noise_events_per_s": 0}


def _pool_ids(objects: dict[str, Any], pool_id: str) -> set[str]:
    return {obj_id for obj_id, obj in objects.items() if obj["$pool"] == pool_id}


async def _fault(http: aiohttp.ClientSession, url: str, rule: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"{url}/_sim/faults", json=rule) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def test_a_lost_pool_leaves_the_cache_in_one_exit_and_comes_back_in_one_enter() -> None:
    async with running("two-pools", admin=True, **QUIET) as sim, client(sim) as rpc, aiohttp.ClientSession() as http:
        vdi_a = await rpc.call("disk.create", {"name": "a", "size": MiB, "sr": NFS_A})
        vdi_b = await rpc.call("disk.create", {"name": "b", "size": MiB, "sr": NFS_B})
        await eventually(lambda: sim.simulator.mirror.pending == 0, timeout_s=10)
        pool_a_ids = _pool_ids(sim.cache.all(), POOL_A)
        before = await rpc.settled()
        view = await _fault(http, sim.http_url, {"kind": "pool_disconnect", "pool": POOL_A, "duration_s": 30})
        assert [d["pool"] for d in view["disconnected_pools"]] == [POOL_A]
        assert 0 < view["disconnected_pools"][0]["remaining_s"] <= 30
        exited = await rpc.wait_notification(lambda n: vdi_a in items_of(n, "exit"))
        assert rpc.notifications[before:] == [exited]  # one exit, every object of the pool, values 0
        assert items_of(exited, "exit") == dict.fromkeys(pool_a_ids, 0)
        everything = await rpc.call("xo.getAllObjects")
        assert _pool_ids(everything, POOL_A) == set() and vdi_b in everything
        with pytest.raises(RpcError) as info:  # absent, not deleted: XAPI still has it
            await rpc.call("vdi.set", {"id": vdi_a, "name_label": "x"})
        assert info.value.code == 1 and vdi_a in sim.state
        assert await rpc.call("vdi.set", {"id": vdi_b, "name_label": "b2"}) is True  # the other pool works
        back = await rpc.settled()
        async with http.delete(f"{sim.http_url}/_sim/faults") as response:
            assert (await response.json())["disconnected_pools"] == []
        entered = await rpc.wait_notification(lambda n: vdi_a in items_of(n, "enter"), since=back)
        assert set(items_of(entered, "enter")) == pool_a_ids  # one enter with every current object
        assert items_of(entered, "enter")[vdi_a] == sim.state.get(vdi_a)
        assert await rpc.call("vdi.set", {"id": vdi_a, "name_label": "a2"}) is True


async def test_the_pool_returns_by_itself_after_duration_s() -> None:
    async with running("two-pools", admin=True) as sim, client(sim) as rpc, aiohttp.ClientSession() as http:
        await _fault(http, sim.http_url, {"kind": "pool_disconnect", "pool": POOL_B, "duration_s": 0.3})
        await rpc.wait_notification(lambda n: NFS_B in items_of(n, "exit"))
        await rpc.wait_notification(lambda n: NFS_B in items_of(n, "enter"))
        assert (await rpc.objects(id=NFS_B)).keys() == {NFS_B}
        async with http.get(f"{sim.http_url}/_sim/faults") as response:
            assert (await response.json())["disconnected_pools"] == []


async def test_xapi_keeps_running_a_migration_whose_call_returns_after_the_pool_is_back() -> None:
    async with running("two-pools", admin=True, migration_rate_bps=512 * MiB, **QUIET) as sim, client(sim) as rpc, \
            aiohttp.ClientSession() as http:
        vdi_id = await rpc.call("disk.create", {"name": "moving", "size": 256 * MiB, "sr": LOCAL_A1})
        migration = asyncio.create_task(rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": NFS_A}))
        await eventually(lambda: sim.simulator.migrator.active == 1, timeout_s=10)
        await _fault(http, sim.http_url, {"kind": "pool_disconnect", "pool": POOL_A})  # until cleared
        # VDI.copy done on XAPI
        await eventually(lambda: sim.state.get(vdi_id)["current_operations"] == {}, timeout_s=10)
        copy = next(v for v in sim.state.of_type("VDI") if v["name_label"] == "moving" and v["id"] != vdi_id)
        assert (copy["$SR"], copy["current_operations"]) == (NFS_A, {})
        assert copy["id"] not in sim.cache and not migration.done()  # XO's barrier waits for the lost pool
        async with http.delete(f"{sim.http_url}/_sim/faults"):
            pass
        assert await migration == copy["id"]
        assert vdi_id not in sim.state and copy["id"] in sim.cache


async def test_a_call_resolved_before_the_pool_was_lost_gets_the_plain_no_connection_error() -> None:
    async with running("two-pools", admin=True, latency="vdi.set=300", **QUIET) as sim, client(sim) as rpc, \
            aiohttp.ClientSession() as http:
        vdi_id = await rpc.call("disk.create", {"name": "late", "size": MiB, "sr": NFS_A})
        setting = asyncio.create_task(rpc.call("vdi.set", {"id": vdi_id, "name_label": "x"}))
        # resolved, now in XO's latency
        await eventually(lambda: sim.simulator.stats.calls["vdi.set"] == 1, timeout_s=10)
        await _fault(http, sim.http_url, {"kind": "pool_disconnect", "pool": POOL_A})
        with pytest.raises(RpcError) as info:
            await setting
        message = f"no connection found for object {vdi_id}"
        assert info.value.error == {"code": -32000, "message": message, "data": {"name": "Error", "message": message}}
        assert sim.state.get(vdi_id)["name_label"] == "late"


async def test_an_unknown_pool_is_refused_with_400() -> None:
    async with running(admin=True) as sim, aiohttp.ClientSession() as http:
        for rule in ({"kind": "pool_disconnect", "pool": POOL_B}, {"kind": "pool_disconnect"},
                     {"kind": "expire_sessions", "pool": POOL_A}, {"method": "*", "xapi": "X", "duration_s": 1}):
            async with http.post(f"{sim.http_url}/_sim/faults", json=rule) as response:
                assert response.status == 400, rule
        assert sim.simulator.mirror.hidden_pools == []
