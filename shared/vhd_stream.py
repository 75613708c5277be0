"""Streaming over VHD bytes: the exact length of a VHD stream from its head, and a block reader.

Everything works on an async iterator of byte chunks (an httpx response, an aiohttp request body) and holds at
most the head (footer copy, header, BAT) plus one block in memory. The format itself lives in shared/vhd.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from shared.vhd import (
    BITMAP_BYTES,
    FOOTER_BYTES,
    HEAD_TABLE_OFFSET,
    HEADER_BYTES,
    SECTOR_BYTES,
    Footer,
    Head,
    Header,
    VhdError,
    VhdTruncated,
    make_head,
)


class ByteReader:
    """Exact reads, skips and pass-through over an async iterator of chunks; ``position`` counts consumed bytes.

    Raises VhdTruncated (naming what it was reading) when the chunks end early.
    """

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""
        self.position = 0

    async def _next(self) -> bytes | None:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        async for data in self._chunks:
            if data:
                return bytes(data)
        return None

    def _keep(self, data: bytes, count: int) -> bytes:
        if len(data) > count:
            self._pending = data[count:]
            data = data[:count]
        self.position += len(data)
        return data

    async def read_exactly(self, count: int, what: str) -> bytes:
        """The next ``count`` bytes; VhdTruncated naming ``what`` if the stream ends first."""
        parts: list[bytes] = []
        needed = count
        while needed:
            data = await self._next()
            if data is None:
                raise VhdTruncated(f"the stream ended at byte {self.position}, {needed} bytes short of {what}")
            data = self._keep(data, needed)
            parts.append(data)
            needed -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def until(self, end: int, what: str) -> AsyncIterator[bytes]:
        """Yield the chunks up to absolute position ``end`` (the last one cut); VhdTruncated if it ends first."""
        while self.position < end:
            data = await self._next()
            if data is None:
                raise VhdTruncated(f"the stream ended at byte {self.position}, before {what} at byte {end}")
            yield self._keep(data, end - self.position)

    async def skip_to(self, end: int, what: str) -> None:
        """Discard everything up to absolute position ``end``."""
        async for _ in self.until(end, what):
            pass

    async def tail(self, count: int) -> bytes:
        """Read to the end of the stream and return its last ``count`` bytes (fewer if the stream is shorter)."""
        kept = b""
        while (data := await self._next()) is not None:
            self.position += len(data)
            kept = (kept + data)[-count:]
        return kept


async def read_head(reader: ByteReader) -> tuple[Head, bytes]:
    """Read and validate a VHD stream's head; returns it and its raw bytes (footer copy first)."""
    footer_raw = await reader.read_exactly(FOOTER_BYTES, "the VHD footer copy")
    footer = Footer.parse(footer_raw)
    header_raw = await reader.read_exactly(HEADER_BYTES, "the VHD header")
    header = Header.parse(header_raw, footer)
    gap = await reader.read_exactly(header.table_offset - HEAD_TABLE_OFFSET, "the bytes before the BAT")
    table_raw = await reader.read_exactly(header.max_table_entries * 4, "the VHD BAT")
    head = make_head(footer, header, table_raw)
    return head, footer_raw + header_raw + gap + table_raw


async def with_exact_length(chunks: AsyncIterator[bytes]) -> tuple[int, AsyncIterator[bytes]]:
    """The exact length of a dynamic VHD stream, read from its head, and the stream to send with that length.

    As vhd-lib's createVhdStreamWithLength: the length is the end of the last allocated block (by sector, not
    by index) plus the footer; the returned stream is the head, then the source up to that point, then the
    footer copy from the head (whatever follows the last block in the source, padding or its own footer, is
    dropped). Only the head is read before returning. Raises VhdError for a malformed head; the returned
    stream raises VhdTruncated if the source ends before the last block does.
    """
    reader = ByteReader(chunks)
    head, head_raw = await read_head(reader)

    async def trimmed() -> AsyncIterator[bytes]:
        yield head_raw
        async for chunk in reader.until(head.footer_offset, "the end of the last block"):
            yield chunk
        yield head_raw[:FOOTER_BYTES]

    return head.length, trimmed()


@dataclass(frozen=True)
class Block:
    """One allocated block of a VHD stream: its index in the disk, its sector bitmap and its data."""

    index: int
    bitmap: bytes
    data: bytes


async def iter_blocks(head: Head, reader: ByteReader) -> AsyncIterator[Block]:
    """Yield the allocated blocks in stream order, then check the final footer at the end of the stream.

    Bytes between blocks are skipped. The final footer must be the last 512 bytes and equal the copy at the
    start (VhdError otherwise; VhdTruncated when the stream stops before it).
    """
    for sector, index in head.blocks:
        await reader.skip_to(sector * SECTOR_BYTES, f"block {index}")
        bitmap = await reader.read_exactly(BITMAP_BYTES, f"the bitmap of block {index}")
        data = await reader.read_exactly(head.header.block_size, f"the data of block {index}")
        yield Block(index, bitmap, data)
    ended_at = reader.position
    tail = await reader.tail(FOOTER_BYTES)
    if len(tail) < FOOTER_BYTES:
        raise VhdTruncated(f"the stream ended at byte {reader.position}, before the final VHD footer")
    if Footer.parse(tail) != head.footer:
        raise VhdError(f"the final VHD footer (after byte {ended_at}) differs from the footer copy at the start")
