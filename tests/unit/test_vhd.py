"""shared/vhd.py and shared/vhd_stream.py: footer/header/BAT codecs, validation, exact length and block reading."""

from __future__ import annotations

import struct
from array import array
from collections.abc import AsyncIterator

import pytest

from shared import vhd
from shared.units import MiB
from shared.vhd import BITMAP_BYTES, BLOCK_BYTES, BLOCK_UNUSED, SECTOR_BYTES, Footer, Header, VhdError, VhdTruncated
from shared.vhd_stream import ByteReader, iter_blocks, read_head, with_exact_length

SPAN = BITMAP_BYTES + BLOCK_BYTES
UID = bytes(range(16))


def _stream(size: int, placed: dict[int, int], *, gap: int = 0, padding: int = 0, footer: bytes | None = None,
            table_offset: int = vhd.HEAD_TABLE_OFFSET) -> tuple[bytes, dict[int, bytes]]:
    """A dynamic VHD of ``size`` with block index -> sector placements, ``gap`` zero bytes after the BAT's
    padding, ``padding`` bytes after the last block; returns it and each block's data."""
    foot = Footer.for_disk(size, UID, 1234)
    entries = vhd.blocks_for(size)
    bat = array("I", [BLOCK_UNUSED]) * entries
    for index, sector in placed.items():
        bat[index] = sector
    out = bytearray(foot.pack() + Header(entries, table_offset=table_offset).pack())
    out += bytes(table_offset - len(out)) + vhd.pack_bat(bat) + bytes(gap)
    data = {}
    for sector, index in sorted((s, i) for i, s in placed.items()):
        assert len(out) <= sector * SECTOR_BYTES
        out += bytes(sector * SECTOR_BYTES - len(out))
        data[index] = bytes([index + 1]) * BLOCK_BYTES
        out += vhd.FULL_BITMAP + data[index]
    out += bytes(padding) + (footer if footer is not None else foot.pack())
    return bytes(out), data


async def _chunks(data: bytes, size: int, seen: list[int] | None = None) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        if seen is not None:
            seen.append(start + size)
        yield data[start:start + size]


async def _collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def _first_sector(size: int) -> int:
    return vhd.sectors_of(vhd.HEAD_TABLE_OFFSET + vhd.blocks_for(size) * 4)


# -- codecs -------------------------------------------------------------------------------------------------


def test_footer_round_trips_with_the_spec_checksum() -> None:
    raw = Footer.for_disk(64 * MiB, UID, 42).pack()
    assert len(raw) == 512 and raw[:8] == b"conectix"
    stored = struct.unpack_from(">I", raw, 64)[0]
    assert stored == ~(sum(raw[:64]) + sum(raw[68:])) & 0xFFFFFFFF
    parsed = Footer.parse(raw)
    assert (parsed.current_size, parsed.original_size, parsed.disk_type) == (64 * MiB, 64 * MiB, 3)
    assert parsed.unique_id == UID
    assert parsed.geometry == (963, 8, 17) and parsed.creator_app == b"tap\x00"


def test_header_round_trips() -> None:
    raw = Header(max_table_entries=32).pack()
    assert len(raw) == 1024 and raw[:8] == b"cxsparse"
    header = Header.parse(raw, Footer.for_disk(64 * MiB, UID))
    assert (header.max_table_entries, header.table_offset, header.block_size) == (32, 1536, BLOCK_BYTES)


@pytest.mark.parametrize(("size", "chs"), [
    (64 * MiB, (963, 8, 17)),
    (10 * 1024 * MiB, (20805, 16, 63)),
    (2 * 1024**4 - 8192, (65535, 16, 255)),
])
def test_geometry_follows_the_spec_appendix(size: int, chs: tuple[int, int, int]) -> None:
    assert vhd.geometry(size) == chs


def _refooter(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(raw)
    struct.pack_into(fmt, patched, offset, value)
    struct.pack_into(">I", patched, 64, 0)
    struct.pack_into(">I", patched, 64, vhd.checksum(patched, 64))
    return bytes(patched)


@pytest.mark.parametrize(("patch", "message"), [
    (lambda r: b"conectiy" + r[8:], "VHD footer cookie is b'conectiy', expected b'conectix'"),
    (lambda r: r[:100] + b"\x01" + r[101:], "VHD footer checksum is"),
    (lambda r: _refooter(r, 12, ">I", 0x00020000), "VHD footer file format version is 0x20000, expected 0x10000"),
    (lambda r: _refooter(r, 60, ">I", 2), "VHD footer disk type is 2 (fixed), expected 3 (dynamic)"),
    (lambda r: _refooter(r, 60, ">I", 4), "VHD footer disk type is 4 (differencing), expected 3 (dynamic)"),
    (lambda r: _refooter(r, 16, ">Q", 1024), "VHD footer data offset (the header must follow the footer copy) is"),
    (lambda r: _refooter(r, 48, ">Q", 4 * 1024**4),
     "VHD footer current size 4398046511104 exceeds the VHD maximum 2199023247360"),
    (lambda r: r[:300], "VHD footer: 300 bytes, expected 512"),
])
def test_bad_footers_are_named(patch: object, message: str) -> None:
    raw = Footer.for_disk(64 * MiB, UID).pack()
    with pytest.raises(VhdError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Footer.parse(patch(raw))  # type: ignore[operator]


def _reheader(offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(Header(max_table_entries=32).pack())
    struct.pack_into(fmt, patched, offset, value)
    struct.pack_into(">I", patched, 36, 0)
    struct.pack_into(">I", patched, 36, vhd.checksum(patched, 36))
    return bytes(patched)


@pytest.mark.parametrize(("raw", "message"), [
    (b"cxsparsf" + Header(32).pack()[8:], "VHD header cookie is b'cxsparsf', expected b'cxsparse'"),
    (Header(32).pack()[:500] + b"\x07" + Header(32).pack()[501:], "VHD header checksum is"),
    (_reheader(32, ">I", 4 * MiB), "VHD header block size is 0x400000, expected 0x200000"),
    (_reheader(24, ">I", 0x00020000), "VHD header version is 0x20000, expected 0x10000"),
    (_reheader(8, ">Q", 0), "VHD header data offset is 0x0, expected 0xFFFFFFFFFFFFFFFF"),
    (_reheader(28, ">I", 31), "VHD header max table entries is 31, expected between 32"),
    (_reheader(16, ">Q", 1600), "VHD header table offset is 1600, expected a sector multiple"),
    (_reheader(16, ">Q", 512), "VHD header table offset is 512, expected a sector multiple"),
])
def test_bad_headers_are_named(raw: bytes, message: str) -> None:
    with pytest.raises(VhdError, match="^" + message):
        Header.parse(raw, Footer.for_disk(64 * MiB, UID))


def test_bat_round_trips_padded_with_ff() -> None:
    bat = array("I", [BLOCK_UNUSED, 7, BLOCK_UNUSED])
    raw = vhd.pack_bat(bat)
    assert raw == b"\xff" * 4 + b"\x00\x00\x00\x07" + b"\xff" * 504
    assert list(vhd.parse_bat(raw, 3)) == [BLOCK_UNUSED, 7, BLOCK_UNUSED]


@pytest.mark.parametrize(("placed", "message"), [
    ({32: 100}, "VHD BAT entry 32 is allocated but the disk has only 32 blocks"),
    ({0: 3}, "VHD BAT entry 0 points at sector 3, which overlaps the BAT or the previous block"),
    ({0: 4, 1: 4 + 4096}, "VHD BAT entry 1 points at sector 4100, which overlaps"),
])
def test_bad_bats_are_named(placed: dict[int, int], message: str) -> None:
    bat = array("I", [BLOCK_UNUSED]) * 40
    for index, sector in placed.items():
        bat[index] = sector
    with pytest.raises(VhdError, match="^" + message):
        vhd.check_bat(bat, Footer.for_disk(64 * MiB, UID), 4)


def test_bitmaps_and_masks() -> None:
    bits = vhd.bitmap_of([(0, 1), (9, 11), (4095, 5000)])
    assert bits[0] == 0x80 and bits[1] == 0x60 and bits[511] == 0x01 and sum(bits) == 0x80 + 0x60 + 1
    data = b"\x01" * BLOCK_BYTES
    masked = vhd.mask(bits, data)
    assert masked[:512] == b"\x01" * 512 and masked[512:9 * 512] == bytes(8 * 512)
    assert masked[9 * 512:11 * 512] == b"\x01" * 1024 and masked[-512:] == b"\x01" * 512
    assert sum(1 for i in range(0, BLOCK_BYTES, 512) if masked[i]) == 4
    assert vhd.mask(vhd.FULL_BITMAP, data) is data


def test_built_head_and_predicted_length_agree() -> None:
    raw, footer = vhd.build_head(5 * MiB, [0, 2], unique_id=UID)
    assert len(raw) == 1536 + 512 and footer.current_size == 5 * MiB
    bat = vhd.parse_bat(raw[1536:], 3)
    assert list(bat) == [4, BLOCK_UNUSED, 4 + SPAN // 512]
    assert vhd.stream_length(5 * MiB, 2) == 2048 + 2 * SPAN + 512


# -- streams ------------------------------------------------------------------------------------------------


async def test_exact_length_ends_at_the_last_block_by_sector_and_drops_padding() -> None:
    size = 20 * MiB
    first = _first_sector(size)
    # block 7 sits first in the stream, block 2 last: the last block is found by sector, not by index
    placed = {7: first + 8, 2: first + 8 + 3 * SPAN // 512, 4: first + 8 + SPAN // 512}
    source, data = _stream(size, placed, gap=4096, padding=3 * 4096)
    length, trimmed = await with_exact_length(_chunks(source, 1000))
    body = await _collect(trimmed)
    expected = source[:len(source) - 3 * 4096 - 512] + source[:512]
    assert length == len(body) == len(source) - 3 * 4096
    assert body == expected
    assert length == (placed[2] * 512 + BITMAP_BYTES + BLOCK_BYTES) + 512
    assert data[2] in body


async def test_exact_length_of_a_disk_without_blocks() -> None:
    source, _ = _stream(64 * MiB, {})
    length, trimmed = await with_exact_length(_chunks(source, 4096))
    assert length == 1536 + 512 + 512 == len(source)
    assert await _collect(trimmed) == source


async def test_exact_length_reads_only_the_head_before_returning() -> None:
    source, _ = _stream(64 * MiB, {0: _first_sector(64 * MiB)})
    seen: list[int] = []
    length, trimmed = await with_exact_length(_chunks(source, 1024, seen))
    assert max(seen) <= 1536 + 32 * 4 + 1024  # the head plus at most one chunk
    assert length == len(source)
    assert len(await _collect(trimmed)) == length


async def test_a_source_cut_before_the_last_block_ends_raises_truncated() -> None:
    size = 8 * MiB
    source, _ = _stream(size, {1: _first_sector(size)})
    length, trimmed = await with_exact_length(_chunks(source[:-600], 65536))
    assert length == len(source)
    with pytest.raises(VhdTruncated, match="before the end of the last block at byte"):
        await _collect(trimmed)


async def test_a_source_cut_in_the_head_is_named() -> None:
    source, _ = _stream(8 * MiB, {})
    with pytest.raises(VhdTruncated, match="bytes short of the VHD header"):
        await with_exact_length(_chunks(source[:1000], 100))


async def test_a_bat_after_a_gap_is_read_at_the_table_offset() -> None:
    size = 8 * MiB
    first = vhd.sectors_of(4096 + 16)
    source, data = _stream(size, {3: first}, table_offset=4096)
    length, trimmed = await with_exact_length(_chunks(source, 777))
    assert length == len(source) and await _collect(trimmed) == source
    reader = ByteReader(_chunks(source, 777))
    head, _ = await read_head(reader)
    assert [(b.index, b.data) async for b in iter_blocks(head, reader)] == [(3, data[3])]


async def test_blocks_come_in_stream_order_with_their_bitmaps() -> None:
    size = 12 * MiB
    first = _first_sector(size)
    placed = {5: first, 0: first + SPAN // 512 + 1}
    source, data = _stream(size, placed, padding=512)
    reader = ByteReader(_chunks(source, 65536))
    head, raw = await read_head(reader)
    assert raw == source[:1536 + 6 * 4] and head.length == len(source) - 512
    blocks = [block async for block in iter_blocks(head, reader)]
    assert [(b.index, b.bitmap, b.data) for b in blocks] == [(5, vhd.FULL_BITMAP, data[5]),
                                                               (0, vhd.FULL_BITMAP, data[0])]


async def test_the_final_footer_must_match_the_copy() -> None:
    other = Footer.for_disk(16 * MiB, UID, 1234).pack()
    source, _ = _stream(12 * MiB, {}, footer=other)
    reader = ByteReader(_chunks(source, 4096))
    head, _ = await read_head(reader)
    with pytest.raises(VhdError, match="differs from the footer copy"):
        _ = [block async for block in iter_blocks(head, reader)]


async def test_a_missing_final_footer_is_truncation() -> None:
    size = 4 * MiB
    source, _ = _stream(size, {0: _first_sector(size)})
    reader = ByteReader(_chunks(source[:-512], 65536))
    head, _ = await read_head(reader)
    with pytest.raises(VhdTruncated, match="before the final VHD footer"):
        _ = [block async for block in iter_blocks(head, reader)]



@pytest.mark.parametrize("ranges", [[(0, 4096)], [(3, 21)], [(5, 6)], [(8, 16), (17, 40)], [(4000, 5000)], []])
def test_bitmap_sets_exactly_the_sectors_of_the_ranges(ranges: list[tuple[int, int]]) -> None:
    bits = vhd.bitmap_of(ranges)
    wanted = {s for first, end in ranges for s in range(first, min(end, 4096))}
    assert {s for s in range(4096) if bits[s >> 3] & (0x80 >> (s & 7))} == wanted
