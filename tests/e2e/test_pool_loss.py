"""XO loses a pool (issue 9 item 3): every object of the pool leaves XO's cache, lookups find nothing and calls on
them answer "no such object". Absent is not deleted: while the pool is lost every controller RPC whose answer
would rest on an empty lookup answers UNAVAILABLE (the sidecars retry), nothing is deleted, detached or created,
and everything works again once the pool is back. Real processes: the simulator (two pools) and the controller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from dev.stack import Stack, StackOptions, running_stack
from dev.wait import eventually
from shared.csi import csi_pb2
from shared.units import MiB
from tests.support.e2e import NEEDS_LOSETUP, create, mount_cap, publish, require_root

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120), NEEDS_LOSETUP]
SHARED_FIXED = {"srsWithTag": "k8s-shared"}
MIGRATING = {"srsWithTag": "k8s-migrating", "migrating": "true"}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    require_root("pool-loss e2e")
    async with running_stack(tmp_path, StackOptions(topology="two-pools")) as running:
        yield running


async def _code(call: Awaitable[Any]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def _listed(controller: Any) -> csi_pb2.ListVolumesResponse | None:
    """ListVolumes' answer; None while it answers UNAVAILABLE (XO not yet showing every pool)."""
    try:
        response: csi_pb2.ListVolumesResponse = await controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None
    return response


async def _truth(stack: Stack) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """(names of the VDIs, (VM, VDI, plugged) of the VBDs) as XAPI holds them, whatever XO's cache shows."""
    async with httpx.AsyncClient(base_url=stack.admin_url, timeout=10) as admin:
        objects = (await admin.get("/_sim/state")).json().values()
    return (sorted(o["name_label"] for o in objects if o.get("type") == "VDI"),
            sorted((o["VM"], o["VDI"], o["attached"]) for o in objects if o.get("type") == "VBD"))


async def _lose_pool(stack: Stack, pool: str | None) -> None:
    async with httpx.AsyncClient(base_url=stack.admin_url, timeout=10) as admin:
        if pool is None:
            (await admin.delete("/_sim/faults")).raise_for_status()
        else:
            (await admin.post("/_sim/faults", json={"kind": "pool_disconnect", "pool": pool})).raise_for_status()


async def test_while_xo_lost_the_pool_every_answer_is_unavailable_and_nothing_changes(stack: Stack) -> None:
    controller = stack.controller
    pool_a = (await stack.xo.get_vm(stack.vm_ids["node-a1"])).pool_id  # type: ignore[union-attr]
    _, root_vbds = await _truth(stack)
    shared = await create(stack, "pvc-kept", 64 * MiB, SHARED_FIXED, {"pool": pool_a})
    migrating = await create(stack, "pvc-moving", 64 * MiB, MIGRATING, {"pool": pool_a})
    await publish(stack, shared, "node-a1")
    before = await _truth(stack)

    await _lose_pool(stack, pool_a)
    node_a1, node_a2 = stack.vm_ids["node-a1"], stack.vm_ids["node-a2"]
    cap = mount_cap()
    calls = {
        "DeleteVolume": controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=shared), timeout=30),
        "DeleteVolume name:": controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=migrating), timeout=30),
        "ControllerUnpublishVolume": controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=shared, node_id=node_a1), timeout=30),
        "ControllerPublishVolume": controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=migrating, node_id=node_a2, volume_capability=cap), timeout=30),
        "ControllerPublishVolume unknown node": controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(volume_id=shared, node_id="00000000-0000-4000-8000-00000000000a",
                                                   volume_capability=cap), timeout=30),
        "ListVolumes": controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30),
        "GetCapacity": controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters=SHARED_FIXED), timeout=30),
        "ValidateVolumeCapabilities": controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=shared, volume_capabilities=[cap]), timeout=30),
        "ControllerGetVolume": controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=migrating), timeout=30),
        "ControllerExpandVolume": controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=migrating, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)), timeout=30),
        "CreateVolume again": controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="pvc-moving", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
            volume_capabilities=[cap], parameters=MIGRATING), timeout=30),
    }
    codes = {name: await _code(call) for name, call in calls.items()}
    assert codes == dict.fromkeys(calls, "UNAVAILABLE"), codes
    assert await _truth(stack) == before  # nothing deleted, detached or created meanwhile

    # The pool is back: XO says it is connected at once and shows its objects once its initial fetch ran (a cache
    # lag later); meanwhile a listing still answers UNAVAILABLE, and the sidecars retry as here. Then all works.
    await _lose_pool(stack, None)
    listed = await eventually(lambda: _listed(controller), 10, 0.02, description="ListVolumes once XO shows the pool")
    assert {e.volume.volume_id for e in listed.entries} >= {shared, migrating}
    assert (await publish(stack, shared, "node-a1"))["device"] == "xvdb"  # idempotent: the same VBD
    await controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=shared, node_id=node_a1), timeout=30)
    for volume_id in (shared, migrating):
        await controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=30)
    names, vbds = await _truth(stack)
    assert "csi-pvc-kept" not in names and "csi-pvc-moving" not in names
    assert vbds == root_vbds  # only the node VMs' system disks are attached
