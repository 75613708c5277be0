"""XO simulator migrations: copy of detached VDIs, live migration, busy and cap errors, callers going away."""

from __future__ import annotations

import asyncio

import pytest

from services.xo_simulator.topology import derived_id
from tests.support.sim import (
    SR_LOCAL_A1,
    SR_LOCAL_A2,
    SR_NFS_A,
    VM_A1,
    GiB,
    MiB,
    RpcClient,
    RpcError,
    client,
    eventually,
    items_of,
    running,
)

pytestmark = pytest.mark.integration
SLOW = {"migration_rate_bps": 512 * MiB}  # a 256 MiB copy takes 0.5 s


async def _detached_disk(rpc: RpcClient, name: str = "pv-m", size: int = 256 * MiB) -> tuple[str, str]:
    vdi_id = await rpc.call("disk.create", {"name": name, "size": size, "sr": SR_LOCAL_A1, "vm": VM_A1})
    vbd_id = (await rpc.objects(type="VBD", VDI=vdi_id)).popitem()[0]
    await rpc.call("vbd.disconnect", {"id": vbd_id})
    return vdi_id, vbd_id


async def test_detached_migration_copies_under_a_new_uuid() -> None:
    async with running(**SLOW) as sim, client(sim) as rpc, client(sim) as observer:
        vdi_id, old_vbd = await _detached_disk(rpc)
        migration = asyncio.create_task(rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2}))
        entered = await observer.wait_notification(lambda n: any(
            o["type"] == "VDI" and o["name_label"] == "pv-m" and o["id"] != vdi_id
            for o in items_of(n, "enter").values()))
        copy_id = next(i for i, o in items_of(entered, "enter").items() if o["type"] == "VDI" and i != vdi_id)
        both = await observer.objects(type="VDI", name_label="pv-m")
        assert set(both) == {vdi_id, copy_id}
        assert both[copy_id]["$SR"] == SR_LOCAL_A2
        assert list(both[vdi_id]["current_operations"].values()) == ["copy"]
        assert sim.state.get(SR_LOCAL_A2)["usage"] == 256 * MiB  # the in-progress target counts
        for method, params in [("vdi.migrate", {"id": vdi_id, "sr_id": SR_NFS_A}), ("vdi.delete", {"id": vdi_id}),
                               ("vdi.set", {"id": vdi_id, "size": GiB})]:
            with pytest.raises(RpcError) as info:
                await observer.call(method, params)
            assert info.value.xapi_code == "OTHER_OPERATION_IN_PROGRESS", method
            assert info.value.data["params"] == ["VDI", both[vdi_id]["_xapiRef"]]
        assert await migration == copy_id
        assert vdi_id not in sim.state and old_vbd not in sim.state
        new_vbds = await rpc.objects(type="VBD", VDI=copy_id)
        assert [(v["VM"], v["attached"], v["position"]) for v in new_vbds.values()] == [(VM_A1, False, "1")]
        assert sim.state.get(copy_id)["current_operations"] == {}
        assert sim.state.get(SR_LOCAL_A1)["usage"] == 0
        await observer.wait_notification(lambda n: vdi_id in items_of(n, "exit"))


async def test_migration_to_the_same_sr_is_a_no_op() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "x", "size": MiB, "sr": SR_LOCAL_A1})
        assert await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A1}) == vdi_id


async def test_cap_on_concurrent_storage_migrations() -> None:
    async with running(max_storage_migrations=1, **SLOW) as sim, client(sim) as rpc:
        first, _ = await _detached_disk(rpc, "first")
        second = await rpc.call("disk.create", {"name": "second", "size": MiB, "sr": SR_LOCAL_A1})
        migration = asyncio.create_task(rpc.call("vdi.migrate", {"id": first, "sr_id": SR_LOCAL_A2}))
        await eventually(lambda: sim.simulator.migrator.active == 1)
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.migrate", {"id": second, "sr_id": SR_LOCAL_A2})
        assert info.value.xapi_code == "TOO_MANY_STORAGE_MIGRATES"
        assert await migration != first
        assert await rpc.call("vdi.migrate", {"id": second, "sr_id": SR_LOCAL_A2}) != second


async def test_live_migration_keeps_the_vbd_plugged() -> None:
    async with running(migration_rate_bps=0) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "live", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_before = (await rpc.objects(type="VBD", VDI=vdi_id)).popitem()[1]
        new_id = await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_NFS_A})
        assert new_id != vdi_id and vdi_id not in sim.state
        vbd_after = sim.state.get(vbd_before["id"])
        assert (vbd_after["VDI"], vbd_after["attached"], vbd_after["device"]) == (new_id, True, "xvdb")
        assert sim.state.get(new_id)["$VBDs"] == [vbd_before["id"]]
        assert sim.state.get(new_id)["$SR"] == SR_NFS_A
        changed = await rpc.wait_notification(
            lambda n: items_of(n, "enter").get(vbd_before["id"], {}).get("VDI") == new_id)
        assert changed["params"]["type"] == "enter"
        assert sim.simulator.stats.live_migrations == 1
        assert sim.simulator.stats.migrations["live"] == 1


async def test_live_migration_needs_an_sr_the_host_can_see() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "live", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2})
        assert info.value.xapi_code == "VM_REQUIRES_SR"
        assert sim.state.get(vdi_id)["current_operations"] == {}
        assert await rpc.objects(type="VDI", name_label="live") == {vdi_id: sim.state.get(vdi_id)}


async def test_cross_pool_and_full_target_are_refused() -> None:
    async with running("two-pools") as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "x", "size": 90 * GiB, "sr": SR_LOCAL_A1})
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": derived_id("sr", "Pool B", "NFS B")})
        assert info.value.xapi_code == "HANDLE_INVALID"
        await rpc.call("disk.create", {"name": "filler", "size": 20 * GiB, "sr": SR_LOCAL_A2})
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2})
        assert info.value.xapi_code == "SR_BACKEND_FAILURE_44"
        assert len(await rpc.objects(type="VDI", name_label="x")) == 1


async def test_migration_completes_when_the_caller_goes_away() -> None:
    async with running(**SLOW) as sim, client(sim) as watcher:
        caller = await RpcClient.open(sim.url)
        await caller.sign_in()
        vdi_id, _ = await _detached_disk(caller)
        pending = asyncio.create_task(caller.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2}))
        await eventually(lambda: bool(sim.state.get(vdi_id)["current_operations"]))
        await caller.close()
        with pytest.raises(ConnectionError):
            await pending
        await watcher.wait_notification(lambda n: vdi_id in items_of(n, "exit"))
        copies = await watcher.objects(type="VDI", name_label="pv-m")
        assert len(copies) == 1 and next(iter(copies.values()))["$SR"] == SR_LOCAL_A2


async def test_stop_during_migration_rolls_back_the_copy() -> None:
    async with running(migration_rate_bps=1) as sim, client(sim) as rpc:
        vdi_id, _ = await _detached_disk(rpc)
        pending = asyncio.create_task(rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2}))
        await eventually(lambda: sim.simulator.migrator.active == 1)
        await sim.stop()
        with pytest.raises((RpcError, ConnectionError)):
            await pending
        assert [v["id"] for v in sim.state.of_type("VDI")] == [vdi_id]
        assert sim.state.get(vdi_id)["current_operations"] == {}
