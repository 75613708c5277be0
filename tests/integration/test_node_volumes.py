"""NodeServicer against real loop devices, mkfs, mount and resize: needs root and util-linux.

Each test gets its own sandbox under tmp_path; the fixture unmounts everything below it and detaches
its loop devices even when the test fails, so nothing leaks into the host.
"""

from __future__ import annotations

import errno
import shutil
import stat
from pathlib import Path
from typing import Any

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
from shared.units import MiB
from tests.support.capabilities import block_capability as _block_cap
from tests.support.capabilities import mount_capability as _mount_cap
from tests.support.node_host import Host, expand, publish, servicer, stage, unpublish, unstage, usage, volume_stats

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(180)]

_Mode = csi_pb2.VolumeCapability.AccessMode


async def test_mount_lifecycle_ext4_is_idempotent_and_keeps_data(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    node = servicer(host)
    staging, target = host.root / "staging", host.root / "pods" / "p1" / "volume"
    staging.mkdir()

    for _ in range(2):
        await stage(node, staging, "xvdb", _mount_cap())
    staged = await mounter.mount_info(staging)
    assert staged is not None and staged.fstype == "ext4"

    for _ in range(2):
        await publish(node, staging, target, _mount_cap())
    (target / "hello.txt").write_text("kept across restage")

    for _ in range(2):
        await unpublish(node, target)
    assert not target.exists()
    for _ in range(2):
        await unstage(node, staging)
    assert staging.is_dir() and await mounter.mount_info(staging) is None

    await stage(node, staging, "xvdb", _mount_cap("ext4"))  # no reformat: the file survives
    assert (staging / "hello.txt").read_text() == "kept across restage"
    await publish(node, staging, target, _mount_cap())

    stats = await volume_stats(node, target)
    assert not stats.volume_condition.abnormal and stats.volume_condition.message == "volume is healthy"
    size = usage(stats, csi_pb2.VolumeUsage.BYTES)
    assert 0 < size.used < size.total and 0 < size.available < size.total
    inodes = usage(stats, csi_pb2.VolumeUsage.INODES)
    assert 0 < inodes.used < inodes.total

    await unpublish(node, target)
    await unstage(node, staging)
    unmounted = await volume_stats(node, staging)
    assert unmounted.volume_condition.abnormal and "no longer a mountpoint" in unmounted.volume_condition.message
    assert _usage_rows(unmounted) == [(csi_pb2.VolumeUsage.BYTES, 0, 0, 0)]  # never empty: see below


def _usage_rows(response: csi_pb2.NodeGetVolumeStatsResponse) -> list[tuple[int, int, int, int]]:
    """Kubelet (pkg/volume/csi/csi_client.go) drops an answer without usage ("usage is nil") before it reads the
    volume condition, so an abnormal answer must carry usage too."""
    return [(row.unit, row.total, row.used, row.available) for row in response.usage]


async def test_a_filesystem_that_fails_with_eio_is_abnormal_not_an_error(host: Host) -> None:
    """An xfs shut down (what xfs does on a metadata I/O error) answers EIO to every stat: NodeGetVolumeStats
    reports it abnormal, naming the errno, with the device size as usage; it is not INTERNAL."""
    if shutil.which("xfs_io") is None:
        pytest.skip("xfs_io (xfsprogs) is not installed")
    await host.attach("xvdb", 320 * MiB)
    node = servicer(host)
    staging, target = host.root / "staging", host.root / "pods" / "p1" / "volume"
    await stage(node, staging, "xvdb", _mount_cap("xfs"))
    await publish(node, staging, target, _mount_cap("xfs"))
    await mounter.run("xfs_io", "-x", "-c", "shutdown", str(staging), timeout_s=30)
    with pytest.raises(OSError) as refused:
        (target / "x").write_text("y")
    assert refused.value.errno == errno.EIO

    for path in (target, staging):
        stats = await volume_stats(node, path)
        assert stats.volume_condition.abnormal
        assert stats.volume_condition.message == (
            f"volume_path {path} cannot be read: `stat {path}` failed: EIO (Input/output error)")
        assert _usage_rows(stats) == [(csi_pb2.VolumeUsage.BYTES, 320 * MiB, 0, 0)]


async def test_a_filesystem_the_kernel_made_read_only_after_an_error_is_abnormal(host: Host) -> None:
    """ext4 with errors=remount-ro turns read-only on an error while every mount of it still says rw: the only
    trace is in its super options (emergency_ro; a read-only superblock on older kernels). Writes fail EROFS, so
    the volume is not "operating optimally" (spec, VolumeCondition)."""
    loop = await host.attach("xvdb", 64 * MiB)
    node = servicer(host)
    staging, target = host.root / "staging", host.root / "pods" / "p1" / "volume"
    cap = _mount_cap(flags=["errors=remount-ro"])
    await stage(node, staging, "xvdb", cap)
    await publish(node, staging, target, cap)
    healthy = await volume_stats(node, target)
    assert healthy.volume_condition.message == "volume is healthy"

    trigger = Path(f"/sys/fs/ext4/{loop.name}/trigger_fs_error")
    if not trigger.exists():
        pytest.skip(f"{trigger} is missing: this kernel cannot inject an ext4 error")
    trigger.write_text("test: simulated error\n")  # what ext4_error() does on a corrupt block
    with pytest.raises(OSError) as refused:
        (target / "x").write_text("y")
    assert refused.value.errno == errno.EROFS

    stats = await volume_stats(node, target)
    assert stats.volume_condition.abnormal
    assert stats.volume_condition.message == (
        f"the ext4 filesystem on {loop} at {target} turned read-only although it was mounted read-write, as ext4 "
        "does after an error with errors=remount-ro (see the node's kernel log): stop the pods using it so that it "
        f"is unmounted, then run `e2fsck -f {loop}` on the node")
    assert [row[0] for row in _usage_rows(stats)] == [csi_pb2.VolumeUsage.BYTES, csi_pb2.VolumeUsage.INODES]
    assert usage(stats, csi_pb2.VolumeUsage.BYTES).total == usage(healthy, csi_pb2.VolumeUsage.BYTES).total


async def test_ext4_grows_online_after_the_device_grows(host: Host) -> None:
    if not _has_cap_sys_resource():
        reason = "online ext4 resize (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which this process lacks"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    await host.attach("xvdb", 64 * MiB)
    node = servicer(host)
    staging, target = host.root / "staging", host.root / "target"
    await stage(node, staging, "xvdb", _mount_cap())
    await publish(node, staging, target, _mount_cap())
    (target / "hello.txt").write_text("kept across resize")
    before = usage(await volume_stats(node, target), csi_pb2.VolumeUsage.BYTES).total

    await host.grow("xvdb", 128 * MiB)
    for _ in range(2):
        assert await expand(node, target, required_bytes=128 * MiB) == 128 * MiB
    after = usage(await volume_stats(node, target), csi_pb2.VolumeUsage.BYTES).total
    assert after > before + 50 * MiB
    assert (target / "hello.txt").read_text() == "kept across resize"


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status", encoding="ascii") as status:
        effective = next(line for line in status if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) & (1 << 24))  # CAP_SYS_RESOURCE = 24


async def test_expand_waits_for_the_device_to_grow(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    node = servicer(host)
    staging = host.root / "staging"
    await stage(node, staging, "xvdb", _mount_cap())
    with pytest.raises(BackendUnavailable, match="has not reached this node"):
        await expand(node, staging, required_bytes=128 * MiB)
    with pytest.raises(OutOfRange, match="above capacity_range.limit_bytes"):
        await expand(node, staging, limit_bytes=32 * MiB)


async def test_readonly_publish_refuses_writes_and_conflicting_republish(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    node = servicer(host)
    staging, rw_target, ro_target = host.root / "staging", host.root / "rw", host.root / "ro"
    await stage(node, staging, "xvdb", _mount_cap())

    for _ in range(2):
        await publish(node, staging, ro_target, _mount_cap(), readonly=True)
    await publish(node, staging, rw_target, _mount_cap())
    (rw_target / "written").write_text("through the writable bind")

    assert (ro_target / "written").read_text() == "through the writable bind"
    with pytest.raises(OSError) as refused:
        (ro_target / "denied").write_text("must not land")
    assert refused.value.errno == errno.EROFS

    with pytest.raises(AlreadyExistsIncompatible, match="read-only"):
        await publish(node, staging, ro_target, _mount_cap(), readonly=False)
    with pytest.raises(AlreadyExistsIncompatible, match="read-write"):
        await publish(node, staging, rw_target, _mount_cap(mode=_Mode.SINGLE_NODE_READER_ONLY))


async def test_a_publish_with_the_ro_mount_flag_is_read_only_and_its_retry_is_ok(host: Host) -> None:
    """PV mountOptions [ro] reach the node as a mount flag with readonly=false: the target is read-only (a bind of
    a read-only staging mount), so kubelet's identical retry must find it compatible, not ALREADY_EXISTS."""
    await host.attach("xvdb", 64 * MiB)
    node = servicer(host)
    staging, target = host.root / "staging", host.root / "pods" / "p1" / "volume"
    await stage(node, staging, "xvdb", _mount_cap())  # formatted once, read-write
    await unstage(node, staging)
    cap = _mount_cap(flags=["ro"])
    await stage(node, staging, "xvdb", cap)

    for _ in range(2):
        await publish(node, staging, target, cap, readonly=False)
    await publish(node, staging, target, cap, readonly=True)  # the same read-only target: compatible too
    published = await mounter.mount_info(target)
    assert published is not None and published.is_readonly
    with pytest.raises(OSError) as refused:
        (target / "denied").write_text("must not land")
    assert refused.value.errno == errno.EROFS


@pytest.mark.parametrize("cap", [_mount_cap, _block_cap], ids=["mount", "block"])
async def test_a_single_writer_volume_is_published_at_one_target_a_multi_writer_one_at_several(
        host: Host, cap: Any) -> None:
    """Spec, second NodePublishVolume table: SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod) at another target_path is
    FAILED_PRECONDITION while the first is published, and the same target again is OK; SINGLE_NODE_MULTI_WRITER
    (ReadWriteOnce, as Kubernetes sends it to this driver) publishes for every pod of the node."""
    await host.attach("xvdb", 64 * MiB)
    node = servicer(host)
    staging, first, second = host.root / "staging", host.root / "pod1" / "v", host.root / "pod2" / "v"
    staging.mkdir()
    single, multi = cap(mode=_Mode.SINGLE_NODE_SINGLE_WRITER), cap(mode=_Mode.SINGLE_NODE_MULTI_WRITER)
    await stage(node, staging, "xvdb", single)

    for _ in range(2):
        await publish(node, staging, first, single)
    with pytest.raises(PreconditionFailed, match=f"already published at {first} with access mode "
                                                 "SINGLE_NODE_SINGLE_WRITER"):
        await publish(node, staging, second, single)
    assert not await mounter.is_mountpoint(second)

    await unpublish(node, first)
    await publish(node, staging, second, single)  # the one workload moved: allowed
    await unpublish(node, second)

    for target in (first, second):
        await publish(node, staging, target, multi)
    assert [await mounter.is_mountpoint(target) for target in (first, second)] == [True, True]
    for target in (first, second):
        await unpublish(node, target)
    await unstage(node, staging)


async def test_publish_before_stage_is_failed_precondition(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    node = servicer(host)
    (host.root / "staging").mkdir()
    with pytest.raises(PreconditionFailed, match="NodeStageVolume first"):
        await publish(node, host.root / "staging", host.root / "target", _mount_cap())
    assert not (host.root / "target").exists()


async def test_block_access_publishes_the_device_node(host: Host) -> None:
    loop = await host.attach("xvdb", 64 * MiB)
    node = servicer(host)
    staging, target = host.root / "staging", host.root / "pods" / "p2" / "dev"
    staging.mkdir()

    for _ in range(2):
        await stage(node, staging, "xvdb", _block_cap())
        await publish(node, staging, target, _block_cap())
    published = target.stat()
    assert stat.S_ISBLK(published.st_mode) and published.st_rdev == loop.stat().st_rdev
    assert await mounter.probe_fstype(loop) is None  # block access never formats

    stats = await volume_stats(node, target)
    assert not stats.volume_condition.abnormal
    assert _usage_rows(stats) == [(csi_pb2.VolumeUsage.BYTES, 64 * MiB, 0, 0)]
    assert await expand(node, target) == 64 * MiB

    with pytest.raises(AlreadyExistsIncompatible):
        await publish(node, staging, target, _block_cap(), readonly=True)

    for _ in range(2):
        await unpublish(node, target)
        await unstage(node, staging)
    assert not target.exists()


async def test_stage_refuses_other_device_and_foreign_filesystem(host: Host) -> None:
    await host.attach("xvdb", 64 * MiB)
    second = await host.attach("xvdc", 64 * MiB)
    node = servicer(host)
    staging = host.root / "staging"
    await stage(node, staging, "xvdb", _mount_cap())

    with pytest.raises(AlreadyExistsIncompatible, match="already has"):
        await stage(node, staging, "xvdc", _mount_cap(), volume_id="name:pvc-2")
    with pytest.raises(AlreadyExistsIncompatible, match="staged as ext4"):
        await stage(node, staging, "xvdb", _mount_cap("xfs"))
    with pytest.raises(AlreadyExistsIncompatible, match="block access was requested"):
        await stage(node, staging, "xvdb", _block_cap())

    await mounter.format_device(second, "ext3")
    with pytest.raises(PreconditionFailed, match="already holds ext3"):
        await stage(node, host.root / "staging-2", "xvdc", _mount_cap("ext4"), volume_id="name:pvc-2")
    assert await mounter.probe_fstype(second) == "ext3"  # never reformatted
    await stage(node, host.root / "staging-2", "xvdc", _mount_cap(), volume_id="name:pvc-2")  # unspecified: kept


async def test_missing_device_is_not_found(host: Host) -> None:
    node = NodeServicer(NodeConfig(node_id="vm-test", device_dir=host.device_dir, device_wait_s=0.1))
    with pytest.raises(VolumeNotFound, match="is the volume attached"):
        await stage(node, host.root / "staging", "xvdz", _mount_cap())


async def test_xfs_stage_publish_expand(host: Host) -> None:
    await host.attach("xvdb", 320 * MiB)
    node = servicer(host)
    staging, target = host.root / "staging", host.root / "target"
    for _ in range(2):
        await stage(node, staging, "xvdb", _mount_cap("xfs"))
        await publish(node, staging, target, _mount_cap("xfs"))
    (target / "data").write_bytes(b"x" * 4096)
    before = usage(await volume_stats(node, target), csi_pb2.VolumeUsage.BYTES).total

    await host.grow("xvdb", 480 * MiB)
    for _ in range(2):
        assert await expand(node, target) == 480 * MiB
    after = usage(await volume_stats(node, target), csi_pb2.VolumeUsage.BYTES).total
    assert after > before + 100 * MiB

    await unpublish(node, target)
    await unstage(node, staging)
    await stage(node, staging, "xvdb", _mount_cap())  # fs_type unspecified: the existing xfs is mounted
    assert (staging / "data").stat().st_size == 4096
