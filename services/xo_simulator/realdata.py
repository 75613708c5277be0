"""Real data mode: one sparse file per VDI, loop devices for plugged VBDs, device symlinks per VM.

Layout: ``<backing_dir>/<sr uuid>/<vdi uuid>.img`` and ``<device_root>/<vm uuid>/<device> -> /dev/loopN``.
Every loop device this process attaches is recorded and detached by close(); device-changing steps
run in shielded, tracked tasks so a cancelled caller can never leak a loop device. Needs root.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from shared.logging import get_logger

from .errors import XapiError, backend_failure

log = get_logger(__name__)
T = TypeVar("T")
CHUNK_BYTES = 8 * 1024 * 1024
RELEASE_TIMEOUT_S = 5.0


@dataclass
class _Loop:
    device: str
    link: Path
    backing: Path


class RealData:
    """Backing files and loop devices of one simulator instance."""

    def __init__(self, backing_dir: Path, device_root: Path) -> None:
        self.backing_dir = backing_dir
        self.device_root = device_root
        self._loops: dict[str, _Loop] = {}
        self._pending: set[asyncio.Task[Any]] = set()

    @staticmethod
    def check_environment() -> None:
        """Raise RuntimeError unless running as root with losetup available."""
        if os.geteuid() != 0:
            raise RuntimeError("real data mode (--backing-dir/--device-root) needs root for loop devices")
        if shutil.which("losetup") is None:
            raise RuntimeError("real data mode needs losetup (util-linux)")

    def path(self, sr_id: str, vdi_id: str) -> Path:
        """The backing file of a VDI."""
        return self.backing_dir / sr_id / f"{vdi_id}.img"

    def loop_of(self, vbd_id: str) -> str | None:
        """The loop device of a plugged VBD."""
        loop = self._loops.get(vbd_id)
        return loop.device if loop else None

    def allocated_bytes(self, sr_id: str, vdi_id: str) -> int:
        """Bytes actually allocated by the backing file (0 if absent)."""
        try:
            return os.stat(self.path(sr_id, vdi_id)).st_blocks * 512
        except FileNotFoundError:
            return 0

    async def _guarded(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return await asyncio.shield(task)

    # -- files ---------------------------------------------------------------------------------------
    async def create(self, sr_id: str, vdi_id: str, size_bytes: int) -> None:
        """Create (or extend) the sparse backing file of a VDI."""
        await asyncio.to_thread(_truncate, self.path(sr_id, vdi_id), size_bytes, True)

    async def delete(self, sr_id: str, vdi_id: str) -> None:
        """Remove a backing file; absent is fine."""
        await asyncio.to_thread(self.path(sr_id, vdi_id).unlink, True)

    async def grow(self, sr_id: str, vdi_id: str, size_bytes: int) -> None:
        """Grow the backing file and refresh the size of any loop device on it (``losetup -c``)."""
        path = self.path(sr_id, vdi_id)
        await asyncio.to_thread(_truncate, path, size_bytes, False)
        for loop in list(self._loops.values()):
            if loop.backing == path:
                await _run("losetup", "-c", loop.device)

    def move_now(self, src: tuple[str, str], dst: tuple[str, str]) -> None:
        """Rename a backing file to another SR folder and uuid; loop devices keep the inode.

        Synchronous on purpose: a rename within one file system is a quick metadata operation, and doing
        it inline means a live migration cannot be cancelled between moving the file and the records.
        """
        old, new = self.path(*src), self.path(*dst)
        _rename(old, new)
        for loop in self._loops.values():
            if loop.backing == old:
                loop.backing = new

    async def copy(self, src: tuple[str, str], dst: tuple[str, str], rate_bps: int) -> None:
        """Copy the data extents of ``src`` into a new sparse ``dst`` at ``rate_bps`` (0 = unthrottled).

        Runs chunk by chunk in worker threads, so it is cancellable between chunks (the caller then
        deletes ``dst``).
        """
        source, target = self.path(*src), self.path(*dst)
        size = (await asyncio.to_thread(os.stat, source)).st_size
        await asyncio.to_thread(_truncate, target, size, True)
        src_fd = await asyncio.to_thread(os.open, source, os.O_RDONLY)
        try:
            dst_fd = await asyncio.to_thread(os.open, target, os.O_WRONLY)
            try:
                await _copy_extents(src_fd, dst_fd, size, rate_bps)
                await asyncio.to_thread(os.fsync, dst_fd)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)

    # -- devices -------------------------------------------------------------------------------------
    async def plug(self, vbd_id: str, vm_id: str, device: str, sr_id: str, vdi_id: str) -> str:
        """Attach the VDI file to a loop device and link ``<device_root>/<vm>/<device>`` to it."""
        return await self._guarded(self._plug(vbd_id, vm_id, device, self.path(sr_id, vdi_id)))

    async def _plug(self, vbd_id: str, vm_id: str, device: str, backing: Path) -> str:
        existing = self._loops.get(vbd_id)
        if existing is not None:
            return existing.device
        loop_device = await _run("losetup", "--find", "--show", str(backing))
        link = self.device_root / vm_id / device
        self._loops[vbd_id] = _Loop(loop_device, link, backing)
        await asyncio.to_thread(_symlink, link, loop_device)
        log.debug("loop_attached", vbd=vbd_id, device=loop_device, link=str(link))
        return loop_device

    async def unplug(self, vbd_id: str) -> None:
        """Remove the device link and detach the loop device of a VBD (no-op if none)."""
        await self._guarded(self._unplug(vbd_id))

    async def _unplug(self, vbd_id: str) -> None:
        loop = self._loops.pop(vbd_id, None)
        if loop is None:
            return
        await asyncio.to_thread(loop.link.unlink, True)
        await _run("losetup", "-d", loop.device)
        await _wait_released(loop.device, loop.backing)
        log.debug("loop_detached", vbd=vbd_id, device=loop.device)

    async def close(self) -> None:
        """Wait for in-flight device steps, then detach every loop device and remove every link."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        for vbd_id in list(self._loops):
            try:
                await self._unplug(vbd_id)
            except XapiError as exc:
                log.warning("loop_detach_failed", vbd=vbd_id, error=str(exc))


async def _run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise backend_failure(46, f"The VDI is not available [opterr={argv[0]} {argv[1]}: {err.decode().strip()}]")
    return out.decode().strip()


def _backing_of(device: str) -> str:
    try:
        return (Path("/sys/block") / Path(device).name / "loop" / "backing_file").read_text().strip()
    except OSError:
        return ""


async def _wait_released(device: str, backing: Path) -> None:
    """Wait (bounded) until the kernel lets ``device`` go: while another process (blkid, a device scanner) holds
    it open, ``losetup -d`` only marks it for auto-clear and it stays attached to our file."""
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + RELEASE_TIMEOUT_S
    delay_s = 0.005
    while _backing_of(device).startswith(str(backing)):
        if loop.time() > deadline_s:
            log.warning("loop_release_pending", device=device, backing=str(backing))
            return
        await asyncio.sleep(delay_s)  # waiting on the kernel: capped backoff, bounded above
        delay_s = min(delay_s * 2, 0.1)


def _truncate(path: Path, size_bytes: int, create: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_size < size_bytes:
            os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)


def _rename(old: Path, new: Path) -> None:
    new.parent.mkdir(parents=True, exist_ok=True)
    os.rename(old, new)


def _symlink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def _next_extent(fd: int, offset: int, size: int) -> tuple[int, int] | None:
    """The next (start, end) data extent at or after ``offset``, or None past the last one."""
    try:
        start = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise
    end = os.lseek(fd, start, os.SEEK_HOLE)
    return start, min(end, size)


def _copy_chunk(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    done = 0
    while done < length:
        data = os.pread(src_fd, length - done, offset + done)
        if not data:
            break
        os.pwrite(dst_fd, data, offset + done)
        done += len(data)
    return done


async def _copy_extents(src_fd: int, dst_fd: int, size: int, rate_bps: int) -> None:
    loop = asyncio.get_running_loop()
    started_s = loop.time()
    copied = 0
    offset = 0
    pace: Callable[[], Awaitable[None]] = _no_pace
    if rate_bps > 0:
        async def pace() -> None:
            # Simulated bandwidth, not synchronisation: hold the average at rate_bps.
            ahead_s = copied / rate_bps - (loop.time() - started_s)
            if ahead_s > 0:
                await asyncio.sleep(ahead_s)
    while offset < size:
        extent = await asyncio.to_thread(_next_extent, src_fd, offset, size)
        if extent is None:
            return
        start, end = extent
        position = start
        while position < end:
            length = min(CHUNK_BYTES, end - position)
            copied += await asyncio.to_thread(_copy_chunk, src_fd, dst_fd, position, length)
            position += length
            await pace()
        offset = end


async def _no_pace() -> None:
    return None
