"""End to end over gRPC: simulator (real data mode), controller and node frontends as separate processes.

create -> publish -> stage (mkfs on a loop device) -> publish mount -> write -> unpublish -> unstage ->
stage again -> read back; offline expansion; a static volume; bad inputs; repeated calls.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dev.stack import Stack, running_stack
from shared.csi import csi_pb2
from shared.units import MiB
from tests.support.e2e import mount_cap

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="needs losetup (util-linux) for real data mode"),
]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    if os.geteuid() != 0:
        pytest.skip("e2e needs root: the simulator attaches loop devices and the node mounts filesystems")
    async with running_stack(tmp_path) as running:
        yield running


async def _create(stack: Stack, name: str, size: int, **parameters: str) -> csi_pb2.Volume:
    response = await stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap(parameters.pop("fs", "ext4"))], parameters=parameters), timeout=30)
    return response.volume


async def _publish(stack: Stack, volume_id: str, node: str) -> dict[str, str]:
    response = await stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=stack.vm_ids[node], volume_capability=mount_cap()), timeout=30)
    return dict(response.publish_context)


async def _stage_and_mount(stack: Stack, node: str, volume_id: str, ctx: dict[str, str], fs: str = "ext4"
                           ) -> tuple[Path, Path]:
    staging, target = stack.work / f"staging-{volume_id[-8:]}", stack.work / f"target-{volume_id[-8:]}"
    await stack.nodes[node].NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging), volume_capability=mount_cap(fs)),
        timeout=60)
    await stack.nodes[node].NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging), target_path=str(target),
        volume_capability=mount_cap(fs)), timeout=30)
    return staging, target


async def _unmount_and_unstage(stack: Stack, node: str, volume_id: str, staging: Path, target: Path) -> None:
    await stack.nodes[node].NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=str(target)), timeout=30)
    await stack.nodes[node].NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging)), timeout=30)


async def test_lifecycle_data_survives_unstage_and_restage(stack: Stack) -> None:
    sr_a1 = await stack.sr_id("Local A1")
    volume = await _create(stack, "pvc-life", 64 * MiB, srUUID=sr_a1)
    assert volume.volume_id == "name:pvc-life" and volume.capacity_bytes == 64 * MiB  # local SR: by name (m4rCsi)
    assert [dict(t.segments) for t in volume.accessible_topology] == [{"pool": (await stack.xo.get_sr(sr_a1)).pool_id}]
    again = await _create(stack, "pvc-life", 64 * MiB, srUUID=sr_a1)
    assert again == volume  # idempotent by name

    ctx = await _publish(stack, volume.volume_id, "node-a1")
    assert ctx["device"] == "xvdb" and ctx["vbd"]
    assert await _publish(stack, volume.volume_id, "node-a1") == ctx  # same context on repeat

    staging, target = await _stage_and_mount(stack, "node-a1", volume.volume_id, ctx)
    (target / "hello.txt").write_text("written before unstage")
    await _unmount_and_unstage(stack, "node-a1", volume.volume_id, staging, target)
    await _unmount_and_unstage(stack, "node-a1", volume.volume_id, staging, target)  # idempotent
    staging, target = await _stage_and_mount(stack, "node-a1", volume.volume_id, ctx)
    assert (target / "hello.txt").read_text() == "written before unstage"

    stats = await stack.nodes["node-a1"].NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=str(target)), timeout=10)
    assert stats.usage[0].total > 0 and not stats.volume_condition.abnormal

    got = await stack.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
        volume_id=volume.volume_id), timeout=10)
    assert list(got.status.published_node_ids) == [stack.vm_ids["node-a1"]]
    listed = await stack.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
    assert [e.volume.volume_id for e in listed.entries] == [volume.volume_id]

    await _unmount_and_unstage(stack, "node-a1", volume.volume_id, staging, target)
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id=stack.vm_ids["node-a1"])
    await stack.controller.ControllerUnpublishVolume(unpublish, timeout=30)
    await stack.controller.ControllerUnpublishVolume(unpublish, timeout=30)
    delete = csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
    await stack.controller.DeleteVolume(delete, timeout=30)
    await stack.controller.DeleteVolume(delete, timeout=30)
    assert await stack.xo.find_vdis(name_label="csi-pvc-life") == []


async def test_offline_expansion_grows_the_filesystem_with_its_data(stack: Stack) -> None:
    """XCP-ng resizes a VDI only while it is detached (XO code 17 otherwise): expanding an attached volume is
    FAILED_PRECONDITION naming the node; unpublished, the VDI grows, and once published and staged again the node
    grows the filesystem to the device (node_expansion_required) with the data intact."""
    volume = await _create(stack, "pvc-grow", 320 * MiB, srsWithTag="k8s-migrating", fs="xfs")
    node = await stack.node_for_disk("csi-pvc-grow")
    ctx = await _publish(stack, volume.volume_id, node)
    staging, target = await _stage_and_mount(stack, node, volume.volume_id, ctx, fs="xfs")
    (target / "kept.txt").write_text("written before the expansion")
    before = shutil.disk_usage(target).total
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=480 * MiB),
        volume_capability=mount_cap("xfs"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.controller.ControllerExpandVolume(expand, timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"attached to node {stack.vm_ids[node]}" in (refused.value.details() or "")

    await _unmount_and_unstage(stack, node, volume.volume_id, staging, target)
    await stack.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume.volume_id, node_id=stack.vm_ids[node]), timeout=30)
    expanded = await stack.controller.ControllerExpandVolume(expand, timeout=30)
    assert expanded.capacity_bytes == 480 * MiB and expanded.node_expansion_required
    ctx = await _publish(stack, volume.volume_id, node)
    staging, target = await _stage_and_mount(stack, node, volume.volume_id, ctx, fs="xfs")
    await stack.nodes[node].NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.volume_id, volume_path=str(target), staging_target_path=str(staging),
        capacity_range=csi_pb2.CapacityRange(required_bytes=480 * MiB), volume_capability=mount_cap("xfs")),
        timeout=60)
    assert shutil.disk_usage(target).total > before + 100 * MiB
    assert (target / "kept.txt").read_text() == "written before the expansion"
    await _unmount_and_unstage(stack, node, volume.volume_id, staging, target)
    await stack.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume.volume_id, node_id=stack.vm_ids[node]), timeout=30)


async def test_static_volume_by_vdi_uuid(stack: Stack) -> None:
    vdi_id = await stack.xo.create_disk("legacy-data", 48 * MiB, await stack.sr_id("Local A2"))
    ctx = await _publish(stack, vdi_id, "node-a2")
    staging, target = await _stage_and_mount(stack, "node-a2", vdi_id, ctx)
    (target / "f").write_bytes(b"static")
    assert (target / "f").read_bytes() == b"static"
    await _unmount_and_unstage(stack, "node-a2", vdi_id, staging, target)
    await stack.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vdi_id, node_id=stack.vm_ids["node-a2"]), timeout=30)


async def test_bad_inputs_get_the_spec_codes_and_clear_messages(stack: Stack) -> None:
    sr_a1 = await stack.sr_id("Local A1")
    local = await _create(stack, "pvc-pinned", 16 * MiB, srUUID=sr_a1)
    migrating = await _create(stack, "pvc-moving", 16 * MiB, srsWithTag="k8s-migrating", migrating="true")
    assert migrating.volume_id == "name:pvc-moving"
    ctx = await _publish(stack, local.volume_id, "node-a1")
    cases = [
        (stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(volume_capabilities=[mount_cap()])),
         grpc.StatusCode.INVALID_ARGUMENT, "name is required"),
        (stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="x", volume_capabilities=[mount_cap()], parameters={"srUUID": sr_a1, "srsWithTag": "t"})),
         grpc.StatusCode.INVALID_ARGUMENT, "mutually exclusive"),
        (stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="pvc-pinned", volume_capabilities=[mount_cap()], parameters={"srUUID": sr_a1},
            capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB))),
         grpc.StatusCode.ALREADY_EXISTS, "already exists"),
        (stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="pvc-huge", volume_capabilities=[mount_cap()], parameters={"srUUID": sr_a1},
            capacity_range=csi_pb2.CapacityRange(required_bytes=10**15))),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "free"),
        (stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=local.volume_id, node_id="00000000-0000-0000-0000-000000000000",
            volume_capability=mount_cap())), grpc.StatusCode.NOT_FOUND, "not a VM known to XO"),
        (stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id="name:pvc-nothing", node_id=stack.vm_ids["node-a1"], volume_capability=mount_cap())),
         grpc.StatusCode.NOT_FOUND, "does not exist"),
        (stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=local.volume_id, node_id=stack.vm_ids["node-a2"], volume_capability=mount_cap())),
         grpc.StatusCode.FAILED_PRECONDITION, "attached to node"),
        (stack.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=local.volume_id)),
         grpc.StatusCode.FAILED_PRECONDITION, "unpublish it before deleting"),
        (stack.controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token="bogus")),
         grpc.StatusCode.ABORTED, "starting_token"),
        (stack.nodes["node-a1"].NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=local.volume_id, staging_target_path=str(stack.work / "s"), volume_capability=mount_cap())),
         grpc.StatusCode.INVALID_ARGUMENT, "device"),
    ]
    for call, code, text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == code, info.value.details()
        assert text in (info.value.details() or ""), info.value.details()
    assert ctx["device"] == "xvdb"
    # A migrating volume whose SR the node cannot use, with no migration service configured: a clear refusal.
    other = await stack.node_for_disk("csi-pvc-moving", same_host=False)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _publish(stack, migrating.volume_id, other)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "must migrate" in (info.value.details() or "")
