"""VDI content as XAPI streams it: a backing file exported as a dynamic VHD (allocated 2 MiB blocks only) or
raw, and a VHD or raw body imported into a backing file, kept sparse.

Chunk by chunk, never the whole disk in memory; blocking file work runs in worker threads. ``path`` None is
plain mode (no backing file): the disk reads as zeros and an import is parsed, checked and discarded. HTTP,
authentication and XO's checks live in rest.py; the VHD format in shared/vhd.py and shared/vhd_stream.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterator
from pathlib import Path

from shared import vhd
from shared.vhd_stream import ByteReader, iter_blocks, read_head

BLOCK = vhd.BLOCK_BYTES
SEGMENT = 64 * 1024  # sparseness granularity of imports
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


def allocated_blocks(fd: int, size: int) -> list[int]:
    """Indexes of the 2 MiB blocks holding at least one byte of a data extent, ascending."""
    blocks: list[int] = []
    for first, end in data_extents(fd, 0, size):
        for index in range(first // BLOCK, (end - 1) // BLOCK + 1):
            if not blocks or blocks[-1] < index:
                blocks.append(index)
    return blocks


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:  # short reads only near EOF or on signals; read the rest or pad past EOF
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            return data + bytes(length - len(data))
        data += more
    return data


def read_block(fd: int, index: int, size: int) -> tuple[bytes, bytes]:
    """(sector bitmap, 2 MiB data) of block ``index``; past the disk's end the block is zero-padded."""
    start = index * BLOCK
    end = min(start + BLOCK, size)
    data = _pread(fd, end - start, start)
    if len(data) < BLOCK:
        data += bytes(BLOCK - len(data))
    sectors = [((first - start) // vhd.SECTOR_BYTES, vhd.sectors_of(last - start))
               for first, last in data_extents(fd, start, end)]
    return vhd.bitmap_of(sectors), data


def _open(path: Path | None, flags: int) -> int | None:
    if path is None:
        return None
    try:
        return os.open(path, flags)
    except OSError as exc:
        raise ContentError(f"the backing file of the VDI cannot be opened: {exc.strerror}") from exc


async def export_vhd(path: Path | None, size: int, unique_id: bytes) -> AsyncGenerator[bytes, None]:
    """The VDI as a dynamic VHD: head, then bitmap + data of each allocated block in index order, then footer.

    Its length is ``vhd.stream_length(size, allocated)``; it is sent without a Content-Length, as XO does.
    """
    fd = await asyncio.to_thread(_open, path, os.O_RDONLY)
    try:
        blocks = await asyncio.to_thread(allocated_blocks, fd, size) if fd is not None else []
        head, footer = vhd.build_head(size, blocks, unique_id=unique_id, timestamp=vhd.vhd_timestamp())
        yield head
        for index in blocks:
            assert fd is not None
            bitmap, data = await asyncio.to_thread(read_block, fd, index, size)
            yield bitmap
            yield data
        yield footer.pack()
    finally:
        if fd is not None:
            os.close(fd)


def _read_window(fd: int | None, offset: int, length: int) -> bytes:
    if fd is None or next(data_extents(fd, offset, offset + length), None) is None:
        return _ZEROS if length == BLOCK else bytes(length)
    return _pread(fd, length, offset)


async def export_raw(path: Path | None, size: int) -> AsyncGenerator[bytes, None]:
    """The VDI's ``size`` bytes, holes as zeros (not sparse: XO's raw export is the whole disk)."""
    fd = await asyncio.to_thread(_open, path, os.O_RDONLY)
    try:
        for offset in range(0, size, BLOCK):
            yield await asyncio.to_thread(_read_window, fd, offset, min(BLOCK, size - offset))
    finally:
        if fd is not None:
            os.close(fd)


def _is_zero(data: memoryview) -> bool:
    return data == memoryview(_ZEROS)[:len(data)]  # a memcmp, not a Python loop


class _SparseWriter:
    """Writes blocks into a backing file, keeping it sparse: 64 KiB segments of zeros are not written where the
    file has a hole (and are zeroed where it has data, so the content is still exact)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        if self._fd is not None:
            await asyncio.to_thread(self._write, offset, data)

    def _write(self, offset: int, data: bytes | bytearray) -> None:
        assert self._fd is not None
        view = memoryview(data)
        run_start = None  # start of the pending run of non-zero segments
        for start in range(0, len(view), SEGMENT):
            if _is_zero(view[start:start + SEGMENT]):
                if run_start is not None:
                    os.pwrite(self._fd, view[run_start:start], offset + run_start)
                    run_start = None
                self._zero(offset + start, offset + min(start + SEGMENT, len(view)))
            elif run_start is None:
                run_start = start
        if run_start is not None:
            os.pwrite(self._fd, view[run_start:], offset + run_start)

    def _extents(self, size: int) -> list[tuple[int, int]]:
        assert self._fd is not None
        return list(data_extents(self._fd, 0, size))

    def _zero(self, start: int, end: int) -> None:
        assert self._fd is not None
        for first, last in list(data_extents(self._fd, start, end)):
            os.pwrite(self._fd, bytes(last - first), first)

    async def zero_blocks_except(self, kept: Collection[int], size: int) -> None:
        """Zero every block of [0, size) not in ``kept`` that holds data now (nothing to do on a fresh VDI)."""
        if self._fd is None:
            return
        for first, end in await asyncio.to_thread(self._extents, size):
            for index in range(first // BLOCK, (end - 1) // BLOCK + 1):
                if index not in kept:
                    start = index * BLOCK
                    await asyncio.to_thread(self._zero, max(start, first), min(start + BLOCK, end))

    async def finish(self) -> None:
        if self._fd is not None:
            await asyncio.to_thread(os.fsync, self._fd)


async def import_raw(path: Path | None, vdi_size: int, length: int, chunks: AsyncIterator[bytes]) -> None:
    """Write ``length`` raw bytes at offset 0; refuses a body longer than the VDI before writing anything.

    Raises ContentError when the body is longer than the VDI or ends before ``length``; what was written
    stays (XO does not roll an import back).
    """
    if length > vdi_size:
        raise ContentError(f"the raw content ({length} bytes) is larger than the VDI ({vdi_size} bytes)")
    fd = await asyncio.to_thread(_open, path, os.O_WRONLY)
    try:
        writer = _SparseWriter(fd)
        reader = ByteReader(chunks)
        for offset in range(0, length, BLOCK):
            try:
                data = await reader.read_exactly(min(BLOCK, length - offset), f"raw byte {offset}")
            except vhd.VhdTruncated as exc:
                raise ContentError(f"the body ended at byte {reader.position} of {length}") from exc
            await writer.write(offset, data)
        await writer.finish()
    finally:
        if fd is not None:
            os.close(fd)


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
    fd = await asyncio.to_thread(_open, path, os.O_WRONLY)
    try:
        writer = _SparseWriter(fd)
        written: set[int] = set()
        async for block in iter_blocks(head, reader):
            offset = block.index * BLOCK
            data = vhd.mask(block.bitmap, block.data)
            await writer.write(offset, data[:disk_size - offset] if offset + BLOCK > disk_size else data)
            written.add(block.index)
        await writer.zero_blocks_except(written, disk_size)
        await writer.finish()
    finally:
        if fd is not None:
            os.close(fd)
    return len(written)
