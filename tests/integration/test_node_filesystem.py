"""NodeStageVolume's filesystem rules on real loop devices: formatted as mount-utils formats (mkfs.ext4 -F -m0),
checked with fsck -a before a read-write ext* mount (corrected: go on; uncorrectable: FAILED_PRECONDITION naming
the device), and grown when the disk grew while detached (offline expansion: ext* before mounting, xfs after).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from services.csi_frontend import filesystem, mounter
from services.csi_frontend.filesystem import FilesystemCorrupt
from services.csi_frontend.status import code_for
from shared.csi import csi_pb2
from shared.units import MiB
from tests.support.capabilities import mount_capability
from tests.support.node_host import Host, expand, publish, servicer, stage, unpublish, unstage, usage, volume_stats

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(180)]

DATA = os.urandom(3 * MiB)


async def _dumpe2fs(device: Path) -> dict[str, str]:
    result = await mounter.run("dumpe2fs", "-h", str(device), timeout_s=30)
    return {key.strip(): value.strip() for key, _, value in
            (line.partition(":") for line in result.stdout.splitlines()) if value}


async def _write_then_detach(host: Host, fs_type: str, size_bytes: int) -> tuple[Path, Path, int]:
    """Stage + publish a fresh volume, write DATA, unpublish + unstage (the pod went away, the disk detaches)."""
    await host.attach("xvdb", size_bytes)
    node = servicer(host)
    staging, target = host.root / "staging", host.root / "target"
    await stage(node, staging, "xvdb", mount_capability(fs_type))
    await publish(node, staging, target, mount_capability(fs_type))
    (target / "data.bin").write_bytes(DATA)
    before = usage(await volume_stats(node, target), csi_pb2.VolumeUsage.BYTES).total
    await unpublish(node, target)
    await unstage(node, staging)
    return staging, target, before


@pytest.mark.parametrize(("fs_type", "size_bytes", "grown_bytes"),
                         [("ext4", 64 * MiB, 160 * MiB), ("xfs", 320 * MiB, 512 * MiB)])
async def test_stage_grows_a_filesystem_whose_disk_grew_while_detached(
        host: Host, fs_type: str, size_bytes: int, grown_bytes: int) -> None:
    staging, target, before = await _write_then_detach(host, fs_type, size_bytes)

    await host.grow("xvdb", grown_bytes)  # XO resized the detached VDI; the next attach shows the new size
    node = servicer(host)
    await stage(node, staging, "xvdb", mount_capability(fs_type))
    await publish(node, staging, target, mount_capability(fs_type))

    after = usage(await volume_stats(node, target), csi_pb2.VolumeUsage.BYTES).total
    grown_by = grown_bytes - size_bytes
    assert before + grown_by * 0.9 < after <= grown_bytes, (before, after)
    assert (target / "data.bin").read_bytes() == DATA
    fs_bytes, block_bytes = await filesystem.size_of(host.device_dir / "xvdb", fs_type, staging)
    assert grown_bytes - fs_bytes < 64 * MiB and fs_bytes > size_bytes
    # the kubelet's NodeExpandVolume that follows (OFFLINE expansion) finds nothing left to grow: no online
    # resize (which ext4 could not do here without CAP_SYS_RESOURCE), the device size answered
    for _ in range(2):
        assert await expand(node, target, required_bytes=grown_bytes) == grown_bytes
    assert await filesystem.size_of(host.device_dir / "xvdb", fs_type, staging) == (fs_bytes, block_bytes)


async def test_an_xfs_volume_and_its_block_copy_are_staged_side_by_side(host: Host) -> None:
    """A clone is a block copy, so its xfs UUID is its source's; without ``nouuid`` the kernel refuses to mount
    the second ("Filesystem has duplicate UUID") and a pod using a claim and its clone never starts."""
    staging, target, _ = await _write_then_detach(host, "xfs", 320 * MiB)
    clone = await host.copy("xvdb", "xvdc")
    uuids = [(await mounter.run("blkid", "-p", "-s", "UUID", "-o", "value", str(loop), timeout_s=30)).stdout.strip()
             for loop in (host.device_dir / "xvdb", clone)]
    assert uuids[0] != "" and uuids[0] == uuids[1]

    node = servicer(host)
    clone_staging = host.root / "staging-clone"
    for _ in range(2):
        await stage(node, staging, "xvdb", mount_capability("xfs"))
        await stage(node, clone_staging, "xvdc", mount_capability("xfs"), volume_id="name:pvc-clone")
    mounted = [await mounter.mount_info(path) for path in (staging, clone_staging)]
    assert [(info.fstype, info.device_number) for info in mounted if info is not None] == [
        ("xfs", (host.device_dir / "xvdb").stat().st_rdev), ("xfs", clone.stat().st_rdev)]
    assert (clone_staging / "data.bin").read_bytes() == DATA
    (clone_staging / "data.bin").write_bytes(b"the clone's own")
    assert (staging / "data.bin").read_bytes() == DATA  # two filesystems, not one seen twice


async def test_restaging_an_unchanged_disk_does_not_resize_it(host: Host) -> None:
    staging, _, before = await _write_then_detach(host, "ext4", 64 * MiB)
    with capture_logs() as logs:
        await stage(servicer(host), staging, "xvdb", mount_capability("ext4"))
    assert [entry["event"] for entry in logs if entry["event"].startswith("filesystem_")] == []


@pytest.mark.parametrize("fs_type", ["ext4", "ext3"])
async def test_blank_ext_device_is_formatted_with_no_reserved_blocks(host: Host, fs_type: str) -> None:
    await host.attach("xvdb", 64 * MiB)
    await stage(servicer(host), host.root / "staging", "xvdb", mount_capability(fs_type))
    fields = await _dumpe2fs(host.device_dir / "xvdb")
    assert fields["Reserved block count"] == "0"  # mkfs -m0, as mount-utils formats
    assert int(fields["Block count"]) > 0


async def test_fsck_corrected_errors_are_logged_and_the_volume_mounts(host: Host) -> None:
    staging, target, _ = await _write_then_detach(host, "ext4", 64 * MiB)
    device = host.device_dir / "xvdb"
    # a wrong free-blocks summary on a filesystem marked "not clean": fsck -a repairs it (exit 1)
    await mounter.run("debugfs", "-w", "-R", "ssv free_blocks_count 10", str(device), timeout_s=30)
    await mounter.run("debugfs", "-w", "-R", "ssv state 0", str(device), timeout_s=30)
    node = servicer(host)
    with capture_logs() as logs:
        await stage(node, staging, "xvdb", mount_capability("ext4"))
    corrected = [entry for entry in logs if entry["event"] == "filesystem_errors_corrected"]
    assert [(entry["tool"], entry["exit_code"]) for entry in corrected] == [("fsck -a", 1)]
    await publish(node, staging, target, mount_capability("ext4"))
    assert (target / "data.bin").read_bytes() == DATA


@pytest.mark.parametrize(("damage", "exit_code", "fsck_says"), [
    ("clri <2>", 4, "UNEXPECTED INCONSISTENCY"),  # root inode wiped: preen mode must not guess
    ("superblock", 8, "superblock"),  # s_blocks_count overwritten: the superblock checksum fails
])
async def test_fsck_uncorrectable_errors_refuse_the_mount_naming_the_device(
        host: Host, damage: str, exit_code: int, fsck_says: str) -> None:
    staging, _, _ = await _write_then_detach(host, "ext4", 64 * MiB)
    device = host.device_dir / "xvdb"
    if damage == "superblock":
        with open(os.path.realpath(device), "r+b") as raw:
            raw.seek(1024 + 4)  # the primary superblock starts at byte 1024; s_blocks_count_lo at +4
            raw.write(b"\x00" * 8)
            os.fsync(raw.fileno())
    else:
        await mounter.run("debugfs", "-w", "-R", damage, str(device), timeout_s=30)
        await mounter.run("debugfs", "-w", "-R", "ssv state 0", str(device), timeout_s=30)
    assert await mounter.probe_fstype(device) == "ext4"  # still ext4 to blkid: never reformatted

    node = servicer(host)
    for _ in range(2):  # a retry finds the same damage
        with pytest.raises(FilesystemCorrupt) as raised:
            await stage(node, staging, "xvdb", mount_capability("ext4"))
        message = raised.value.message
        assert f"`fsck -a {device.resolve()}` exited {exit_code}" in message
        assert fsck_says.lower() in message.lower() and "by hand" in message
        assert code_for(raised.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert await mounter.mount_info(staging) is None  # nothing mounted
    assert await mounter.probe_fstype(device) == "ext4"


async def test_a_missing_fsck_is_a_warning_and_the_volume_mounts(host: Host, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    staging, target, _ = await _write_then_detach(host, "ext4", 64 * MiB)
    tools = tmp_path / "bin-without-fsck"
    tools.mkdir()
    for tool in ("blkid", "mount", "umount", "blockdev", "dumpe2fs", "e2fsck", "resize2fs"):
        found = shutil.which(tool)
        assert found is not None, tool
        (tools / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(tools))
    node = servicer(host)
    with capture_logs() as logs:
        await stage(node, staging, "xvdb", mount_capability("ext4"))
    assert [entry["event"] for entry in logs if entry["event"] == "fsck_missing"] == ["fsck_missing"]
    await publish(node, staging, target, mount_capability("ext4"))
    assert (target / "data.bin").read_bytes() == DATA
