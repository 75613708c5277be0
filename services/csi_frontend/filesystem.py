"""A volume's filesystem on the node, as k8s.io/mount-utils ``SafeFormatAndMount`` treats it (m4rCsi's rules):
format only a blank device, ``fsck -a`` before a read-write mount of ext*, and grow a filesystem that is smaller
than its device (offline expansion: XO grows a disk only while it is detached, so NodeStageVolume finds it larger).

Policy only; the OS tools run through ``mounter.run`` (bounded, MountError on failure). node.py calls ``stage``
and ``grow_mounted``; nothing here knows about CSI requests. The long commands (mkfs, fsck, resize2fs, xfs_growfs)
run in ``DeviceJobs``, never on the RPC's own task, so that no caller's deadline kills them halfway.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from services.csi_frontend import mounter
from services.csi_frontend.validation import Access
from shared.errors import OperationPending, PreconditionFailed
from shared.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")

EXT_TYPES = ("ext3", "ext4")
CHECK_TIMEOUT_S = 600.0
"""fsck -a / e2fsck -f read every group's metadata when a check is due; slow disks take minutes."""

# fsck(8) exit status is a bit mask: 1 = errors corrected, 2 = corrected, reboot advised (root fs only),
# 4 = errors left uncorrected, 8 = operational error, 16 = usage, 32 = cancelled, 128 = shared library error.
_FSCK_CORRECTED = (1, 2, 3)
_FSCK_REFUSE_FROM = 4
_DUMPE2FS_FIELD = re.compile(r"^Block (count|size):\s+(\d+)\s*$", re.MULTILINE)
_XFS_DATA = re.compile(r"^data\s*=.*?bsize=(\d+)\s+blocks=(\d+)", re.MULTILINE)
_XFS_INFO_ARGS = ("xfs_info",)


class FilesystemCorrupt(PreconditionFailed, code="filesystem_corrupt"):
    """fsck found errors on the volume's filesystem that ``fsck -a`` may not repair unattended.

    FAILED_PRECONDITION (CSI: "the system is not in a state required"): a retry finds the same damage; an
    administrator must run fsck by hand (the message names the device and what fsck said). mount-utils answers
    its HasFilesystemErrors for exit 4 the same way, by refusing the mount.
    """


async def stage(device: Path, staging_path: Path, access: Access, *, give_up_at: float | None = None) -> str:
    """Format a blank device, check and grow it as mount-utils would, and mount it at ``staging_path`` (an
    existing directory). Returns the filesystem type mounted.

    Read-write mounts of ext*: ``fsck -a`` first (exit 1-3 corrected: logged, go on; 4 and above:
    FilesystemCorrupt), then, when the device is larger than the filesystem, ``e2fsck -f -p`` + ``resize2fs``
    *before* mounting (offline growth needs no CAP_SYS_RESOURCE). xfs grows after mounting (``xfs_growfs -d``,
    it only grows mounted) and is mounted ``nouuid`` (a clone shares its source's UUID). Read-only mounts are never
    checked, formatted or grown.

    Everything before the mount, and the xfs growth, is the device's job in ``JOBS``: still running at
    ``give_up_at`` (loop time), it goes on and this raises OperationPending; a retry joins it.
    """
    fs_type, formatted = await JOBS.run(device, ("prepare", access), lambda: _prepare(device, access), give_up_at,
                                        for_path=staging_path)
    await mounter.mount(device, staging_path, fs_type, _mount_options(fs_type, access))
    if not access.is_stage_readonly and not formatted and fs_type == "xfs":
        await grow_mounted(device, staging_path, fs_type, give_up_at=give_up_at)
    return fs_type


async def _prepare(device: Path, access: Access) -> tuple[str, bool]:
    """stage's work before the mount: (fs type to mount, whether it was formatted now)."""
    fs_type, formatted = await _ensure_filesystem(device, access)
    if not access.is_stage_readonly and not formatted and fs_type in EXT_TYPES:
        await check(device)
        await _grow_ext_offline(device)
    return fs_type, formatted


def _mount_options(fs_type: str, access: Access) -> tuple[str, ...]:
    """The staging mount's options: xfs always gets ``nouuid``. A clone (CLONE_VOLUME) is a block copy, so its xfs
    UUID is its source's, and the kernel refuses a second mount of a UUID already mounted ("Filesystem has
    duplicate UUID"): source and clone could never be staged on one node. The AWS EBS and GCE PD CSI drivers
    mount xfs with ``nouuid`` for the same reason (their snapshots and clones are block copies too)."""
    options = access.stage_options()
    if fs_type == "xfs" and "nouuid" not in options:
        options += ("nouuid",)
    return options


async def check(device: Path) -> None:
    """``fsck -a device``, with mount-utils' reading of its exit code: 0 clean; 1-3 errors corrected (logged);
    4 and above FilesystemCorrupt naming the device and fsck's output. No fsck installed: a warning, go on.

    mount-utils goes on after exit 8 and above too (it only logs them); here they refuse the mount as well,
    since an fsck that could not even run (8: operational error, e.g. a superblock whose checksum fails) says
    nothing good about the filesystem.
    """
    if shutil.which("fsck") is None:
        log.warning("fsck_missing", device=str(device), note="mounting without a filesystem check")
        return
    JOBS.note(device, "checking")
    result = await mounter.run("fsck", "-a", str(device), timeout_s=CHECK_TIMEOUT_S, ok_codes=range(256))
    _judge_check(device, "fsck -a", result)


def _judge_check(device: Path, what: str, result: mounter.CommandResult) -> None:
    code = result.returncode
    if code >= _FSCK_REFUSE_FROM:
        said = _last_lines(result.stdout + result.stderr)
        raise FilesystemCorrupt(
            f"`{what} {device}` exited {code}: the filesystem has errors it cannot repair unattended ({said}); "
            f"run `e2fsck {device}` by hand on the node (with the volume unpublished), then retry")
    if code in _FSCK_CORRECTED:
        log.warning("filesystem_errors_corrected", device=str(device), tool=what, exit_code=code)


async def grow_mounted(device: Path, mount_path: Path, fs_type: str, *, give_up_at: float | None = None) -> bool:
    """Grow the mounted filesystem to fill its device (NodeExpandVolume; xfs in NodeStageVolume). True when it
    grew; a filesystem already filling its device is left alone. Online ext* growth needs CAP_SYS_RESOURCE.

    The device's job in ``JOBS``, as in ``stage``: OperationPending at ``give_up_at`` while it goes on."""
    return await JOBS.run(device, ("grow", fs_type), lambda: _grow_mounted(device, mount_path, fs_type), give_up_at)


async def _grow_mounted(device: Path, mount_path: Path, fs_type: str) -> bool:
    JOBS.note(device, "growing")
    device_bytes = await mounter.device_size_bytes(device)
    fs_bytes, block_bytes = await size_of(device, fs_type, mount_path)
    if device_bytes - fs_bytes < block_bytes:
        return False
    await mounter.resize_fs(device, mount_path, fs_type)
    log.info("filesystem_grown", device=str(device), fs_type=fs_type, online=True, from_bytes=fs_bytes,
             device_bytes=device_bytes)
    return True


async def _grow_ext_offline(device: Path) -> None:
    device_bytes = await mounter.device_size_bytes(device)
    fs_bytes, block_bytes = await size_of(device, "ext4")
    if device_bytes - fs_bytes < block_bytes:
        return
    # resize2fs refuses a filesystem not fully checked since it was last mounted: e2fsck -f first.
    JOBS.note(device, "checking")
    result = await mounter.run("e2fsck", "-f", "-p", str(device), timeout_s=CHECK_TIMEOUT_S, ok_codes=range(256))
    _judge_check(device, "e2fsck -f -p", result)
    JOBS.note(device, "growing")
    await mounter.run("resize2fs", str(device), timeout_s=mounter.RESIZE_TIMEOUT_S)
    log.info("filesystem_grown", device=str(device), online=False, from_bytes=fs_bytes, device_bytes=device_bytes)


async def size_of(device: Path, fs_type: str, mount_path: Path | None = None) -> tuple[int, int]:
    """(filesystem size, block size) in bytes: ext* from its superblock (dumpe2fs -h), xfs from xfs_info of
    its mount point (or of the device, unmounted)."""
    if fs_type in EXT_TYPES:
        result = await mounter.run("dumpe2fs", "-h", str(device), timeout_s=mounter.QUICK_TIMEOUT_S)
        fields = {name: int(value) for name, value in _DUMPE2FS_FIELD.findall(result.stdout)}
        if set(fields) != {"count", "size"}:
            raise mounter.MountError(result.argv, "no 'Block count' and 'Block size' in its output")
        return fields["count"] * fields["size"], fields["size"]
    result = await mounter.run(*_XFS_INFO_ARGS, str(mount_path or device), timeout_s=mounter.QUICK_TIMEOUT_S)
    match = _XFS_DATA.search(result.stdout)
    if match is None:
        raise mounter.MountError(result.argv, "no data section (bsize=, blocks=) in its output")
    block_bytes = int(match.group(1))
    return int(match.group(2)) * block_bytes, block_bytes


async def _ensure_filesystem(device: Path, access: Access) -> tuple[str, bool]:
    """(fs type to mount, whether it was formatted now). Formats only a blank device; never over data."""
    found = await mounter.probe_fstype(device)
    if found is None:
        if access.is_reader_only:
            raise PreconditionFailed(f"{device} holds no filesystem and the access mode is read-only")
        fs_type = access.fs_type or mounter.DEFAULT_FS_TYPE
        JOBS.note(device, "formatting")
        await mounter.format_device(device, fs_type)
        return fs_type, True
    if found == access.fs_type or (access.fs_type is None and found in mounter.SUPPORTED_FS_TYPES):
        return found, False
    wanted = access.fs_type or f"one of {', '.join(mounter.SUPPORTED_FS_TYPES)}"
    raise PreconditionFailed(f"{device} already holds {found}, not {wanted}; refusing to format over existing data")


def _last_lines(text: str, lines: int = 3) -> str:
    kept: Sequence[str] = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " / ".join(kept)[-300:] or "no output"


@dataclass
class _Job:
    purpose: Hashable
    task: asyncio.Task[Any]
    doing: str
    """What the job does now, for the ABORTED answer: checking, formatting or growing."""
    for_path: Path | None = None
    """The staging path a stage's job prepares the device for (None for a grow of a mounted filesystem)."""


class DeviceJobs:
    """The work that prepares a device (mkfs, fsck, ``e2fsck -f`` + ``resize2fs``, ``xfs_growfs``) as one task per
    device, which no RPC's deadline or cancellation kills.

    Why: the interceptor cuts a handler at the caller's deadline (kubelet's is 2 min), and a command killed there
    either leaves the filesystem corrupt (an offline resize2fs: every retry then finds "fsck -a exited 4") or
    starts over at each retry and never ends (a long fsck or mkfs). CSI §Timeouts wants a retry to continue where
    the first call left off. So ``run`` starts the device's job, or joins the one running for the same purpose
    (kubelet's retry), and awaits it shielded until ``give_up_at``; then OperationPending (ABORTED, which kubelet
    retries) while the job goes on. A job for another purpose is awaited first: two jobs never share a device. A
    finished job is forgotten (its outcome logged): the next call redoes the idempotent work, finding it done.

    One registry per process (``JOBS``), as a device is one whichever servicer stages it. Nothing stops a job at
    shutdown: asyncio.run cancels what is left, which kills its command as the process's exit would anyway.
    """

    def __init__(self) -> None:
        self._jobs: dict[Path, _Job] = {}

    async def run(self, device: Path, purpose: Hashable, work: Callable[[], Coroutine[Any, Any, T]],
                  give_up_at: float | None, *, for_path: Path | None = None) -> T:
        """The outcome (result or error) of ``device``'s job for ``purpose``, started with ``work()`` unless
        one runs. OperationPending "still <doing> <device>; retry" when ``give_up_at`` (loop time) comes first."""
        timer = asyncio.timeout_at(give_up_at)
        try:
            async with timer:
                while (job := self._jobs.get(device)) is not None and job.purpose != purpose:
                    await asyncio.wait((job.task,))  # waits without cancelling it or raising its error
                if job is None:
                    job = self._start(device, purpose, work(), for_path)
                else:
                    log.info("device_job_joined", device=str(device), doing=job.doing)
                return cast(T, await asyncio.shield(job.task))
        except TimeoutError as exc:
            running = self._jobs.get(device)
            if not timer.expired() or running is None:
                raise
            raise OperationPending(f"still {running.doing} {device}; retry") from exc

    def note(self, device: Path, doing: str) -> None:
        """Say what ``device``'s job does now (no job: nothing to say)."""
        if (job := self._jobs.get(device)) is not None:
            job.doing = doing

    def preparing(self, staging_path: Path) -> tuple[Path, str] | None:
        """(device, what it does) of the job preparing a device for ``staging_path``, or None. NodeUnstageVolume
        asks: a stage cut before its mount leaves nothing mounted there, yet its job still writes to the disk,
        which must not be detached under it (a resize2fs cut by the detach corrupts the filesystem as a kill does)."""
        return next(((device, job.doing) for device, job in self._jobs.items() if job.for_path == staging_path), None)

    def _start(self, device: Path, purpose: Hashable, work: Coroutine[Any, Any, Any], for_path: Path | None) -> _Job:
        job = _Job(purpose, asyncio.create_task(work, name=f"device-job {device}"), "checking", for_path)
        self._jobs[device] = job
        job.task.add_done_callback(lambda task: self._finished(device, job))
        return job

    def _finished(self, device: Path, job: _Job) -> None:
        if self._jobs.get(device) is job:
            del self._jobs[device]
        if job.task.cancelled():
            log.warning("device_job_cancelled", device=str(device), doing=job.doing)
        elif (error := job.task.exception()) is not None:  # retrieved here: a job nobody awaits any more
            log.info("device_job_finished", device=str(device), outcome="error", doing=job.doing, error=str(error))
        else:
            log.debug("device_job_finished", device=str(device), outcome="ok")


JOBS = DeviceJobs()
