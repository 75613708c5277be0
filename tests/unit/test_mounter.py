"""mounter: mountinfo parsing, fs_type checks, the command runner and file helpers (no root needed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from services.csi_frontend import mounter
from shared.errors import BackendFailure, InvalidRequest, PreconditionFailed

LINE = "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"


def test_mountinfo_line_is_parsed_with_optional_fields_and_escapes() -> None:
    info = mounter.parse_mountinfo_line(LINE)
    assert info is not None
    assert info.mount_point == "/mnt/parent dir"
    assert info.root == "/mnt1"
    assert (info.source, info.fstype) == ("/dev/root", "ext3")
    assert info.options == {"rw", "noatime"} and not info.is_readonly
    assert info.super_options == {"rw", "errors=continue"}
    assert info.device_number == os.makedev(98, 0)


def test_mountinfo_read_only_bind_without_optional_fields() -> None:
    info = mounter.parse_mountinfo_line("43 27 7:0 / /tmp/b ro,relatime - ext4 /dev/loop0 rw")
    assert info is not None and info.is_readonly and info.device_number == os.makedev(7, 0)


@pytest.mark.parametrize(("options", "super_options", "forced"), [
    ("rw,relatime", "rw,errors=remount-ro", False),  # healthy
    ("ro,relatime", "ro", False),  # mounted read-only on purpose
    ("ro,relatime", "rw", False),  # a read-only bind of a writable filesystem (readonly publish)
    ("rw,relatime", "rw,emergency_ro,errors=remount-ro", True),  # ext4 after an error, Linux 6.x
    ("ro,relatime", "rw,emergency_ro,errors=remount-ro", True),  # the same under a read-only bind
    ("rw,relatime", "ro,errors=remount-ro", True),  # ext4 after an error, older kernels (SB_RDONLY)
])
def test_a_filesystem_the_kernel_made_read_only_is_told_from_one_mounted_read_only(
        options: str, super_options: str, forced: bool) -> None:
    info = mounter.parse_mountinfo_line(f"43 27 7:0 / /tmp/b {options} - ext4 /dev/loop0 {super_options}")
    assert info is not None and info.is_forced_readonly is forced


@pytest.mark.parametrize("line", ["", "garbage", "1 2 x:y / /m rw - ext4 /dev/a rw", "1 2 7:0 / /m rw ext4 /dev/a"])
def test_malformed_mountinfo_lines_are_skipped(line: str) -> None:
    assert mounter.parse_mountinfo_line(line) is None


async def test_mount_info_finds_the_root_mount_and_nothing_for_a_plain_dir(tmp_path: Path) -> None:
    root = await mounter.mount_info(Path("/"))
    assert root is not None and root.mount_point == "/"
    assert await mounter.mount_info(tmp_path) is None or str(tmp_path) == "/"
    assert not await mounter.is_mountpoint(tmp_path / "missing")


async def test_run_returns_output() -> None:
    result = await mounter.run("sh", "-c", "echo out; echo err >&2", timeout_s=5)
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")


async def test_run_failure_carries_command_exit_code_and_stderr() -> None:
    with pytest.raises(mounter.MountError, match=r"`sh -c .*` failed: exit 3: boom") as raised:
        await mounter.run("sh", "-c", "echo boom >&2; exit 3", timeout_s=5)
    assert isinstance(raised.value, BackendFailure)


async def test_a_failed_mount_names_the_command_but_not_its_mount_flags(tmp_path: Path) -> None:
    # The CSI spec: mount_flags "MAY contain sensitive information"; the error reaches the pod's events.
    with pytest.raises(mounter.MountError) as raised:
        await mounter.mount(tmp_path / "no-such-device", tmp_path, "ext4", ("noatime", "password=hunter2"))

    assert raised.value.message.startswith(f"`mount -t ext4 -o <options> {tmp_path / 'no-such-device'} {tmp_path}`")
    assert "hunter2" not in raised.value.message and "noatime" not in raised.value.message


async def test_run_accepts_listed_exit_codes() -> None:
    assert (await mounter.run("sh", "-c", "exit 2", timeout_s=5, ok_codes=(0, 2))).returncode == 2


async def test_run_keeps_error_messages_short() -> None:
    with pytest.raises(mounter.MountError) as raised:
        await mounter.run("sh", "-c", "head -c 20000 /dev/zero | tr '\\0' x >&2; exit 1", timeout_s=5)
    assert len(raised.value.message) < 600


async def test_run_of_a_missing_binary_fails_cleanly() -> None:
    with pytest.raises(mounter.MountError, match="cannot start"):
        await mounter.run("definitely-not-a-binary-xo-csi", timeout_s=5)


async def test_run_kills_a_command_that_outlives_its_timeout() -> None:
    with pytest.raises(mounter.MountError, match=r"timed out after 0.2s"):
        await mounter.run("sh", "-c", "exec tail -f /dev/null", timeout_s=0.2)


async def test_path_info_follows_symlinks_and_reports_missing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    info = await mounter.path_info(tmp_path / "link")
    assert info is not None and info.resolved == tmp_path / "file"
    assert not info.is_block_device and not info.is_dir and info.rdev == 0
    assert await mounter.path_info(tmp_path / "dangling") is None
    assert await mounter.path_info(tmp_path / "missing") is None


async def test_make_and_remove_paths(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "dev"
    await mounter.make_file(target)
    await mounter.make_file(target)  # idempotent
    assert target.is_file()
    await mounter.remove_path(target)
    await mounter.remove_path(target)  # missing: no-op
    await mounter.make_dir(tmp_path / "a" / "b")
    await mounter.remove_path(tmp_path / "a" / "b")
    assert not (tmp_path / "a" / "b").exists()


async def test_remove_path_never_deletes_data(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious").write_text("user data")
    with pytest.raises(PreconditionFailed, match="non-empty directory"):
        await mounter.remove_path(tmp_path / "data")
    assert (tmp_path / "data" / "precious").exists()
    with pytest.raises(PreconditionFailed, match="non-empty file"):
        await mounter.remove_path(tmp_path / "data" / "precious")
    assert (tmp_path / "data" / "precious").read_text() == "user data"


async def test_fs_stats_of_a_real_filesystem(tmp_path: Path) -> None:
    stats = await mounter.fs_stats(tmp_path)
    assert stats.total_bytes > 0 and 0 <= stats.available_bytes <= stats.total_bytes
    assert stats.used_bytes <= stats.total_bytes and stats.free_inodes <= stats.total_inodes


async def test_fs_stats_of_a_missing_path_is_a_mount_error(tmp_path: Path) -> None:
    with pytest.raises(mounter.MountError, match="statvfs"):
        await mounter.fs_stats(tmp_path / "missing")


async def test_device_size_of_a_regular_file_is_a_mount_error(tmp_path: Path) -> None:
    if shutil.which("blockdev") is None:
        pytest.skip("blockdev is not installed")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(mounter.MountError, match="blockdev --getsize64"):
        await mounter.device_size_bytes(tmp_path / "file")


@pytest.mark.parametrize("fs_type", ["ext4", "ext3"])
async def test_probe_sees_blank_then_the_filesystem_format_made(tmp_path: Path, fs_type: str) -> None:
    """mkfs and blkid work on regular files, so this needs neither root nor a loop device."""
    if shutil.which("blkid") is None or shutil.which(f"mkfs.{fs_type}") is None:
        pytest.skip(f"blkid or mkfs.{fs_type} is not installed")
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * 1024 * 1024)
    assert await mounter.probe_fstype(image) is None
    await mounter.format_device(image, fs_type)
    assert await mounter.probe_fstype(image) == fs_type


async def test_format_refuses_unsupported_types(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="'vfat'"):
        await mounter.format_device(tmp_path / "x", "vfat")


async def test_resize_refuses_unsupported_types(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="cannot grow a 'tmpfs'"):
        await mounter.resize_fs(tmp_path / "x", tmp_path, "tmpfs")
