"""XO simulator migrations: copies of detached VDIs, live migration, busy and cap errors, XO's retries, lost callers."""

from __future__ import annotations

import asyncio
import time

import pytest

from dev.wait import eventually
from services.xo_simulator.server import SimulatorHandle
from services.xo_simulator.topology import derived_id
from shared.units import GiB, MiB
from tests.support.sim import (
    SR_LOCAL_A1,
    SR_LOCAL_A2,
    SR_NFS_A,
    VM_A1,
    RpcClient,
    RpcError,
    cached,
    client,
    items_of,
    running,
    uncached,
)

pytestmark = pytest.mark.integration
SLOW = {"migration_rate_bps": 512 * MiB}  # a 256 MiB copy takes 0.5 s


async def _detached_disk(rpc: RpcClient, sim: SimulatorHandle, name: str = "pv-m",
                         size: int = 256 * MiB) -> tuple[str, str]:
    vdi_id = await rpc.call("disk.create", {"name": name, "size": size, "sr": SR_LOCAL_A1, "vm": VM_A1})
    vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
    await cached(sim, vbd_id)
    await rpc.call("vbd.disconnect", {"id": vbd_id})
    return vdi_id, vbd_id


async def test_detached_migration_copies_under_a_new_uuid_with_both_vdis_busy() -> None:
    async with running(**SLOW) as sim, client(sim) as rpc, client(sim) as observer:
        vdi_id, old_vbd = await _detached_disk(rpc, sim)
        migration = asyncio.create_task(rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2}))
        entered = await observer.wait_notification(lambda n: any(
            o["type"] == "VDI" and o["name_label"] == "pv-m" and o["id"] != vdi_id
            for o in items_of(n, "enter").values()))
        copy_id = next(i for i, o in items_of(entered, "enter").items() if o["type"] == "VDI" and i != vdi_id)
        await cached(sim, vdi_id, lambda v: bool(v["current_operations"]))
        both = await observer.objects(type="VDI", name_label="pv-m")
        assert set(both) == {vdi_id, copy_id}
        assert both[copy_id]["$SR"] == SR_LOCAL_A2
        assert list(both[vdi_id]["current_operations"].values()) == ["copy"]
        assert list(both[copy_id]["current_operations"].values()) == ["copy"]  # the target is busy too
        assert sim.state.get(SR_LOCAL_A2)["usage"] == 10 * GiB + 256 * MiB  # root disk + the in-progress target
        for method, params in [("vdi.migrate", {"id": vdi_id, "sr_id": SR_NFS_A}), ("vdi.delete", {"id": vdi_id}),
                               ("vdi.set", {"id": vdi_id, "size": GiB}), ("vdi.delete", {"id": copy_id})]:
            with pytest.raises(RpcError) as info:
                await observer.call(method, params)
            assert info.value.xapi_code == "OTHER_OPERATION_IN_PROGRESS", method
            assert info.value.data["params"][0] == "VDI"
        assert await migration == copy_id
        assert vdi_id not in sim.state and old_vbd not in sim.state
        new_vbds = [v for v in sim.state.of_type("VBD") if v["VDI"] == copy_id]
        assert [(v["VM"], v["attached"], v["position"]) for v in new_vbds] == [(VM_A1, False, "1")]
        assert sim.state.get(copy_id)["current_operations"] == {}
        assert sim.state.get(SR_LOCAL_A1)["usage"] == 10 * GiB
        await uncached(sim, vdi_id)  # the source's removal was not awaited by a barrier
        await cached(sim, new_vbds[0]["id"])
        assert (await observer.objects(type="VBD", VDI=copy_id)).keys() == {new_vbds[0]["id"]}


async def test_migration_to_the_same_sr_is_a_no_op() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "x", "size": MiB, "sr": SR_LOCAL_A1})
        assert await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A1}) == vdi_id


async def _live_disk(rpc: RpcClient, name: str, sr: str = SR_NFS_A) -> str:
    return str(await rpc.call("disk.create", {"name": name, "size": GiB, "sr": sr, "vm": VM_A1}))


async def test_live_cap_is_retried_by_xo_ten_times_before_the_caller_sees_it() -> None:
    # 1 GiB at 256 MiB/s: the first live migration holds the only slot for 4 s, longer than 10 tries 50 ms apart.
    async with running(max_storage_migrations=1, migration_rate_bps=256 * MiB, migrate_retry_ms=50) as sim, \
            client(sim) as rpc:
        first, second = await _live_disk(rpc, "first"), await _live_disk(rpc, "second")
        migration = asyncio.create_task(rpc.call("vdi.migrate", {"id": first, "sr_id": SR_LOCAL_A1}))
        await eventually(lambda: sim.simulator.migrator.active == 1, timeout_s=10)
        started = time.monotonic()
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.migrate", {"id": second, "sr_id": SR_LOCAL_A1})
        assert info.value.xapi_code == "TOO_MANY_STORAGE_MIGRATES"
        assert time.monotonic() - started >= 9 * 0.05
        assert sim.state.get(second)["current_operations"] == {}
        copy_source = await rpc.call("disk.create", {"name": "copy", "size": MiB, "sr": SR_LOCAL_A1})
        copied = await rpc.call("vdi.migrate", {"id": copy_source, "sr_id": SR_LOCAL_A2})  # VDI.copy: no cap
        assert copied != copy_source and sim.state.get(copied)["$SR"] == SR_LOCAL_A2
        await sim.stop()  # the first one is still mirroring: rolled back
        with pytest.raises((RpcError, ConnectionError)):
            await migration
        assert [v["id"] for v in sim.state.of_type("VDI") if v["name_label"] == "first"] == [first]


async def test_live_cap_freed_during_xo_retries_lets_the_migration_through() -> None:
    async with running(max_storage_migrations=1, migration_rate_bps=4 * GiB, migrate_retry_ms=100) as sim, \
            client(sim) as rpc:
        first, second = await _live_disk(rpc, "first"), await _live_disk(rpc, "second")
        migration = asyncio.create_task(rpc.call("vdi.migrate", {"id": first, "sr_id": SR_LOCAL_A1}))
        await eventually(lambda: sim.simulator.migrator.active == 1, timeout_s=10)  # holds the slot for 0.25 s
        moved = await rpc.call("vdi.migrate", {"id": second, "sr_id": SR_LOCAL_A1})
        assert sim.state.get(moved)["$SR"] == SR_LOCAL_A1
        assert sim.state.get(await migration)["$SR"] == SR_LOCAL_A1
        assert sim.simulator.stats.errors == {}


async def test_live_migration_keeps_the_vbd_plugged_and_waits_for_the_cache() -> None:
    async with running(migration_rate_bps=0) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "live", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        new_id = await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_NFS_A})
        assert new_id != vdi_id and vdi_id not in sim.state
        vbd_after = sim.state.get(vbd_id)
        assert (vbd_after["VDI"], vbd_after["attached"], vbd_after["device"]) == (new_id, True, "xvdb")
        assert sim.state.get(new_id)["$VBDs"] == [vbd_id]
        assert sim.state.get(new_id)["$SR"] == SR_NFS_A
        # XO's barrier: when vdi.migrate answers, the cache shows the whole move
        assert vdi_id not in sim.cache and sim.cache.get(vbd_id)["VDI"] == new_id
        assert sim.cache.get(new_id)["current_operations"] == {}
        assert sim.simulator.stats.live_migrations == 1
        assert sim.simulator.stats.migrations["live"] == 1


async def test_live_migration_needs_an_sr_the_host_can_see() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "live", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2})
        assert info.value.xapi_code == "VM_REQUIRES_SR"
        assert sim.state.get(vdi_id)["current_operations"] == {}
        assert [v["id"] for v in sim.state.of_type("VDI") if v["name_label"] == "live"] == [vdi_id]


async def test_cross_pool_is_code_1_and_a_full_thick_target_is_refused() -> None:
    async with running("two-pools") as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "x", "size": 90 * GiB, "sr": SR_LOCAL_A1})
        other_pool_sr = derived_id("sr", "Pool B", "NFS B")
        with pytest.raises(RpcError) as info:  # the SR does not resolve in the VDI's pool
            await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": other_pool_sr})
        assert info.value.error == {"code": 1, "message": f"no such SR {other_pool_sr}",
                                    "data": {"id": other_pool_sr, "type": "SR"}}
    topology = {"tokens": ["sim-token"], "pools": [{"name_label": "P", "hosts": [{
        "name_label": "h", "srs": [{"name_label": "ext", "size": "100GiB"},
                                   {"name_label": "lvm", "size": "100GiB", "SR_type": "lvm"}]}]}]}
    async with running(topology) as sim, client(sim) as rpc:
        thin, thick = derived_id("sr", "P", "h", "ext"), derived_id("sr", "P", "h", "lvm")
        vdi_id = await rpc.call("disk.create", {"name": "x", "size": 90 * GiB, "sr": thin})
        await rpc.call("disk.create", {"name": "filler", "size": 20 * GiB, "sr": thick})
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": thick})
        assert info.value.xapi_code == "SR_BACKEND_FAILURE_44"
        assert [v["id"] for v in sim.state.of_type("VDI") if v["name_label"] == "x"] == [vdi_id]


async def test_migration_completes_when_the_caller_goes_away() -> None:
    async with running(**SLOW) as sim, client(sim) as watcher:
        caller = await RpcClient.open(sim.url)
        await caller.sign_in()
        vdi_id, _ = await _detached_disk(caller, sim)
        pending = asyncio.create_task(caller.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2}))
        await eventually(lambda: bool(sim.state.get(vdi_id)["current_operations"]), timeout_s=10)
        await caller.close()
        with pytest.raises(ConnectionError):
            await pending
        await watcher.wait_notification(lambda n: vdi_id in items_of(n, "exit"))
        copies = await watcher.objects(type="VDI", name_label="pv-m")
        assert len(copies) == 1 and next(iter(copies.values()))["$SR"] == SR_LOCAL_A2


async def test_stop_during_migration_rolls_back_the_copy() -> None:
    async with running(migration_rate_bps=1) as sim, client(sim) as rpc:
        vdi_id, _ = await _detached_disk(rpc, sim)
        pending = asyncio.create_task(rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2}))
        await eventually(lambda: sim.simulator.migrator.active == 1, timeout_s=10)
        await sim.stop()
        with pytest.raises((RpcError, ConnectionError)):
            await pending
        assert [v["id"] for v in sim.state.of_type("VDI") if v["name_label"] == "pv-m"] == [vdi_id]
        assert sim.state.get(vdi_id)["current_operations"] == {}
