"""Async facade over the node's OS tools: blkid, mkfs, mount/umount, resize2fs/xfs_growfs, blockdev, statvfs.

Every call is bounded by a timeout and fails with MountError; nothing here blocks the event loop or
knows about CSI or gRPC (node.py maps requests onto these calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.errors import BackendFailure, InvalidRequest, PreconditionFailed
from shared.logging import get_logger
from shared.storage_class import FS_TYPES

log = get_logger(__name__)

DEFAULT_FS_TYPE = "ext4"
SUPPORTED_FS_TYPES = FS_TYPES
"""One list for the whole driver: StorageClass fstype, controller validation and the node agree."""

QUICK_TIMEOUT_S = 15.0
"""blkid, blockdev, mount, umount: these return in milliseconds unless the device or kernel is stuck."""
MKFS_TIMEOUT_S = 300.0
"""mkfs may discard and write metadata across a large disk."""
RESIZE_TIMEOUT_S = 300.0
"""An online grow writes new group descriptors; it scales with the amount added."""

_MAX_DETAIL_CHARS = 400
_MAX_UNMOUNT_LAYERS = 8
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
# Exactly k8s.io/mount-utils' SafeFormatAndMount (what m4rCsi runs): ext* forced (-F: a whole device, not a
# partition) with no blocks reserved for root (-m0); xfs with no option, so that mkfs.xfs itself refuses to
# overwrite a signature blkid missed (mount-utils passes no -f).
_MKFS_ARGV = {
    "ext4": ("mkfs.ext4", "-F", "-m0"),
    "ext3": ("mkfs.ext3", "-F", "-m0"),
    "xfs": ("mkfs.xfs",),
}


class MountError(BackendFailure, code="mount_failed"):
    """An OS tool failed, timed out or was missing; the message holds the command, its ``-o`` options left out (the
    CSI spec: mount_flags "MAY contain sensitive information", and this message reaches pod events), and a short
    stderr."""

    def __init__(self, argv: Sequence[str], detail: str) -> None:
        detail = detail.strip()
        if len(detail) > _MAX_DETAIL_CHARS:
            detail = "..." + detail[-_MAX_DETAIL_CHARS:]
        super().__init__(f"`{' '.join(_without_options(argv))}` failed: {detail or 'no error output'}")
        self.argv = tuple(argv)


def _without_options(argv: Sequence[str]) -> list[str]:
    return ["<options>" if index and argv[index - 1] == "-o" else arg for index, arg in enumerate(argv)]


@dataclass(frozen=True)
class CommandResult:
    """What a finished command printed and returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo (the topmost mount at a path)."""

    mount_point: str
    root: str
    """Path inside the source filesystem that is mounted here ("/" unless this is a bind of a subpath)."""
    source: str
    fstype: str
    options: frozenset[str]
    """Per-mount options (ro/rw, nosuid, ...); super-block options are in super_options."""
    super_options: frozenset[str]
    device_number: int
    """st_dev of the mounted filesystem, comparable with a block device's st_rdev."""

    @property
    def is_readonly(self) -> bool:
        return "ro" in self.options

    @property
    def is_forced_readonly(self) -> bool:
        """The filesystem went read-only under this mount, as ext4 does after an error with errors=remount-ro:
        ``emergency_ro`` among the super options (Linux 6.x ext4), or a read-only superblock under a mount made
        read-write (older kernels set SB_RDONLY; a mount cannot ask for rw on a read-only superblock, so the
        kernel or a remount of another mount of it did this)."""
        return "emergency_ro" in self.super_options or ("ro" in self.super_options and not self.is_readonly)


@dataclass(frozen=True)
class PathInfo:
    """What is at a path after following symlinks."""

    resolved: Path
    is_block_device: bool
    is_dir: bool
    rdev: int
    """The device number a block device node stands for (0 for anything else)."""


@dataclass(frozen=True)
class FsStats:
    """statvfs figures of a mounted filesystem, in bytes and inodes; never negative."""

    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int
    used_inodes: int
    free_inodes: int


async def run(*argv: str, timeout_s: float, ok_codes: Sequence[int] = (0,)) -> CommandResult:
    """Run argv without a shell and return its output.

    Raises MountError when the binary is missing, the exit code is not in ok_codes, or the command
    outlives timeout_s (it is then killed). Cancellation kills the child too and propagates.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise MountError(argv, f"cannot start: {exc}") from exc
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
            code = await proc.wait()  # already exited: returns the code at once, typed as int
    except TimeoutError as exc:
        raise MountError(argv, f"timed out after {timeout_s:g}s") from exc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    result = CommandResult(tuple(argv), code, out.decode(errors="replace"), err.decode(errors="replace"))
    if result.returncode not in ok_codes:
        raise MountError(argv, f"exit {result.returncode}: {result.stderr or result.stdout}")
    return result


async def probe_fstype(device: Path) -> str | None:
    """Return the filesystem (or partition table) signature on device, or None when it is blank.

    A partition table is reported as e.g. "dos partition table" so callers never format over it.
    """
    argv = ("blkid", "-p", "-o", "export", "-s", "TYPE", "-s", "PTTYPE", str(device))
    result = await run(*argv, timeout_s=QUICK_TIMEOUT_S, ok_codes=(0, 2))  # blkid: 2 = nothing found
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if fields.get("TYPE"):
        return fields["TYPE"]
    if fields.get("PTTYPE"):
        return f"{fields['PTTYPE']} partition table"
    return None


async def format_device(device: Path, fs_type: str) -> None:
    """Create an empty fs_type filesystem on device, destroying whatever is there.

    Callers MUST have checked that the device is blank (probe_fstype) first. Raises MountError.
    """
    base = _MKFS_ARGV.get(fs_type)
    if base is None:
        raise InvalidRequest(f"fs_type {fs_type!r} is not supported; use one of {', '.join(SUPPORTED_FS_TYPES)}")
    await run(*base, str(device), timeout_s=MKFS_TIMEOUT_S)
    log.info("device_formatted", device=str(device), fs_type=fs_type)


async def mount(source: Path, target: Path, fs_type: str, options: Sequence[str] = ()) -> None:
    """Mount the filesystem on source at the existing directory target. Raises MountError."""
    argv = ["mount", "-t", fs_type]
    if options:
        argv += ["-o", ",".join(options)]
    await run(*argv, str(source), str(target), timeout_s=QUICK_TIMEOUT_S)


async def bind_mount(source: Path, target: Path, *, readonly: bool) -> None:
    """Bind source (a directory or a device node) onto the existing target, read-only if asked.

    A bind ignores "ro" on its first call, hence the remount; when the remount fails the bind is
    undone so a writable mount is never left behind. Raises MountError.
    """
    await run("mount", "--bind", str(source), str(target), timeout_s=QUICK_TIMEOUT_S)
    if not readonly:
        return
    try:
        await run("mount", "-o", "remount,bind,ro", str(target), timeout_s=QUICK_TIMEOUT_S)
    except MountError:
        await unmount(target)
        raise


async def unmount(target: Path) -> None:
    """Unmount every layer mounted at target; a path that is not mounted (or missing) is a no-op."""
    for _ in range(_MAX_UNMOUNT_LAYERS):
        if await mount_info(target) is None:
            return
        await run("umount", str(target), timeout_s=QUICK_TIMEOUT_S)
    raise MountError(("umount", str(target)), f"still mounted after {_MAX_UNMOUNT_LAYERS} unmounts")


async def mount_info(path: Path) -> MountInfo | None:
    """Return the topmost mount whose mount point is path (symlinks resolved), or None."""
    return await asyncio.to_thread(_read_mount_info, path)


async def mount_points_showing(path: Path) -> list[str]:
    """Every mount point showing what is at ``path`` (a directory or a device node, symlinks resolved): the mounts
    of the same filesystem and subtree (st_dev and root) as the one holding it, ``path``'s own mount included when
    it is a mount point; a bind of a device node shows as the node's filesystem with the node as its root."""
    return await asyncio.to_thread(_mount_points_showing, path)


async def is_mountpoint(path: Path) -> bool:
    """True when something is mounted exactly at path."""
    return await mount_info(path) is not None


async def resize_fs(device: Path, mount_path: Path, fs_type: str) -> None:
    """Grow the mounted filesystem to fill its device (online). Idempotent: a full fs stays as is.

    ext3/ext4 are grown through the device (resize2fs), xfs through a mount point (xfs_growfs -d).
    """
    if fs_type in ("ext3", "ext4"):
        await run("resize2fs", str(device), timeout_s=RESIZE_TIMEOUT_S)
    elif fs_type == "xfs":
        await run("xfs_growfs", "-d", str(mount_path), timeout_s=RESIZE_TIMEOUT_S)
    else:
        raise InvalidRequest(f"cannot grow a {fs_type!r} filesystem; supported: {', '.join(SUPPORTED_FS_TYPES)}")
    log.info("filesystem_resized", device=str(device), fs_type=fs_type)


async def device_size_bytes(device: Path) -> int:
    """Return the size of the block device in bytes (blockdev --getsize64). Raises MountError."""
    argv = ("blockdev", "--getsize64", str(device))
    result = await run(*argv, timeout_s=QUICK_TIMEOUT_S)
    try:
        return int(result.stdout.strip())
    except ValueError as exc:
        raise MountError(argv, f"unexpected output {result.stdout[:80]!r}") from exc


async def fs_stats(path: Path) -> FsStats:
    """Return byte and inode usage of the filesystem mounted at path. Raises MountError on I/O errors."""
    try:
        st = await asyncio.to_thread(os.statvfs, path)
    except OSError as exc:
        raise MountError(("statvfs", str(path)), _os_error_detail(exc)) from exc
    return FsStats(
        total_bytes=st.f_blocks * st.f_frsize,
        used_bytes=max(st.f_blocks - st.f_bfree, 0) * st.f_frsize,
        available_bytes=st.f_bavail * st.f_frsize,
        total_inodes=st.f_files,
        used_inodes=max(st.f_files - st.f_ffree, 0),
        free_inodes=st.f_ffree,
    )


async def path_info(path: Path) -> PathInfo | None:
    """Stat path following symlinks; None when it (or its symlink target) does not exist (ENOENT, ENOTDIR).
    Any other OSError (EIO from a filesystem that hit I/O errors or was shut down, EACCES ...) is MountError."""
    try:
        return await asyncio.to_thread(_path_info, path)
    except OSError as exc:
        raise MountError(("stat", str(path)), _os_error_detail(exc)) from exc


async def make_dir(path: Path) -> None:
    """mkdir -p path. Raises MountError."""
    await _fs_call("mkdir", path, lambda: path.mkdir(parents=True, exist_ok=True))


async def make_file(path: Path) -> None:
    """Create an empty regular file at path (and its parent directories) if nothing is there."""
    await make_dir(path.parent)
    await _fs_call("touch", path, lambda: path.touch(exist_ok=True))


async def remove_path(path: Path) -> None:
    """Remove the empty directory or the empty file at path (what NodePublish creates); a missing path is a no-op.

    Never deletes data: a non-empty directory or file (someone else's, e.g. a hostile target_path such as
    /etc/passwd) raises PreconditionFailed and stays.
    """
    await _fs_call("rm", path, lambda: _remove(path))


def _remove(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        with os.scandir(path) as entries:  # closed at once: an abandoned iterator warns when collected
            has_entries = any(True for _ in entries)
        if has_entries:
            raise PreconditionFailed(f"{path} is a non-empty directory that is not mounted; refusing to delete it")
        path.rmdir()
    elif stat.S_ISREG(info.st_mode) and info.st_size > 0:
        raise PreconditionFailed(f"{path} is a non-empty file that this plugin did not create; refusing to delete it")
    else:
        path.unlink()


async def _fs_call(verb: str, path: Path, call: Callable[[], object]) -> None:
    try:
        await asyncio.to_thread(call)
    except OSError as exc:
        raise MountError((verb, str(path)), _os_error_detail(exc)) from exc


def _os_error_detail(exc: OSError) -> str:
    """``EIO (Input/output error)``: the errno's name, which a reader can look up, then the system's words."""
    name = errno.errorcode.get(exc.errno, f"errno {exc.errno}") if exc.errno is not None else "no errno"
    return f"{name} ({exc.strerror or exc})"


def _path_info(path: Path) -> PathInfo | None:
    try:
        resolved = path.resolve(strict=True)
        st = resolved.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    is_block = stat.S_ISBLK(st.st_mode)
    return PathInfo(resolved, is_block, stat.S_ISDIR(st.st_mode), st.st_rdev if is_block else 0)


def _read_mount_info(path: Path) -> MountInfo | None:
    wanted = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            info = parse_mountinfo_line(line)
            if info is not None and info.mount_point == wanted:
                found = info  # later lines are mounted on top of earlier ones
    return found


def _mount_points_showing(path: Path) -> list[str]:
    wanted = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as lines:
        table = [info for info in map(parse_mountinfo_line, lines) if info is not None]
    holders = [m for m in table if wanted == m.mount_point or wanted.startswith(m.mount_point.rstrip("/") + "/")]
    if not holders:
        return []
    holder = max(holders, key=lambda m: len(m.mount_point))  # the deepest; the last of equals is on top
    holder = [m for m in holders if m.mount_point == holder.mount_point][-1]
    inside = os.path.relpath(wanted, holder.mount_point)
    root = os.path.normpath(os.path.join(holder.root, inside)) if inside != "." else holder.root
    return [m.mount_point for m in table if (m.device_number, m.root) == (holder.device_number, root)]


def parse_mountinfo_line(line: str) -> MountInfo | None:
    """Parse one /proc/self/mountinfo line (proc(5)); None when it is malformed."""
    left, sep, right = line.rstrip("\n").partition(" - ")
    fields, tail = left.split(" "), right.split(" ")
    if not sep or len(fields) < 6 or len(tail) < 3:
        return None
    major, _, minor = fields[2].partition(":")
    if not (major.isdigit() and minor.isdigit()):
        return None
    return MountInfo(
        mount_point=_unescape(fields[4]),
        root=_unescape(fields[3]),
        source=_unescape(tail[1]),
        fstype=tail[0],
        options=frozenset(fields[5].split(",")),
        super_options=frozenset(tail[2].split(",")),
        device_number=os.makedev(int(major), int(minor)),
    )


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes (\\040 for space, \\011, \\012, \\134) in mountinfo paths."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)
