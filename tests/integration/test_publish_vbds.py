"""What a publish leaves in XO (issue 10 item 1), against the simulator: one plugged VBD of the volume on the node,
whatever earlier attaches left there."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dev.wait import eventually
from services.csi_frontend.status import code_for
from services.xo_simulator.faults import Latency
from services.xo_simulator.xapi import MAX_POSITION
from shared.csi import csi_pb2
from shared.errors import CapacityExhausted
from shared.units import MiB
from tests.support.capabilities import mount_capability
from tests.support.controller import Context, Controller
from tests.support.sim import VM_A1

CAP = mount_capability()


async def _unplugged_vbd(ctl: Controller, vdi_id: str) -> str:
    """A VBD of the VDI on node-a1, plugged then unplugged (what a failed or interrupted attach can leave)."""
    vbd = await ctl.xo.attach_disk(VM_A1, vdi_id)
    await ctl.xo.session.call("vbd.disconnect", {"id": vbd.id})

    async def unplugged() -> bool:
        found = [v for v in await ctl.xo.find_vbds(vdi_id=vdi_id) if v.id == vbd.id]
        return bool(found) and not found[0].attached

    await eventually(unplugged, 5, 0.05, description="XO's cache shows the VBD unplugged")
    return vbd.id


async def test_a_publish_removes_unplugged_leftovers_and_leaves_one_plugged_vbd(ctl: Controller) -> None:
    """Before, a re-publish kept the last VBD of the volume on the node even when it was unplugged (and others were
    left). Now every unplugged leftover there is removed and the publish attaches anew: one VBD, plugged."""
    created = await ctl.servicer.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-leftovers", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[CAP], parameters={"srsWithTag": "k8s-shared"}), Context())  # type: ignore[arg-type]
    vdi_id = created.volume.volume_id  # the bare VDI UUID
    leftovers = {await _unplugged_vbd(ctl, vdi_id) for _ in range(2)}
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=vdi_id, node_id=VM_A1, volume_capability=CAP)
    published = await ctl.servicer.ControllerPublishVolume(request, Context())  # type: ignore[arg-type]
    (vbd,) = await ctl.xo.find_vbds(vdi_id=vdi_id)
    assert vbd.attached and vbd.id == published.publish_context["vbd"] and vbd.id not in leftovers
    assert published.publish_context["device"] == vbd.device
    again = await ctl.servicer.ControllerPublishVolume(request, Context())  # type: ignore[arg-type]
    assert again.publish_context == published.publish_context  # the plugged VBD is reused
    assert [v.id for v in await ctl.xo.find_vbds(vdi_id=vdi_id)] == [vbd.id]


async def test_a_publish_to_a_vm_without_a_free_disk_slot_is_resource_exhausted_and_leaves_nothing(
        ctl: Controller) -> None:
    """The spec's "max volumes attached" row: XO's createVbd finds no allowed device (a plain Error) and the publish
    answers RESOURCE_EXHAUSTED saying what to do, not INTERNAL; no VBD of the volume is left behind."""
    filler, full = [(await ctl.servicer.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB), volume_capabilities=[CAP],
        parameters={"srsWithTag": "k8s-shared"}), Context())).volume.volume_id  # type: ignore[arg-type]
        for name in ("pvc-filler", "pvc-full")]
    xapi = ctl.sim.simulator.xapi
    with xapi.store.batch():  # every userdevice of the VM taken (0-254), as a VM full of disks
        for position in range(MAX_POSITION + 1):
            xapi.add_vbd_record(VM_A1, filler, position=str(position), bootable=False, read_only=False)
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=full, node_id=VM_A1, volume_capability=CAP)

    with pytest.raises(CapacityExhausted) as raised:
        await ctl.servicer.ControllerPublishVolume(request, Context())  # type: ignore[arg-type]

    assert raised.value.message == (
        f"node {VM_A1} has no free disk slot for volume {full} (XO vm.attachDisk failed: no allowed VBD devices): "
        "detach a disk from its VM, or set the node plugin's --max-volumes-per-node to what the VM takes, so that "
        "the scheduler stops before")
    assert code_for(raised.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await ctl.xo.find_vbds(vdi_id=full) == []


async def test_a_publish_cut_by_its_deadline_holds_the_volume_until_xo_answered_so_unpublish_leaves_no_vbd(
        ctl: Controller) -> None:
    """XO is slow to attach (a loaded XO: 2.5 s before it creates the VBD) and the publish is cut at its deadline
    (the interceptor's timeout) while vm.attachDisk runs. XO attaches anyway. The attacher then unpublishes (the
    VolumeAttachment is being deleted): Unpublish waits for the cut publish's operation, which holds the volume
    until XO answered, and removes the VBD XO made. Before, Unpublish found no VBD yet and answered OK, and XO
    plugged the disk a moment later: attached to a node no VolumeAttachment names, refused to every other node."""
    created = await ctl.servicer.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-cut", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[CAP], parameters={"srsWithTag": "k8s-shared"}), Context())  # type: ignore[arg-type]
    vdi_id = created.volume.volume_id
    ctl.sim.simulator.faults.latency = Latency.parse("vm.attachDisk=2500")
    publish = ctl.servicer.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vdi_id, node_id=VM_A1, volume_capability=CAP), Context(1.0))  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(publish, 0.75)  # what the interceptor does at the deadline
    assert ctl.sim.simulator.stats.busy_s["vm.attachDisk"] == 0  # cut while XO was still attaching

    await ctl.servicer.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vdi_id, node_id=VM_A1), Context())  # type: ignore[arg-type]

    assert ctl.sim.simulator.stats.busy_s["vm.attachDisk"] > 0  # XO has answered the cut publish's attach
    assert [vbd for vbd in ctl.sim.state.of_type("VBD") if vbd["VDI"] == vdi_id] == []
