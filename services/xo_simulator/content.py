"""VDI content as XAPI streams it: a backing file exported as a dynamic VHD (allocated 2 MiB blocks only) or
raw, and a VHD or raw body imported into a backing file, kept sparse.

Chunk by chunk, never the whole disk in memory; blocking file work runs in worker threads. ``path`` None is
plain mode (no backing file): the disk reads as zeros and an import is parsed, checked and discarded. HTTP,
authentication and XO's checks live in rest.py; the VHD format in shared/vhd.py and shared/vhd_stream.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from shared import vhd
from shared.vhd_stream import ByteReader, iter_blocks, read_head

BLOCK = vhd.BLOCK_BYTES
SEGMENT = 64 * 1024  # sparseness granularity of imports
T = TypeVar("T")
_ZEROS = bytes(BLOCK)


class ContentError(Exception):
    """The body cannot be written into the VDI (too large, short); rest.py answers it as XAPI's VDI_IO_ERROR."""


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The (first, end) byte ranges of ``fd`` within [start, end) that hold data (SEEK_DATA/SEEK_HOLE)."""
    offset = start
    while offset < end:
        try:
            first = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            raise
        if first >= end:
            return
        last = min(os.lseek(fd, first, os.SEEK_HOLE), end)
        yield first, last
        offset = last


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:  # short reads only near EOF or on signals; read the rest or pad past EOF
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            return data + bytes(length - len(data))
        data += more
    return data


@contextlib.contextmanager
def _opened(path: Path, flags: int) -> Iterator[int]:
    """An fd of its own for each worker-thread step: a step still running after its caller was cancelled then
    never touches a descriptor that was closed (and perhaps reused for another file)."""
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ContentError(f"the backing file of the VDI cannot be opened: {exc.strerror}") from exc
    try:
        yield fd
    finally:
        os.close(fd)


def allocated_blocks(path: Path, size: int) -> list[int]:
    """Indexes of the 2 MiB blocks holding at least one byte of a data extent, ascending."""
    blocks: list[int] = []
    with _opened(path, os.O_RDONLY) as fd:
        for first, end in data_extents(fd, 0, size):
            for index in range(first // BLOCK, (end - 1) // BLOCK + 1):
                if not blocks or blocks[-1] < index:
                    blocks.append(index)
    return blocks


def read_block(path: Path, index: int, size: int) -> tuple[bytes, bytes]:
    """(sector bitmap, 2 MiB data) of block ``index``; past the disk's end the block is zero-padded."""
    start = index * BLOCK
    end = min(start + BLOCK, size)
    with _opened(path, os.O_RDONLY) as fd:
        data = _pread(fd, end - start, start)
        sectors = [((first - start) // vhd.SECTOR_BYTES, vhd.sectors_of(last - start))
                   for first, last in data_extents(fd, start, end)]
    if len(data) < BLOCK:
        data += bytes(BLOCK - len(data))
    return vhd.bitmap_of(sectors), data


def _read_window(path: Path | None, offset: int, length: int) -> bytes:
    if path is None:
        return _ZEROS if length == BLOCK else bytes(length)
    with _opened(path, os.O_RDONLY) as fd:
        if next(data_extents(fd, offset, offset + length), None) is None:
            return _ZEROS if length == BLOCK else bytes(length)
        return _pread(fd, length, offset)


async def _read_ahead(calls: Sequence[Callable[[], T]]) -> AsyncGenerator[T, None]:
    """The results of ``calls``, each run in a worker thread while the caller still handles the previous one."""
    ahead: asyncio.Future[T] | None = None
    try:
        for position, call in enumerate(calls):
            current = ahead or asyncio.ensure_future(asyncio.to_thread(call))
            following = calls[position + 1] if position + 1 < len(calls) else None
            ahead = asyncio.ensure_future(asyncio.to_thread(following)) if following is not None else None
            yield await current
    finally:
        if ahead is not None:
            ahead.cancel()  # its thread finishes on its own descriptor


async def export_vhd(path: Path | None, size: int, unique_id: bytes) -> AsyncGenerator[bytes, None]:
    """The VDI as a dynamic VHD: head, then bitmap + data of each allocated block in index order, then footer.

    Its length is ``vhd.stream_length(size, allocated)``; it is sent without a Content-Length, as XO does.
    """
    blocks = await asyncio.to_thread(allocated_blocks, path, size) if path is not None else []
    head, footer = vhd.build_head(size, blocks, unique_id=unique_id, timestamp=vhd.vhd_timestamp())
    yield head
    if path is not None:
        reads = [functools.partial(read_block, path, index, size) for index in blocks]
        async with contextlib.aclosing(_read_ahead(reads)) as results:
            async for bitmap, data in results:
                yield bitmap
                yield data
    yield footer.pack()


async def export_raw(path: Path | None, size: int) -> AsyncGenerator[bytes, None]:
    """The VDI's ``size`` bytes, holes as zeros (not sparse: XO's raw export is the whole disk)."""
    reads = [functools.partial(_read_window, path, offset, min(BLOCK, size - offset))
             for offset in range(0, size, BLOCK)]
    async with contextlib.aclosing(_read_ahead(reads)) as windows:
        async for window in windows:
            yield window


def _is_zero(data: memoryview) -> bool:
    return data == memoryview(_ZEROS)[:len(data)]  # a memcmp, not a Python loop


def _write_sparse(path: Path, offset: int, data: bytes | bytearray) -> None:
    """Write ``data`` at ``offset`` keeping the file sparse: a 64 KiB segment of zeros is not written where the
    file has a hole (and zeroed where it has data, so the content is exact either way)."""
    view = memoryview(data)
    with _opened(path, os.O_WRONLY) as fd:
        run_start = None  # start of the pending run of non-zero segments
        for start in range(0, len(view), SEGMENT):
            if _is_zero(view[start:start + SEGMENT]):
                if run_start is not None:
                    os.pwrite(fd, view[run_start:start], offset + run_start)
                    run_start = None
                _zero(fd, offset + start, offset + min(start + SEGMENT, len(view)))
            elif run_start is None:
                run_start = start
        if run_start is not None:
            os.pwrite(fd, view[run_start:], offset + run_start)


def _zero(fd: int, start: int, end: int) -> None:
    for first, last in list(data_extents(fd, start, end)):
        os.pwrite(fd, bytes(last - first), first)


def _zero_blocks_except(path: Path, kept: Collection[int], size: int) -> None:
    with _opened(path, os.O_WRONLY) as fd:
        for first, end in list(data_extents(fd, 0, size)):
            for index in range(first // BLOCK, (end - 1) // BLOCK + 1):
                if index not in kept:
                    start = index * BLOCK
                    _zero(fd, max(start, first), min(start + BLOCK, end))


def _fsync(path: Path) -> None:
    with _opened(path, os.O_WRONLY) as fd:
        os.fsync(fd)


class _Writer:
    """Writes blocks into a backing file (or nowhere in plain mode), one write in flight while the next block
    arrives from the network; a failed write surfaces at the next call. Each write runs on its own descriptor."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._pending: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, path: Path | None) -> _Writer:
        """A writer for ``path``, checked writable now (ContentError) rather than at the first block."""
        if path is not None:
            await asyncio.to_thread(_fsync, path)
        return cls(path)

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        await self._settle()
        if self._path is not None:
            self._pending = asyncio.ensure_future(asyncio.to_thread(_write_sparse, self._path, offset, data))

    async def _settle(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def finish(self, kept: Collection[int] | None = None, size: int = 0) -> None:
        """Wait for the last write; zero the blocks not in ``kept`` (when given) below ``size``; fsync."""
        await self._settle()
        if self._path is not None:
            if kept is not None:
                await asyncio.to_thread(_zero_blocks_except, self._path, kept, size)
            await asyncio.to_thread(_fsync, self._path)

    async def close(self) -> None:
        """After a failure: let the write in flight land (XO keeps what was written); its own error, if any, is
        secondary to the one being raised."""
        with contextlib.suppress(OSError, ContentError):
            await self._settle()


async def import_raw(path: Path | None, vdi_size: int, length: int, chunks: AsyncIterator[bytes]) -> None:
    """Write ``length`` raw bytes at offset 0; refuses a body longer than the VDI before writing anything.

    Raises ContentError when the body is longer than the VDI or ends before ``length``; what was written
    stays (XO does not roll an import back).
    """
    if length > vdi_size:
        raise ContentError(f"the raw content ({length} bytes) is larger than the VDI ({vdi_size} bytes)")
    writer = await _Writer.open(path)
    reader = ByteReader(chunks)
    try:
        for offset in range(0, length, BLOCK):
            try:
                data = await reader.read_exactly(min(BLOCK, length - offset), f"raw byte {offset}")
            except vhd.VhdTruncated as exc:
                raise ContentError(f"the body ended at byte {reader.position} of {length}") from exc
            await writer.write(offset, data)
        await writer.finish()
    finally:
        await writer.close()


async def import_vhd(path: Path | None, vdi_size: int, chunks: AsyncIterator[bytes]) -> int:
    """Write a dynamic VHD's content: allocated blocks (sectors outside their bitmap as zeros), zeros elsewhere.

    Returns the number of allocated blocks read. Raises VhdError for a malformed or truncated VHD (blocks
    before the fault stay written) and ContentError when the VHD's disk is larger than the VDI (nothing written).
    """
    reader = ByteReader(chunks)
    head, _ = await read_head(reader)
    disk_size = head.footer.current_size
    if disk_size > vdi_size:
        raise ContentError(f"the VHD's disk ({disk_size} bytes) is larger than the VDI ({vdi_size} bytes)")
    writer = await _Writer.open(path)
    written: set[int] = set()
    try:
        async for block in iter_blocks(head, reader):
            offset = block.index * BLOCK
            data = vhd.mask(block.bitmap, block.data)
            await writer.write(offset, data[:disk_size - offset] if offset + BLOCK > disk_size else data)
            written.add(block.index)
        await writer.finish(written, disk_size)
    finally:
        await writer.close()
    return len(written)
