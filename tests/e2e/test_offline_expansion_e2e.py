"""Offline expansion through the whole stack (issue 9 item 1): XO grows a disk only while it is detached, so the
flow is unpublish, ControllerExpandVolume, publish, stage; the node plugin finds the device larger than its
filesystem and grows it at NodeStageVolume (ext4 offline before mounting, xfs after), the data intact."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dev.brokers import RedisEndpoint
from dev.stack import Stack
from shared.csi import csi_pb2
from shared.units import MiB
from tests.support.e2e import (
    mount_cap,
    mounted,
    publish,
    require_root,
    sha256_of,
    stack_on_session_brokers,
    unpublish,
    write_file,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture
async def stack(tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str
                ) -> AsyncIterator[Stack]:
    require_root("the stack's real data mode (loop devices) and the node's mounts")
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix) as stack:
        yield stack


@pytest.mark.parametrize(("fs_type", "size", "grown"), [("ext4", 64 * MiB, 192 * MiB), ("xfs", 320 * MiB, 512 * MiB)])
async def test_a_disk_grown_while_detached_is_mounted_at_its_new_size(stack: Stack, fs_type: str, size: int,
                                                                      grown: int) -> None:
    cap = mount_cap(fs_type)
    created = await stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=f"pvc-offline-{fs_type}", capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[cap], parameters={"srsWithTag": "k8s-migrating", "csi.storage.k8s.io/fstype": fs_type}),
        timeout=30)
    volume_id = created.volume.volume_id
    node = await stack.node_for_disk(f"csi-pvc-offline-{fs_type}")
    ctx = await publish(stack, volume_id, node)
    async with mounted(stack, node, volume_id, ctx, cap) as target:
        digest = write_file(target / "data.bin", 8 * MiB)
        before = shutil.disk_usage(target).total
    await unpublish(stack, volume_id, node)

    expanded = await stack.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=grown), volume_capability=cap),
        timeout=60)
    assert expanded.capacity_bytes == grown

    ctx = await publish(stack, volume_id, node)
    async with mounted(stack, node, volume_id, ctx, cap) as target:
        after = shutil.disk_usage(target).total
        assert before + (grown - size) * 0.9 < after <= grown, (before, after)
        assert sha256_of(target / "data.bin") == digest
    await unpublish(stack, volume_id, node)
