"""NodeServicer against real loop devices, mkfs, mount and resize: needs root and util-linux.

Each test gets its own sandbox under tmp_path; the fixture unmounts everything below it and detaches
its loop devices even when the test fails, so nothing leaks into the host.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.csi_frontend import mounter
from services.csi_frontend.node import NodeConfig, NodeServicer
from shared.csi import csi_pb2
from shared.errors import (
    AlreadyExistsIncompatible,
    BackendUnavailable,
    OutOfRange,
    PreconditionFailed,
    VolumeNotFound,
)
from tests.support.capabilities import block_capability as _block_cap
from tests.support.capabilities import mount_capability as _mount_cap

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(180)]

MiB = 1024 * 1024
_Mode = csi_pb2.VolumeCapability.AccessMode


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for loop devices and mounts"
    missing = [tool for tool in ("losetup", "mkfs.ext4", "mkfs.xfs", "blkid", "mount") if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control: loop devices are unavailable in this environment"
    return None


class FakeContext:
    """Stands in for grpc.aio.ServicerContext: only the deadline is read."""

    def time_remaining(self) -> float | None:
        return 60.0


class Host:
    """Loop devices exposed as <root>/devices/<name>, as Xen exposes /dev/xvdX, and their cleanup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.device_dir = root / "devices"
        self.device_dir.mkdir()
        self._loops: dict[str, tuple[Path, Path]] = {}

    async def attach(self, name: str, size_bytes: int) -> Path:
        image = self.root / f"{name}.img"
        image.touch()
        os.truncate(image, size_bytes)  # sparse
        result = await mounter.run("losetup", "--find", "--show", str(image), timeout_s=30)
        loop = Path(result.stdout.strip())
        self._loops[name] = (loop, image)
        (self.device_dir / name).symlink_to(loop)
        return loop

    async def grow(self, name: str, size_bytes: int) -> None:
        loop, image = self._loops[name]
        os.truncate(image, size_bytes)
        await mounter.run("losetup", "-c", str(loop), timeout_s=30)

    async def cleanup(self) -> None:
        prefix = str(self.root) + "/"
        for mount_point in reversed(_mount_points()):
            if mount_point.startswith(prefix):
                await mounter.run("umount", "-l", mount_point, timeout_s=30, ok_codes=(0, 32))
        for loop, _ in self._loops.values():
            await mounter.run("losetup", "-d", str(loop), timeout_s=30, ok_codes=(0, 1))


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as lines:
        return [info.mount_point for line in lines if (info := mounter.parse_mountinfo_line(line))]


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    reason = _skip_reason()
    if reason:
        print(f"skipping node integration tests: {reason}")
        pytest.skip(reason)
    sandbox = Host(tmp_path)
    try:
        yield sandbox
    finally:
        await sandbox.cleanup()


def _servicer(host: Host) -> NodeServicer:
    return NodeServicer(NodeConfig(node_id="vm-test", device_dir=host.device_dir, device_wait_s=2.0))




async def _stage(
    node: NodeServicer, staging: Path, device: str, cap: csi_pb2.VolumeCapability, volume_id: str = "name:pvc-1"
) -> None:
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id,
        staging_target_path=str(staging),
        volume_capability=cap,
        publish_context={"device": device},
    )
    await node.NodeStageVolume(request, FakeContext())


async def _publish(
    node: NodeServicer,
    staging: Path,
    target: Path,
    cap: csi_pb2.VolumeCapability,
    *,
    readonly: bool = False,
    device: str = "xvdb",
) -> None:
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="name:pvc-1",
        staging_target_path=str(staging),
        target_path=str(target),
        volume_capability=cap,
        readonly=readonly,
        publish_context={"device": device},
    )
    await node.NodePublishVolume(request, FakeContext())


async def _unpublish(node: NodeServicer, target: Path) -> None:
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="name:pvc-1", target_path=str(target))
    await node.NodeUnpublishVolume(request, FakeContext())


async def _unstage(node: NodeServicer, staging: Path) -> None:
    request = csi_pb2.NodeUnstageVolumeRequest(volume_id="name:pvc-1", staging_target_path=str(staging))
    await node.NodeUnstageVolume(request, FakeContext())


async def _stats(node: NodeServicer, path: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id="name:pvc-1", volume_path=str(path))
    return await node.NodeGetVolumeStats(request, FakeContext())


async def _expand(node: NodeServicer, path: Path, required_bytes: int = 0, limit_bytes: int = 0) -> int:
    request = csi_pb2.NodeExpandVolumeRequest(
        volume_id="name:pvc-1",
        volume_path=str(path),
        capacity_range=csi_pb2.CapacityRange(required_bytes=required_bytes, limit_bytes=limit_bytes),
    )
    return (await node.NodeExpandVolume(request, FakeContext())).capacity_bytes


def _usage(response: csi_pb2.NodeGetVolumeStatsResponse, unit: int) -> csi_pb2.VolumeUsage:
    found: csi_pb2.VolumeUsage = next(usage for usage in response.usage if usage.unit == unit)
    return found


async def test_mount_lifecycle_ext4_is_idempotent_and_keeps_data(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    node = _servicer(host)
    staging, target = host.root / "staging", host.root / "pods" / "p1" / "volume"
    staging.mkdir()

    for _ in range(2):
        await _stage(node, staging, "xvdb", _mount_cap())
    staged = await mounter.mount_info(staging)
    assert staged is not None and staged.fstype == "ext4"

    for _ in range(2):
        await _publish(node, staging, target, _mount_cap())
    (target / "hello.txt").write_text("kept across restage")

    for _ in range(2):
        await _unpublish(node, target)
    assert not target.exists()
    for _ in range(2):
        await _unstage(node, staging)
    assert staging.is_dir() and await mounter.mount_info(staging) is None

    await _stage(node, staging, "xvdb", _mount_cap("ext4"))  # no reformat: the file survives
    assert (staging / "hello.txt").read_text() == "kept across restage"
    await _publish(node, staging, target, _mount_cap())

    stats = await _stats(node, target)
    assert not stats.volume_condition.abnormal and stats.volume_condition.message == "volume is healthy"
    size = _usage(stats, csi_pb2.VolumeUsage.BYTES)
    assert 0 < size.used < size.total and 0 < size.available < size.total
    inodes = _usage(stats, csi_pb2.VolumeUsage.INODES)
    assert 0 < inodes.used < inodes.total

    await _unpublish(node, target)
    await _unstage(node, staging)
    unmounted = await _stats(node, staging)
    assert unmounted.volume_condition.abnormal and "no longer a mountpoint" in unmounted.volume_condition.message


async def test_ext4_grows_online_after_the_device_grows(host: Host) -> None:
    if not _has_cap_sys_resource():
        reason = "online ext4 resize (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which this process lacks"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    await host.attach("xvdb", 64 * MiB)
    node = _servicer(host)
    staging, target = host.root / "staging", host.root / "target"
    await _stage(node, staging, "xvdb", _mount_cap())
    await _publish(node, staging, target, _mount_cap())
    (target / "hello.txt").write_text("kept across resize")
    before = _usage(await _stats(node, target), csi_pb2.VolumeUsage.BYTES).total

    await host.grow("xvdb", 128 * MiB)
    for _ in range(2):
        assert await _expand(node, target, required_bytes=128 * MiB) == 128 * MiB
    after = _usage(await _stats(node, target), csi_pb2.VolumeUsage.BYTES).total
    assert after > before + 50 * MiB
    assert (target / "hello.txt").read_text() == "kept across resize"


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status", encoding="ascii") as status:
        effective = next(line for line in status if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) & (1 << 24))  # CAP_SYS_RESOURCE = 24


async def test_expand_waits_for_the_device_to_grow(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    node = _servicer(host)
    staging = host.root / "staging"
    await _stage(node, staging, "xvdb", _mount_cap())
    with pytest.raises(BackendUnavailable, match="has not reached this node"):
        await _expand(node, staging, required_bytes=128 * MiB)
    with pytest.raises(OutOfRange, match="above capacity_range.limit_bytes"):
        await _expand(node, staging, limit_bytes=32 * MiB)


async def test_readonly_publish_refuses_writes_and_conflicting_republish(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    node = _servicer(host)
    staging, rw_target, ro_target = host.root / "staging", host.root / "rw", host.root / "ro"
    await _stage(node, staging, "xvdb", _mount_cap())

    for _ in range(2):
        await _publish(node, staging, ro_target, _mount_cap(), readonly=True)
    await _publish(node, staging, rw_target, _mount_cap())
    (rw_target / "written").write_text("through the writable bind")

    assert (ro_target / "written").read_text() == "through the writable bind"
    with pytest.raises(OSError) as refused:
        (ro_target / "denied").write_text("must not land")
    assert refused.value.errno == errno.EROFS

    with pytest.raises(AlreadyExistsIncompatible, match="read-only"):
        await _publish(node, staging, ro_target, _mount_cap(), readonly=False)
    with pytest.raises(AlreadyExistsIncompatible, match="read-write"):
        await _publish(node, staging, rw_target, _mount_cap(mode=_Mode.SINGLE_NODE_READER_ONLY))


async def test_publish_before_stage_is_failed_precondition(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    node = _servicer(host)
    (host.root / "staging").mkdir()
    with pytest.raises(PreconditionFailed, match="NodeStageVolume first"):
        await _publish(node, host.root / "staging", host.root / "target", _mount_cap())
    assert not (host.root / "target").exists()


async def test_block_access_publishes_the_device_node(host: Host) -> None:
    loop = await host.attach("xvdb", 64 * MiB)
    node = _servicer(host)
    staging, target = host.root / "staging", host.root / "pods" / "p2" / "dev"
    staging.mkdir()

    for _ in range(2):
        await _stage(node, staging, "xvdb", _block_cap())
        await _publish(node, staging, target, _block_cap())
    published = target.stat()
    assert stat.S_ISBLK(published.st_mode) and published.st_rdev == loop.stat().st_rdev
    assert await mounter.probe_fstype(loop) is None  # block access never formats

    stats = await _stats(node, target)
    assert not stats.volume_condition.abnormal
    assert _usage(stats, csi_pb2.VolumeUsage.BYTES).total == 64 * MiB
    assert await _expand(node, target) == 64 * MiB

    with pytest.raises(AlreadyExistsIncompatible):
        await _publish(node, staging, target, _block_cap(), readonly=True)

    for _ in range(2):
        await _unpublish(node, target)
        await _unstage(node, staging)
    assert not target.exists()


async def test_stage_refuses_other_device_and_foreign_filesystem(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    second = await host.attach("xvdc", 64 * MiB)
    node = _servicer(host)
    staging = host.root / "staging"
    await _stage(node, staging, "xvdb", _mount_cap())

    with pytest.raises(AlreadyExistsIncompatible, match="already has"):
        await _stage(node, staging, "xvdc", _mount_cap(), volume_id="name:pvc-2")
    with pytest.raises(AlreadyExistsIncompatible, match="staged as ext4"):
        await _stage(node, staging, "xvdb", _mount_cap("xfs"))
    with pytest.raises(AlreadyExistsIncompatible, match="block access was requested"):
        await _stage(node, staging, "xvdb", _block_cap())

    await mounter.format_device(second, "ext3")
    with pytest.raises(PreconditionFailed, match="already holds ext3"):
        await _stage(node, host.root / "staging-2", "xvdc", _mount_cap("ext4"), volume_id="name:pvc-2")
    assert await mounter.probe_fstype(second) == "ext3"  # never reformatted
    await _stage(node, host.root / "staging-2", "xvdc", _mount_cap(), volume_id="name:pvc-2")  # unspecified: kept


async def test_missing_device_is_not_found(host: Host) -> None:
    node = NodeServicer(NodeConfig(node_id="vm-test", device_dir=host.device_dir, device_wait_s=0.1))
    with pytest.raises(VolumeNotFound, match="is the volume attached"):
        await _stage(node, host.root / "staging", "xvdz", _mount_cap())


async def test_xfs_stage_publish_expand(host: Host) -> None:
    await host.attach("xvdb", 320 * MiB)
    node = _servicer(host)
    staging, target = host.root / "staging", host.root / "target"
    for _ in range(2):
        await _stage(node, staging, "xvdb", _mount_cap("xfs"))
        await _publish(node, staging, target, _mount_cap("xfs"))
    (target / "data").write_bytes(b"x" * 4096)
    before = _usage(await _stats(node, target), csi_pb2.VolumeUsage.BYTES).total

    await host.grow("xvdb", 480 * MiB)
    for _ in range(2):
        assert await _expand(node, target) == 480 * MiB
    after = _usage(await _stats(node, target), csi_pb2.VolumeUsage.BYTES).total
    assert after > before + 100 * MiB

    await _unpublish(node, target)
    await _unstage(node, staging)
    await _stage(node, staging, "xvdb", _mount_cap())  # fs_type unspecified: the existing xfs is mounted
    assert (staging / "data").stat().st_size == 4096
