"""The VHD dynamic-disk format (Microsoft VHD spec, as XAPI exports and XO imports it): pure, no I/O.

Layout of a dynamic VHD stream: footer copy (512 B), header (1024 B), BAT (4 bytes a block, big-endian sector
offsets, 0xFFFFFFFF = unused, padded to a sector), then for each allocated block its sector bitmap (512 B for a
2 MiB block) and its data, then the footer. Everything is big-endian; a checksum is the one's complement of the
byte sum with the checksum field zeroed. The streaming side (exact length, block reader) is shared/vhd_stream.py.
Every malformed input raises VhdError naming the field and what was expected.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

SECTOR_BYTES = 512
FOOTER_BYTES = 512
HEADER_BYTES = 1024
BLOCK_BYTES = 2 * 1024 * 1024
SECTORS_PER_BLOCK = BLOCK_BYTES // SECTOR_BYTES
BITMAP_BYTES = -(-SECTORS_PER_BLOCK // 8 // SECTOR_BYTES) * SECTOR_BYTES  # 512: rounded up to whole sectors
BLOCK_UNUSED = 0xFFFFFFFF
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
FEATURES_RESERVED = 0x00000002  # the spec's "reserved" bit, always set
DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
HEAD_TABLE_OFFSET = FOOTER_BYTES + HEADER_BYTES  # where a streamed VHD puts its BAT
MAX_TABLE_OFFSET = 1024 * 1024  # a stream's head is buffered: refuse a BAT placed absurdly far
VHD_MAX_BYTES = 2 * 1024**4 - 8 * 1024  # XO's VHD_MAX_SIZE; larger disks are qcow2
MAX_TABLE_ENTRIES = -(-VHD_MAX_BYTES // BLOCK_BYTES)
# "tap\0" is XenServer's creator application: qemu then reads the size from current_size, not from the CHS
# geometry (which would round it); XAPI-made VHDs are read the same way.
CREATOR_APP = b"tap\x00"
CREATOR_VERSION = 0x00010003
CREATOR_OS = b"Wi2k"
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_HEADER = struct.Struct(">8sQQIIII16sI4s512s192s256s")
_FOOTER_CHECKSUM_AT = 64
_HEADER_CHECKSUM_AT = 36
if array("I").itemsize != 4:  # pragma: no cover - true on every platform CPython supports for us
    raise ImportError("shared.vhd needs a 4-byte array('I') for the BAT")


class VhdError(ValueError):
    """The bytes are not a VHD this code can read; the message names the field and the expected value."""


class VhdTruncated(VhdError):
    """The stream ended before the VHD did (a cut connection or a short body)."""


def checksum(data: bytes | bytearray, at: int) -> int:
    """The VHD checksum of ``data`` whose 4-byte checksum field starts at ``at``: ~sum(bytes), field zeroed."""
    total = sum(data) - sum(data[at:at + 4])
    return ~total & 0xFFFFFFFF


def geometry(size_bytes: int) -> tuple[int, int, int]:
    """The (cylinders, heads, sectors per track) the VHD spec (appendix) derives from a disk size."""
    total = min(size_bytes // SECTOR_BYTES, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        per_track, heads = 255, 16
        cylinder_heads = total // per_track
    else:
        per_track = 17
        cylinder_heads = total // per_track
        heads = max(4, (cylinder_heads + 1023) // 1024)
        if cylinder_heads >= heads * 1024 or heads > 16:
            per_track, heads = 31, 16
            cylinder_heads = total // per_track
        if cylinder_heads >= heads * 1024:
            per_track, heads = 63, 16
            cylinder_heads = total // per_track
    return cylinder_heads // heads, heads, per_track


def vhd_timestamp(when: datetime | None = None) -> int:
    """Seconds since 2000-01-01 00:00 UTC, as VHD footers store them."""
    return max(0, int(((when or datetime.now(UTC)) - _EPOCH).total_seconds())) & 0xFFFFFFFF


@dataclass(frozen=True)
class Footer:
    """The 512-byte footer (also copied at offset 0 of a dynamic disk)."""

    current_size: int
    original_size: int
    disk_type: int = DISK_DYNAMIC
    data_offset: int = FOOTER_BYTES
    timestamp: int = 0
    unique_id: bytes = bytes(16)
    creator_app: bytes = CREATOR_APP
    creator_version: int = CREATOR_VERSION
    creator_os: bytes = CREATOR_OS
    geometry: tuple[int, int, int] = (0, 0, 0)
    features: int = FEATURES_RESERVED
    version: int = FORMAT_VERSION
    saved_state: int = 0

    @classmethod
    def for_disk(cls, size_bytes: int, unique_id: bytes, timestamp: int = 0) -> Footer:
        """The footer of a dynamic disk of ``size_bytes`` (geometry computed as the spec says)."""
        return cls(current_size=size_bytes, original_size=size_bytes, timestamp=timestamp,
                   unique_id=unique_id, geometry=geometry(size_bytes))

    def pack(self) -> bytes:
        """The 512 bytes, checksum included."""
        cylinders, heads, per_track = self.geometry
        raw = bytearray(_FOOTER.pack(
            FOOTER_COOKIE, self.features, self.version, self.data_offset, self.timestamp, self.creator_app,
            self.creator_version, self.creator_os, self.original_size, self.current_size, cylinders, heads,
            per_track, self.disk_type, 0, self.unique_id, self.saved_state, bytes(427)))
        struct.pack_into(">I", raw, _FOOTER_CHECKSUM_AT, checksum(raw, _FOOTER_CHECKSUM_AT))
        return bytes(raw)

    @classmethod
    def parse(cls, raw: bytes) -> Footer:
        """Parse and validate a footer of a dynamic disk; VhdError otherwise."""
        if len(raw) != FOOTER_BYTES:
            raise VhdTruncated(f"VHD footer: {len(raw)} bytes, expected {FOOTER_BYTES}")
        (cookie, features, version, data_offset, timestamp, app, app_version, os_name, original, current,
         cylinders, heads, per_track, disk_type, stored, unique_id, saved_state, _) = _FOOTER.unpack(raw)
        _expect("footer cookie", cookie, FOOTER_COOKIE)
        _expect_checksum("footer", stored, checksum(raw, _FOOTER_CHECKSUM_AT))
        _expect("footer file format version", version, FORMAT_VERSION)
        if disk_type != DISK_DYNAMIC:
            kind = {DISK_FIXED: "fixed", DISK_DIFFERENCING: "differencing"}.get(disk_type, "unknown")
            raise VhdError(f"VHD footer disk type is {disk_type} ({kind}), expected {DISK_DYNAMIC} (dynamic)")
        _expect("footer data offset (the header must follow the footer copy)", data_offset, FOOTER_BYTES)
        if current > VHD_MAX_BYTES:
            raise VhdError(f"VHD footer current size {current} exceeds the VHD maximum {VHD_MAX_BYTES}")
        return cls(current_size=current, original_size=original, disk_type=disk_type, data_offset=data_offset,
                   timestamp=timestamp, unique_id=unique_id, creator_app=app, creator_version=app_version,
                   creator_os=os_name, geometry=(cylinders, heads, per_track), features=features,
                   version=version, saved_state=saved_state)


@dataclass(frozen=True)
class Header:
    """The 1024-byte dynamic disk header (no parent: differencing disks are not supported)."""

    max_table_entries: int
    table_offset: int = HEAD_TABLE_OFFSET
    block_size: int = BLOCK_BYTES
    data_offset: int = NO_OFFSET
    version: int = HEADER_VERSION

    def pack(self) -> bytes:
        """The 1024 bytes, checksum included."""
        raw = bytearray(_HEADER.pack(
            HEADER_COOKIE, self.data_offset, self.table_offset, self.version, self.max_table_entries,
            self.block_size, 0, bytes(16), 0, bytes(4), bytes(512), bytes(192), bytes(256)))
        struct.pack_into(">I", raw, _HEADER_CHECKSUM_AT, checksum(raw, _HEADER_CHECKSUM_AT))
        return bytes(raw)

    @classmethod
    def parse(cls, raw: bytes, footer: Footer) -> Header:
        """Parse and validate a header against its footer; VhdError otherwise."""
        if len(raw) != HEADER_BYTES:
            raise VhdTruncated(f"VHD header: {len(raw)} bytes, expected {HEADER_BYTES}")
        cookie, data_offset, table_offset, version, entries, block_size, stored, *_ = _HEADER.unpack(raw)
        _expect("header cookie", cookie, HEADER_COOKIE)
        _expect_checksum("header", stored, checksum(raw, _HEADER_CHECKSUM_AT))
        _expect("header data offset", data_offset, NO_OFFSET)
        _expect("header version", version, HEADER_VERSION)
        _expect("header block size", block_size, BLOCK_BYTES)
        needed = blocks_for(footer.current_size)
        if not needed <= entries <= MAX_TABLE_ENTRIES:
            raise VhdError(f"VHD header max table entries is {entries}, expected between {needed} (the disk's "
                           f"{footer.current_size} bytes in 2 MiB blocks) and {MAX_TABLE_ENTRIES}")
        if table_offset % SECTOR_BYTES or not HEAD_TABLE_OFFSET <= table_offset <= MAX_TABLE_OFFSET:
            raise VhdError(f"VHD header table offset is {table_offset}, expected a sector multiple between "
                           f"{HEAD_TABLE_OFFSET} and {MAX_TABLE_OFFSET}")
        return cls(max_table_entries=entries, table_offset=table_offset, block_size=block_size,
                   data_offset=data_offset, version=version)


def blocks_for(size_bytes: int) -> int:
    """How many 2 MiB blocks cover ``size_bytes``."""
    return -(-size_bytes // BLOCK_BYTES)


def sectors_of(size_bytes: int) -> int:
    """``size_bytes`` rounded up to whole sectors, in sectors."""
    return -(-size_bytes // SECTOR_BYTES)


def pack_bat(entries: array[int]) -> bytes:
    """The BAT bytes (big-endian), padded with 0xFF to a whole sector as XAPI and vhd-lib write it."""
    big = array("I", entries)
    if sys.byteorder == "little":
        big.byteswap()
    raw = big.tobytes()
    return raw + b"\xff" * (sectors_of(len(raw)) * SECTOR_BYTES - len(raw))


def parse_bat(raw: bytes, entries: int) -> array[int]:
    """The first ``entries`` BAT entries of ``raw`` as sector offsets (BLOCK_UNUSED for unused blocks)."""
    if len(raw) < entries * 4:
        raise VhdTruncated(f"VHD BAT: {len(raw)} bytes, expected {entries * 4}")
    bat = array("I")
    bat.frombytes(raw[:entries * 4])
    if sys.byteorder == "little":
        bat.byteswap()
    return bat


def check_bat(bat: array[int], footer: Footer, data_start_sector: int) -> list[tuple[int, int]]:
    """Validate the BAT and return the allocated blocks as (sector, block index), in stream (sector) order.

    Each allocated block must lie inside the disk (index below the blocks of current_size), start at or after
    ``data_start_sector`` (the end of the BAT), and not overlap the next block (bitmap + data).
    """
    needed = blocks_for(footer.current_size)
    used = sorted((sector, index) for index, sector in enumerate(bat) if sector != BLOCK_UNUSED)
    span = (BITMAP_BYTES + BLOCK_BYTES) // SECTOR_BYTES
    previous_end = data_start_sector
    for sector, index in used:
        if index >= needed:
            raise VhdError(f"VHD BAT entry {index} is allocated but the disk has only {needed} blocks")
        if sector < previous_end:
            raise VhdError(f"VHD BAT entry {index} points at sector {sector}, which overlaps the BAT or the "
                           f"previous block (first free sector {previous_end})")
        previous_end = sector + span
    return used


@dataclass(frozen=True)
class Head:
    """What a stream's first bytes say: footer, header, BAT, and where the final footer goes."""

    footer: Footer
    header: Header
    bat: array[int]
    blocks: Sequence[tuple[int, int]]  # (sector, block index) in stream order
    head_bytes: int  # bytes read to get here: up to the end of the BAT entries (not its padding)

    @property
    def footer_offset(self) -> int:
        """Where the final footer starts, as vhd-lib's createVhdStreamWithLength computes it."""
        if not self.blocks:
            return sectors_of(self.head_bytes) * SECTOR_BYTES
        last_sector = self.blocks[-1][0]
        return last_sector * SECTOR_BYTES + BITMAP_BYTES + self.header.block_size

    @property
    def length(self) -> int:
        """The exact byte length of the trimmed stream: up to the last block, then the footer."""
        return self.footer_offset + FOOTER_BYTES


def make_head(footer: Footer, header: Header, table_raw: bytes) -> Head:
    """Validate the BAT read at the header's table offset and build the Head of a stream."""
    bat = parse_bat(table_raw, header.max_table_entries)
    head_bytes = header.table_offset + header.max_table_entries * 4
    blocks = check_bat(bat, footer, sectors_of(head_bytes))
    return Head(footer, header, bat, blocks, head_bytes)


def build_head(size_bytes: int, allocated: Iterable[int], *, unique_id: bytes, timestamp: int = 0) -> tuple[
        bytes, Footer]:
    """The head of a dynamic VHD of ``size_bytes`` whose ``allocated`` blocks (ascending indexes) follow the BAT
    in that order, each as bitmap + 2 MiB; returns (footer copy + header + padded BAT, footer)."""
    footer = Footer.for_disk(size_bytes, unique_id, timestamp)
    entries = blocks_for(size_bytes)
    bat = array("I", [BLOCK_UNUSED]) * entries
    sector = sectors_of(HEAD_TABLE_OFFSET + entries * 4)
    span = (BITMAP_BYTES + BLOCK_BYTES) // SECTOR_BYTES
    for index in allocated:
        bat[index] = sector
        sector += span
    raw = footer.pack() + Header(max_table_entries=entries).pack() + pack_bat(bat)
    return raw, footer


def stream_length(size_bytes: int, allocated_blocks: int) -> int:
    """The byte length of a trimmed dynamic VHD of ``size_bytes`` with ``allocated_blocks`` blocks."""
    head = sectors_of(HEAD_TABLE_OFFSET + blocks_for(size_bytes) * 4) * SECTOR_BYTES
    return head + allocated_blocks * (BITMAP_BYTES + BLOCK_BYTES) + FOOTER_BYTES


def bitmap_of(sector_ranges: Iterable[tuple[int, int]]) -> bytes:
    """The sector bitmap of one block: bit set (MSB first) for each sector in the [first, end) ranges."""
    bits = bytearray(BITMAP_BYTES)
    for first, end in sector_ranges:
        first, end = max(0, first), min(end, SECTORS_PER_BLOCK)
        while first < end and first & 7:
            bits[first >> 3] |= 0x80 >> (first & 7)
            first += 1
        whole_end = end & ~7
        if first < whole_end:
            bits[first >> 3:whole_end >> 3] = b"\xff" * ((whole_end - first) >> 3)
            first = whole_end
        while first < end:
            bits[first >> 3] |= 0x80 >> (first & 7)
            first += 1
    return bytes(bits)


FULL_BITMAP = b"\xff" * (SECTORS_PER_BLOCK // 8) + bytes(BITMAP_BYTES - SECTORS_PER_BLOCK // 8)


def mask(bitmap: bytes, data: bytes | bytearray) -> bytes | bytearray:
    """``data`` of one block with the sectors the bitmap leaves unset read as zeros (they hold no data)."""
    if bitmap[:SECTORS_PER_BLOCK // 8] == FULL_BITMAP[:SECTORS_PER_BLOCK // 8]:
        return data
    out = bytearray(data)
    zero = bytes(SECTOR_BYTES)
    for byte_index in range(SECTORS_PER_BLOCK // 8):
        bits = bitmap[byte_index]
        if bits == 0xFF:
            continue
        for bit in range(8):
            if not bits & (0x80 >> bit):
                start = (byte_index * 8 + bit) * SECTOR_BYTES
                out[start:start + SECTOR_BYTES] = zero
    return out


def _expect(field: str, got: bytes | int, want: bytes | int) -> None:
    if got != want:
        raise VhdError(f"VHD {field} is {_shown(got)}, expected {_shown(want)}")


def _shown(value: bytes | int) -> str:
    return repr(value) if isinstance(value, bytes) else f"0x{value:X}"


def _expect_checksum(what: str, stored: int, computed: int) -> None:
    if stored != computed:
        raise VhdError(f"VHD {what} checksum is 0x{stored:08X}, expected 0x{computed:08X} (corrupt {what})")
