"""Pure checks of controller request fields: capabilities, capacity ranges, topology (no I/O).

Every failure is InvalidRequest (or OutOfRange) naming the field and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from shared.csi import csi_pb2
from shared.errors import InvalidRequest, OutOfRange
from shared.storage_class import FS_TYPES

DEFAULT_SIZE_BYTES = 1024**3
MAX_MAP_BYTES = 4096

_Mode = csi_pb2.VolumeCapability.AccessMode
SUPPORTED_MODES = {
    _Mode.SINGLE_NODE_WRITER,
    _Mode.SINGLE_NODE_READER_ONLY,
    _Mode.SINGLE_NODE_SINGLE_WRITER,
    _Mode.SINGLE_NODE_MULTI_WRITER,
}
READ_ONLY_MODES = {_Mode.SINGLE_NODE_READER_ONLY, _Mode.MULTI_NODE_READER_ONLY}


def require(value: str, field: str) -> str:
    if not value:
        raise InvalidRequest(f"{field} is required")
    if len(value.encode()) > 128:
        raise InvalidRequest(f"{field} is longer than 128 bytes")
    return value


def check_map(values: Mapping[str, str], field: str) -> None:
    if sum(len(k.encode()) + len(v.encode()) for k, v in values.items()) > MAX_MAP_BYTES:
        raise InvalidRequest(f"{field} is larger than {MAX_MAP_BYTES} bytes")


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why the driver cannot serve ``cap``, or None when it can."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "access_type must be block or mount"
    if cap.access_mode.mode not in SUPPORTED_MODES:
        name = _Mode.Mode.Name(cap.access_mode.mode) if cap.access_mode.mode in _Mode.Mode.values() else "?"
        return f"access mode {name} is not supported: a VDI attaches to one node (use a SINGLE_NODE_* mode)"
    if kind == "mount" and cap.mount.fs_type and cap.mount.fs_type not in FS_TYPES:
        return f"fs_type {cap.mount.fs_type!r} is not supported: use one of {', '.join(FS_TYPES)}"
    return None


def check_capabilities(caps: Iterable[csi_pb2.VolumeCapability], field: str = "volume_capabilities") -> None:
    caps = list(caps)
    if not caps:
        raise InvalidRequest(f"{field} is required: give at least one (block or mount, with an access mode)")
    for cap in caps:
        check_capability(cap, field)


def check_capability(cap: csi_pb2.VolumeCapability, field: str = "volume_capability") -> None:
    problem = capability_problem(cap)
    if problem is not None:
        raise InvalidRequest(f"{field}: {problem}")


def size_range(capacity: csi_pb2.CapacityRange | None, *, required: bool = False) -> tuple[int, int]:
    """(required_bytes, limit_bytes) with the default size filled in; limit 0 means none."""
    if capacity is None or (capacity.required_bytes == 0 and capacity.limit_bytes == 0):
        if required:
            raise InvalidRequest("capacity_range is required: set required_bytes")
        return DEFAULT_SIZE_BYTES, 0
    need, limit = capacity.required_bytes, capacity.limit_bytes
    if need < 0 or limit < 0:
        raise OutOfRange("capacity_range: required_bytes and limit_bytes must not be negative")
    if limit and need > limit:
        raise OutOfRange(f"capacity_range: required_bytes {need} is above limit_bytes {limit}")
    if need == 0:
        need = min(DEFAULT_SIZE_BYTES, limit)
    return need, limit


def topology_terms(terms: Iterable[csi_pb2.Topology]) -> list[dict[str, str]]:
    return [dict(term.segments) for term in terms]
