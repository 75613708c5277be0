"""XO simulator disks: disk.create, vdi.set, vdi.delete, vm.attachDisk and vbd.* with notifications."""

from __future__ import annotations

import pytest

from services.xo_simulator.topology import derived_id
from tests.support.sim import (
    SR_LOCAL_A1,
    SR_LOCAL_A2,
    SR_NFS_A,
    VM_A1,
    GiB,
    MiB,
    RpcError,
    client,
    items_of,
    running,
)

pytestmark = pytest.mark.integration
VDI_KEYS = {"name_label", "name_description", "size", "usage", "$SR", "$VBDs", "VDI_type", "snapshots", "tags",
            "parent", "image_format", "cbt_enabled", "missing", "current_operations", "other_config"}


async def test_disk_create_returns_a_uuid_and_accounts_sr_usage() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "pv-1", "size": "10GiB", "sr": SR_LOCAL_A1})
        vdi = (await rpc.objects(type="VDI", name_label="pv-1"))[vdi_id]
        assert VDI_KEYS <= set(vdi)
        assert (vdi["size"], vdi["$SR"], vdi["VDI_type"], vdi["parent"], vdi["tags"]) == (
            10 * GiB, SR_LOCAL_A1, "user", None, [])
        assert "read_only" not in vdi and "sharable" not in vdi
        sr = (await rpc.objects(id=SR_LOCAL_A1))[SR_LOCAL_A1]
        assert (sr["usage"], sr["physical_usage"], sr["VDIs"]) == (10 * GiB, 10 * GiB, [vdi_id])
        entered = await rpc.wait_notification(lambda n: vdi_id in items_of(n, "enter"))
        assert items_of(entered, "enter")[vdi_id]["name_label"] == "pv-1"


async def test_full_sr_fails_like_xapi() -> None:
    async with running() as sim, client(sim) as rpc:
        await rpc.call("disk.create", {"name": "big", "size": "90GiB", "sr": SR_LOCAL_A1})
        with pytest.raises(RpcError) as info:
            await rpc.call("disk.create", {"name": "too-big", "size": "11GiB", "sr": SR_LOCAL_A1})
        assert info.value.code == -32000
        assert info.value.error["message"] == "SR_BACKEND_FAILURE_44(, There is insufficient space, )"
        assert info.value.xapi_code == "SR_BACKEND_FAILURE_44"
        assert info.value.data["params"] == ["", "There is insufficient space", ""]
        assert info.value.data["name"] == "XapiError"
        assert await rpc.objects(type="VDI", name_label="too-big") == {}
        assert sim.state.get(SR_LOCAL_A1)["usage"] == 90 * GiB


async def test_vdi_set_renames_grows_and_refuses_to_shrink() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "pv", "size": GiB, "sr": SR_LOCAL_A1})
        assert await rpc.call("vdi.set", {"id": vdi_id, "name_label": "pv-renamed", "name_description": ""})
        assert await rpc.call("vdi.set", {"id": vdi_id, "size": "2GiB"}) is True
        vdi = sim.state.get(vdi_id)
        assert (vdi["name_label"], vdi["size"]) == ("pv-renamed", 2 * GiB)
        assert sim.state.get(SR_LOCAL_A1)["usage"] == 2 * GiB
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.set", {"id": vdi_id, "size": GiB})
        assert info.value.code == 10
        assert info.value.error["message"] == f"cannot set new size ({GiB}) below the current size ({2 * GiB})"
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.set", {"id": vdi_id, "size": "200GiB"})
        assert info.value.xapi_code == "SR_BACKEND_FAILURE_44"


async def test_attach_assigns_devices_and_delete_of_attached_vdi_gives_17() -> None:
    async with running() as sim, client(sim) as rpc:
        first = await rpc.call("disk.create", {"name": "a", "size": GiB, "sr": SR_LOCAL_A1})
        second = await rpc.call("disk.create", {"name": "b", "size": GiB, "sr": SR_NFS_A})
        assert await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": first}) is True
        assert await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": second, "mode": "RO"}) is True
        vbd_a = next(iter((await rpc.objects(type="VBD", VM=VM_A1, VDI=first)).values()))
        vbd_b = next(iter((await rpc.objects(type="VBD", VM=VM_A1, VDI=second)).values()))
        assert (vbd_a["attached"], vbd_a["device"], vbd_a["position"], vbd_a["read_only"]) == (True, "xvdb", "1", False)
        assert (vbd_b["device"], vbd_b["position"], vbd_b["read_only"]) == ("xvdc", "2", True)
        assert "mode" not in vbd_a and "name_label" not in vbd_a and vbd_a["is_cd_drive"] is False
        assert sim.state.get(VM_A1)["$VBDs"] == [vbd_a["id"], vbd_b["id"]]
        assert sim.state.get(first)["$VBDs"] == [vbd_a["id"]]
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.delete", {"id": first})
        assert info.value.error == {"code": 17, "message": "VDI in use",
                                    "data": {"objectId": first, "operation": "destroy"}}


async def test_disconnect_connect_and_delete_vbd_keep_the_vdi() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "a", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        assert sim.state.get(vbd_id)["attached"] is True  # disk.create with vm plugs on a running VM
        assert await rpc.call("vbd.disconnect", {"id": vbd_id}) is True
        assert (sim.state.get(vbd_id)["attached"], sim.state.get(vbd_id)["device"]) == (False, None)
        with pytest.raises(RpcError) as info:
            await rpc.call("vbd.disconnect", {"id": vbd_id})
        assert info.value.xapi_code == "DEVICE_ALREADY_DETACHED"
        assert await rpc.call("vbd.connect", {"id": vbd_id}) is True
        assert sim.state.get(vbd_id)["device"] == "xvdb"
        assert await rpc.call("vbd.delete", {"id": vbd_id}) is True  # unplugs first
        assert vbd_id not in sim.state and sim.state.get(vdi_id)["$VBDs"] == []
        assert sim.state.get(VM_A1)["$VBDs"] == []
        exited = await rpc.wait_notification(lambda n: vbd_id in items_of(n, "exit"))
        assert items_of(exited, "exit")[vbd_id]["type"] == "VBD"


async def test_delete_detached_vdi_removes_its_vbds_and_frees_space() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "a", "size": GiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        await rpc.call("vbd.disconnect", {"id": vbd_id})
        assert await rpc.call("vdi.delete", {"id": vdi_id}) is True
        assert vdi_id not in sim.state and vbd_id not in sim.state
        assert sim.state.get(SR_LOCAL_A1)["usage"] == 0
        exited = await rpc.wait_notification(lambda n: vdi_id in items_of(n, "exit"))
        assert vbd_id in items_of(exited, "exit")


async def test_attach_checks_sr_visibility_pool_and_double_plug() -> None:
    async with running("two-pools") as sim, client(sim) as rpc:
        other_host_disk = await rpc.call("disk.create", {"name": "a2", "size": GiB, "sr": SR_LOCAL_A2})
        with pytest.raises(RpcError) as info:
            await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": other_host_disk})
        assert info.value.xapi_code == "VM_REQUIRES_SR"
        other_pool_sr = derived_id("sr", "Pool B", "NFS B")
        other_pool_disk = await rpc.call("disk.create", {"name": "b", "size": GiB, "sr": other_pool_sr})
        with pytest.raises(RpcError) as info:
            await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": other_pool_disk})
        assert info.value.code == 10
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
        vbd = next(iter((await rpc.objects(type="VBD", VDI=vdi_id)).values()))
        assert (vbd["attached"], vbd["device"]) == (False, None)
        plugged = await rpc.wait_notification(
            lambda n: items_of(n, "enter").get(vbd["id"], {}).get("attached") is True)
        assert items_of(plugged, "enter")[vbd["id"]]["device"] == "xvdb"
