"""XO simulator disks: disk.create, vdi.set, vdi.delete, vm.attachDisk and vbd.* under the default (harsh) simulator."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import SecretStr

from dev.wait import eventually
from services.xo_simulator.accounting import vhd_metadata_bytes
from services.xo_simulator.topology import derived_id
from shared.config import XoSettings
from shared.units import GiB, MiB
from shared.xo.client import XoClient
from tests.support.sim import (
    ROOT_A1,
    SR_LOCAL_A1,
    SR_LOCAL_A2,
    SR_NFS_A,
    VM_A1,
    RpcError,
    cached,
    client,
    items_of,
    running,
    uncached,
)

pytestmark = pytest.mark.integration
VDI_KEYS = {"name_label", "name_description", "size", "usage", "$SR", "$VBDs", "VDI_type", "snapshots", "tags",
            "parent", "image_format", "cbt_enabled", "missing", "current_operations", "other_config"}
FAST_RETRY = {"destroy_retry_ms": 10}


async def test_disk_create_waits_for_the_cache_and_thin_srs_account_virtual_and_allocated_space() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "pv-1", "size": "10GiB", "sr": SR_LOCAL_A1})
        vdi = (await rpc.objects(type="VDI", name_label="pv-1"))[vdi_id]  # shown at once: XO's barrier
        assert VDI_KEYS <= set(vdi)
        assert (vdi["size"], vdi["usage"], vdi["$SR"], vdi["VDI_type"], vdi["parent"], vdi["tags"]) == (
            10 * GiB, vhd_metadata_bytes(10 * GiB), SR_LOCAL_A1, "user", None, [])
        assert "read_only" not in vdi and "sharable" not in vdi
        sr = (await rpc.objects(id=SR_LOCAL_A1))[SR_LOCAL_A1]
        root_usage = sim.state.get(ROOT_A1)["usage"]
        assert (sr["usage"], sr["physical_usage"], sr["VDIs"]) == (  # usage = virtual allocation
            20 * GiB, root_usage + vhd_metadata_bytes(10 * GiB), [ROOT_A1, vdi_id])
        assert sr["allocationStrategy"] == "thin"
        entered = await rpc.wait_notification(lambda n: vdi_id in items_of(n, "enter"))
        assert items_of(entered, "enter")[vdi_id]["name_label"] == "pv-1"


async def test_thin_srs_overcommit_and_thick_lvm_srs_refuse_what_does_not_fit() -> None:
    topology = {"tokens": ["sim-token"], "pools": [{"name_label": "Pool A", "hosts": [{
        "name_label": "host-a1", "srs": [{"name_label": "ext", "size": "100GiB"},
                                         {"name_label": "lvm", "size": "100GiB", "SR_type": "lvm"}]}]}]}
    thin, thick = derived_id("sr", "Pool A", "host-a1", "ext"), derived_id("sr", "Pool A", "host-a1", "lvm")
    async with running(topology) as sim, client(sim) as rpc:
        for name in ("a", "b"):  # 180 GiB of virtual disks on a 100 GiB thin SR
            await rpc.call("disk.create", {"name": name, "size": "90GiB", "sr": thin})
        assert (sim.state.get(thin)["usage"], sim.state.get(thin)["physical_usage"]) == (
            180 * GiB, 2 * vhd_metadata_bytes(90 * GiB))
        big = await rpc.call("disk.create", {"name": "big", "size": "90GiB", "sr": thick})
        assert sim.state.get(big)["usage"] == 90 * GiB and sim.state.get(thick)["allocationStrategy"] == "thick"
        with pytest.raises(RpcError) as info:
            await rpc.call("disk.create", {"name": "too-big", "size": "11GiB", "sr": thick})
        assert info.value.code == -32000
        assert info.value.error["message"] == "SR_BACKEND_FAILURE_44(, There is insufficient space, )"
        assert info.value.xapi_code == "SR_BACKEND_FAILURE_44"
        assert info.value.data["params"] == ["", "There is insufficient space", ""]
        assert info.value.data["name"] == "XapiError"
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.set", {"id": big, "size": "101GiB"})
        assert info.value.xapi_code == "SR_BACKEND_FAILURE_44"
        assert await rpc.call("vdi.set", {"id": await rpc.call("disk.create", {
            "name": "c", "size": GiB, "sr": thin}), "size": "500GiB"}) is True  # thin: no virtual check
        assert [v["name_label"] for v in sim.state.of_type("VDI")] == ["a", "b", "big", "c"]
        assert (sim.state.get(thick)["usage"], sim.state.get(thick)["physical_usage"]) == (90 * GiB, 90 * GiB)


async def test_vdi_set_returns_before_the_cache_shows_it_and_refuses_to_shrink_with_data_braces() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "pv", "size": GiB, "sr": SR_LOCAL_A1})
        started = time.monotonic()
        assert await rpc.call("vdi.set", {"id": vdi_id, "name_label": "pv-renamed", "name_description": ""})
        assert await rpc.call("vdi.set", {"id": vdi_id, "size": "2GiB"}) is True
        assert (sim.state.get(vdi_id)["name_label"], sim.state.get(vdi_id)["size"]) == ("pv-renamed", 2 * GiB)
        assert sim.cache.get(vdi_id)["name_label"] == "pv"  # the call answered before the cache caught up
        shown = await cached(sim, vdi_id, lambda v: v["size"] == 2 * GiB)
        assert shown["name_label"] == "pv-renamed"
        assert time.monotonic() - started >= 0.02  # at least the lag's lower bound
        assert sim.state.get(SR_LOCAL_A1)["usage"] == 12 * GiB  # with the 10 GiB root disk
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.set", {"id": vdi_id, "size": GiB})
        assert info.value.error == {"code": 10, "data": {},
                                    "message": f"cannot set new size ({GiB}) below the current size ({2 * GiB})"}


async def test_online_resize_is_refused_with_17_offline_resize_works() -> None:
    async with running(destroy_retry_ms=10) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "pv", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        assert sim.state.get(vbd_id)["attached"] is True
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.set", {"id": vdi_id, "size": "2GiB"})
        assert info.value.error == {"code": 17, "message": "VDI in use",
                                    "data": {"objectId": vdi_id, "operation": "resize"}}
        assert sim.state.get(vdi_id)["size"] == GiB
        await cached(sim, vbd_id)
        await rpc.call("vbd.disconnect", {"id": vbd_id})
        assert await rpc.call("vdi.set", {"id": vdi_id, "size": "2GiB"}) is True
        assert sim.state.get(vdi_id)["size"] == 2 * GiB


async def test_online_resize_works_on_an_sr_that_declares_it() -> None:
    topology = {"tokens": ["sim-token"], "pools": [{"name_label": "P", "hosts": [{
        "name_label": "h", "srs": [{"name_label": "S", "size": "10GiB", "resize_online": True}],
        "vms": [{"name_label": "vm"}]}]}]}
    async with running(topology) as sim, client(sim) as rpc:
        vm_id = derived_id("vm", "P", "h", "vm")
        vdi_id = await rpc.call("disk.create", {"name": "pv", "size": GiB, "sr": derived_id("sr", "P", "h", "S"),
                                                "vm": vm_id})
        assert await rpc.call("vdi.set", {"id": vdi_id, "size": "2GiB"}) is True
        assert sim.state.get(vdi_id)["size"] == 2 * GiB


async def test_attach_picks_positions_from_0_avoiding_3_and_delete_of_attached_vdi_gives_17_after_xo_retries() -> None:
    topology = {"tokens": ["sim-token"], "pools": [{"name_label": "P", "hosts": [{
        "name_label": "h", "srs": [{"name_label": "S", "size": "10GiB"}], "vms": [{"name_label": "vm"}]}]}]}
    sr_id, vm_id = derived_id("sr", "P", "h", "S"), derived_id("vm", "P", "h", "vm")
    async with running(topology, **FAST_RETRY) as sim, client(sim) as rpc:
        disks = [await rpc.call("disk.create", {"name": f"d{i}", "size": MiB, "sr": sr_id}) for i in range(5)]
        for vdi_id in disks[:2]:
            assert await rpc.call("vm.attachDisk", {"vm": vm_id, "vdi": vdi_id}) is True
        assert await rpc.call("vm.attachDisk", {"vm": vm_id, "vdi": disks[2], "mode": "RO"}) is True
        assert await rpc.call("vm.attachDisk", {"vm": vm_id, "vdi": disks[3]}) is True
        vbds = [sim.state.get(sim.state.get(vdi_id)["$VBDs"][0]) for vdi_id in disks[:4]]
        assert [(v["position"], v["device"], v["read_only"]) for v in vbds] == [
            ("0", "xvda", False), ("1", "xvdb", False), ("2", "xvdc", True), ("4", "xvde", False)]
        assert "mode" not in vbds[0] and "name_label" not in vbds[0] and vbds[0]["is_cd_drive"] is False
        assert sim.state.get(vm_id)["$VBDs"] == [v["id"] for v in vbds]
        started = time.monotonic()
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.delete", {"id": disks[0]})
        assert info.value.error == {"code": 17, "message": "VDI in use",
                                    "data": {"objectId": disks[0], "operation": "destroy"}}
        assert time.monotonic() - started >= 9 * 0.01  # 10 tries, 9 pauses
        assert disks[0] in sim.state


async def test_delete_of_an_attached_vdi_succeeds_when_it_is_detached_during_xo_retries() -> None:
    async with running(destroy_retry_ms=100) as sim, client(sim) as rpc, client(sim) as other:
        vdi_id = await rpc.call("disk.create", {"name": "a", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        await cached(sim, vbd_id)
        deleting = asyncio.create_task(rpc.call("vdi.delete", {"id": vdi_id}))
        # first try refused, retrying
        await eventually(lambda: sim.simulator.stats.calls["vdi.delete"] == 1, timeout_s=10)
        assert not deleting.done()
        await other.call("vbd.disconnect", {"id": vbd_id})
        assert await deleting is True
        assert vdi_id not in sim.state and vbd_id not in sim.state


async def test_disconnect_connect_and_delete_vbd_keep_the_vdi_and_exits_carry_0() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "a", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        assert sim.state.get(vbd_id)["attached"] is True  # disk.create with vm plugs on a running VM
        assert (sim.state.get(vbd_id)["position"], sim.state.get(vbd_id)["device"]) == ("1", "xvdb")  # 0: root
        with pytest.raises(RpcError) as info:  # disk.create waited for the VDI, not for its VBD
            await rpc.call("vbd.disconnect", {"id": vbd_id})
        assert info.value.error == {"code": 1, "message": f"no such VBD {vbd_id}",
                                    "data": {"id": vbd_id, "type": "VBD"}}
        await cached(sim, vbd_id)
        assert await rpc.call("vbd.disconnect", {"id": vbd_id}) is True
        assert (sim.state.get(vbd_id)["attached"], sim.state.get(vbd_id)["device"]) == (False, None)
        with pytest.raises(RpcError) as info:
            await rpc.call("vbd.disconnect", {"id": vbd_id})
        assert info.value.xapi_code == "DEVICE_ALREADY_DETACHED"
        assert await rpc.call("vbd.connect", {"id": vbd_id}) is True
        assert sim.state.get(vbd_id)["device"] == "xvdb"
        assert await rpc.call("vbd.delete", {"id": vbd_id}) is True  # unplugs first
        assert vbd_id not in sim.state and sim.state.get(vdi_id)["$VBDs"] == []
        assert sim.state.get(VM_A1)["$VBDs"] == [sim.state.get(ROOT_A1)["$VBDs"][0]]
        exited = await rpc.wait_notification(lambda n: vbd_id in items_of(n, "exit"))
        assert items_of(exited, "exit")[vbd_id] == 0


async def test_delete_detached_vdi_removes_its_vbds_and_frees_space() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "a", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        await cached(sim, vbd_id)
        await rpc.call("vbd.disconnect", {"id": vbd_id})
        assert await rpc.call("vdi.delete", {"id": vdi_id}) is True
        assert vdi_id not in sim.state and vbd_id not in sim.state
        assert sim.state.get(SR_LOCAL_A1)["usage"] == 10 * GiB  # the root disk only
        assert vdi_id in sim.cache  # vdi.delete does not wait for the cache
        for gone in (vdi_id, vbd_id):
            exited = await rpc.wait_notification(lambda n, gone=gone: gone in items_of(n, "exit"))
            assert items_of(exited, "exit")[gone] == 0
        assert vdi_id not in sim.cache and vbd_id not in sim.cache


async def test_attach_checks_sr_visibility_pool_and_double_plug() -> None:
    async with running("two-pools") as sim, client(sim) as rpc:
        other_host_disk = await rpc.call("disk.create", {"name": "a2", "size": GiB, "sr": SR_LOCAL_A2})
        with pytest.raises(RpcError) as info:
            await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": other_host_disk})
        assert info.value.xapi_code == "VM_REQUIRES_SR"
        other_pool_sr = derived_id("sr", "Pool B", "NFS B")
        other_pool_disk = await rpc.call("disk.create", {"name": "b", "size": GiB, "sr": other_pool_sr})
        with pytest.raises(RpcError) as info:  # xen-api looks the VDI up in the VM's pool: a plain error
            await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": other_pool_disk})
        assert info.value.error == {"code": -32000, "message": f"no object with UUID or opaque ref: {other_pool_disk}",
                                    "data": {"name": "Error",
                                             "message": f"no object with UUID or opaque ref: {other_pool_disk}"}}
        shared = await rpc.call("disk.create", {"name": "s", "size": GiB, "sr": SR_NFS_A, "vm": VM_A1})
        vm_a2 = derived_id("vm", "Pool A", "host-a2", "node-a2")
        with pytest.raises(RpcError) as info:  # RWO: already plugged on node-a1
            await rpc.call("vm.attachDisk", {"vm": vm_a2, "vdi": shared})
        assert info.value.error["code"] == 17
        assert len(sim.state.get(shared)["$VBDs"]) == 2  # XO keeps the VBD when the plug fails


async def test_plug_delay_answers_first_and_reports_the_plug_by_event() -> None:
    async with running(plug_delay_ms=50) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "slow", "size": MiB, "sr": SR_LOCAL_A1})
        assert await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": vdi_id}) is True
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        assert (sim.state.get(vbd_id)["attached"], sim.state.get(vbd_id)["device"]) == (False, None)
        plugged = await rpc.wait_notification(
            lambda n: items_of(n, "enter").get(vbd_id, {}).get("attached") is True)
        assert items_of(plugged, "enter")[vbd_id]["device"] == "xvdb"


async def test_a_destroyed_object_still_in_the_cache_answers_with_the_xapi_error() -> None:
    async with running(cache_lag_ms="300-300") as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "gone", "size": MiB, "sr": SR_LOCAL_A1})
        assert await rpc.call("vdi.delete", {"id": vdi_id}) is True
        assert vdi_id in sim.cache and vdi_id not in sim.state  # destroyed, still shown for 300 ms
        cached_ref = sim.cache.get(vdi_id)["_xapiRef"]
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.set", {"id": vdi_id, "name_label": "x"})
        assert (info.value.xapi_code, info.value.data["params"]) == ("HANDLE_INVALID", ["VDI", cached_ref])
        assert await rpc.call("vdi.delete", {"id": vdi_id}) is True  # XO: HANDLE_INVALID means destroyed
        await uncached(sim, vdi_id)
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.delete", {"id": vdi_id})
        assert info.value.code == 1


async def test_two_attaches_to_one_vm_at_once_race_for_its_device_and_the_client_serialises_and_retries() -> None:
    """XO picks a new VBD's device two XAPI round trips before creating it: two vm.attachDisk calls on one VM at
    once pick the same device, and the second VBD.create fails with DEVICE_ALREADY_EXISTS, creating nothing. The
    XoClient attaches to one VM one at a time, and retries when another client took the device meanwhile."""
    async with running() as sim, client(sim) as rpc, client(sim) as other:
        disks = [await rpc.call("disk.create", {"name": f"race-{n}", "size": MiB, "sr": SR_LOCAL_A1})
                 for n in range(4)]
        outcomes = await asyncio.gather(rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": disks[0]}),
                                        other.call("vm.attachDisk", {"vm": VM_A1, "vdi": disks[1]}),
                                        return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, RpcError)]
        assert outcomes.count(True) == 1 and len(errors) == 1, outcomes
        assert (errors[0].code, errors[0].error["message"], errors[0].data["code"], errors[0].data["params"],
                errors[0].data["call"]["method"]) == (-32000, "DEVICE_ALREADY_EXISTS(1)", "DEVICE_ALREADY_EXISTS",
                                                      ["1"], "VBD.create")
        loser = disks[0] if outcomes[0] is errors[0] else disks[1]
        assert sum(len(sim.state.get(vdi_id)["$VBDs"]) for vdi_id in disks[:2]) == 1  # the loser made nothing
        settings = XoSettings(url=sim.http_url, token=SecretStr("sim-token"), timeout_s=10)
        first, second = XoClient.from_settings(settings), XoClient.from_settings(settings)
        try:  # one client's attaches in turn, and another client's racing them: all retried to success
            vbds = await asyncio.gather(first.attach_disk(VM_A1, disks[2]), first.attach_disk(VM_A1, disks[3]),
                                        second.attach_disk(VM_A1, loser))
        finally:
            await first.close()
            await second.close()
        assert sorted(vbd.device for vbd in vbds) == ["xvdc", "xvde", "xvdf"]
        # The clients' race happened (once, or twice when the retry met the first client's next attach): retried.
        assert sim.simulator.stats.errors["DEVICE_ALREADY_EXISTS"] in (2, 3)
