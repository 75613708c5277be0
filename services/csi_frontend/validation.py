"""Pure checks of CSI request fields (no I/O): the controller's capabilities, capacity ranges and topology, and
the Node RPCs' requests parsed into frozen commands.

Every failure is InvalidRequest (or OutOfRange, PreconditionFailed, VolumeNotFound where the spec's table asks
for that code) naming the field and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shared.csi import csi_pb2
from shared.errors import InvalidRequest, OutOfRange, PreconditionFailed, VolumeNotFound
from shared.storage_class import FS_TYPES
from shared.units import DISK_STEP
from shared.volume_id import MAX_ID_BYTES

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
    if len(value.encode()) > MAX_ID_BYTES:
        raise InvalidRequest(f"{field} is longer than {MAX_ID_BYTES} bytes")
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
    """(required_bytes, limit_bytes) with the default size filled in; limit 0 means none. ``required`` (an
    expansion): the range must be given, and a limit alone asks for no growth (at least 0 bytes), not for the
    default size a new volume would get."""
    if capacity is None or (capacity.required_bytes == 0 and capacity.limit_bytes == 0):
        if required:
            raise InvalidRequest("capacity_range is required: set required_bytes")
        return DEFAULT_SIZE_BYTES, 0
    need, limit = capacity.required_bytes, capacity.limit_bytes
    if need < 0 or limit < 0:
        raise OutOfRange("capacity_range: required_bytes and limit_bytes must not be negative")
    if limit and need > limit:
        raise OutOfRange(f"capacity_range: required_bytes {need} is above limit_bytes {limit}")
    if need == 0 and not required:  # the default, or the largest whole step within the limit (XAPI rounds up)
        need = min(DEFAULT_SIZE_BYTES, limit // DISK_STEP * DISK_STEP or limit)
    return need, limit


def topology_terms(terms: Iterable[csi_pb2.Topology]) -> list[dict[str, str]]:
    return [dict(term.segments) for term in terms]


# --- Node requests: proto request -> frozen command (pure) ------------------------------------------


@dataclass(frozen=True)
class Access:
    """How the CO wants to use the volume (the parsed VolumeCapability)."""

    is_block: bool
    fs_type: str | None  # None: not requested; the existing filesystem, or ext4 on a blank disk
    mount_flags: tuple[str, ...]
    is_reader_only: bool
    is_single_writer: bool = False  # SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod): one publish on the node

    def stage_options(self) -> tuple[str, ...]:
        """Mount options for the staging mount; reader-only modes mount read-only."""
        return self.mount_flags + (("ro",) if self.is_reader_only and "ro" not in self.mount_flags else ())

    @property
    def is_stage_readonly(self) -> bool:
        return "ro" in self.stage_options()


@dataclass(frozen=True)
class StageCommand:
    volume_id: str
    staging_path: Path
    device_name: str
    access: Access


@dataclass(frozen=True)
class PublishCommand:
    volume_id: str
    staging_path: Path
    target_path: Path
    device_name: str  # "" for mount access, which publishes the staged filesystem instead
    access: Access
    readonly: bool
    """The request's readonly, a reader-only mode, or "ro" among the mount flags: what the target will be."""


@dataclass(frozen=True)
class PathCommand:
    """Unstage, unpublish, stats: a volume id and the one path the call is about."""

    volume_id: str
    path: Path


@dataclass(frozen=True)
class ExpandCommand:
    volume_id: str
    path: Path
    access: Access | None
    required_bytes: int
    limit_bytes: int  # 0: no limit


def parse_volume_id(value: str) -> str:
    """Require a non-empty volume_id of at most 128 bytes ("name:<disk name>" or a VDI UUID)."""
    if not value:
        raise InvalidRequest("volume_id is required; pass the id CreateVolume returned (name:<disk> or a VDI UUID)")
    if len(value.encode()) > MAX_ID_BYTES:
        raise InvalidRequest(f"volume_id is longer than {MAX_ID_BYTES} bytes; pass the id CreateVolume returned")
    return value


MAX_PATH_BYTES = 4096  # PATH_MAX


def parse_path(value: str, field_name: str) -> Path:
    """Require an absolute path without '..' components for field_name."""
    if not value:
        raise InvalidRequest(f"{field_name} is required; pass an absolute path on this node")
    if not value.startswith("/"):
        raise InvalidRequest(f"{field_name} {value!r} must be an absolute path on this node")
    if ".." in PurePosixPath(value).parts:
        raise InvalidRequest(f"{field_name} {value!r} must not contain '..'; pass the normalised absolute path")
    if "\x00" in value or len(value.encode()) > MAX_PATH_BYTES:
        raise InvalidRequest(f"{field_name} must be a path without NUL bytes and at most {MAX_PATH_BYTES} bytes")
    return Path(value)


def parse_access(cap: csi_pb2.VolumeCapability | None) -> Access:
    """Parse a VolumeCapability with the controller's rules (validation.check_capability)."""
    if cap is None:
        raise InvalidRequest("volume_capability is required; set access_type (block or mount) and access_mode")
    check_capability(cap, "volume_capability")
    reader_only = cap.access_mode.mode in READ_ONLY_MODES
    single = cap.access_mode.mode == _Mode.SINGLE_NODE_SINGLE_WRITER
    if cap.HasField("block"):
        return Access(is_block=True, fs_type=None, mount_flags=(), is_reader_only=reader_only, is_single_writer=single)
    flags = tuple(flag for flag in cap.mount.mount_flags if flag)
    return Access(is_block=False, fs_type=cap.mount.fs_type or None, mount_flags=flags, is_reader_only=reader_only,
                  is_single_writer=single)


def parse_device_name(publish_context: Mapping[str, str]) -> str:
    """Return publish_context["device"] (e.g. "xvdb"), a bare name inside the device directory."""
    name = publish_context.get("device", "")
    if not name:
        raise InvalidRequest(
            "publish_context['device'] is missing: the volume was not published to this node by "
            "ControllerPublishVolume; check the VolumeAttachment for this volume and node"
        )
    if "/" in name or name in (".", "..") or "\x00" in name:
        raise InvalidRequest(f"publish_context['device'] {name!r} must be a bare device name such as 'xvdb'")
    return name


_WithCapability = csi_pb2.NodeStageVolumeRequest | csi_pb2.NodePublishVolumeRequest | csi_pb2.NodeExpandVolumeRequest


def _capability(request: _WithCapability) -> csi_pb2.VolumeCapability | None:
    return request.volume_capability if request.HasField("volume_capability") else None


def parse_stage(request: csi_pb2.NodeStageVolumeRequest) -> StageCommand:
    volume_id = parse_volume_id(request.volume_id)
    staging = parse_path(request.staging_target_path, "staging_target_path")
    access = parse_access(_capability(request))
    return StageCommand(volume_id, staging, parse_device_name(request.publish_context), access)


def parse_publish(request: csi_pb2.NodePublishVolumeRequest) -> PublishCommand:
    """Validate NodePublishVolume; a missing staging_target_path is FAILED_PRECONDITION per the spec table."""
    volume_id = parse_volume_id(request.volume_id)
    target = parse_path(request.target_path, "target_path")
    access = parse_access(_capability(request))
    if not request.staging_target_path:
        raise PreconditionFailed("staging_target_path is not set; call NodeStageVolume first and pass its path")
    staging = parse_path(request.staging_target_path, "staging_target_path")
    device = parse_device_name(request.publish_context) if access.is_block else ""
    # PV mountOptions [ro] reach us as a mount flag, not as readonly: the staging mount is read-only and so is the
    # bind of it, and an identical retry must find the target as it expects it (spec: "compatible ... MUST reply
    # 0 OK"), not ALREADY_EXISTS "already published read-only".
    readonly = request.readonly or access.is_stage_readonly
    return PublishCommand(volume_id, staging, target, device, access, readonly)


def parse_volume_path(volume_id: str, value: str) -> PathCommand:
    """Validate (volume_id, volume_path) of stats/expand; a relative path cannot hold a volume: NOT_FOUND.

    csi-sanity sends "some/path" and expects NOT_FOUND, so relative paths are not INVALID_ARGUMENT here.
    """
    volume_id = parse_volume_id(volume_id)
    if value and not value.startswith("/"):
        raise VolumeNotFound(f"volume {volume_id} is not at volume_path {value!r}: it must be an absolute path")
    return PathCommand(volume_id, parse_path(value, "volume_path"))


def parse_expand(request: csi_pb2.NodeExpandVolumeRequest) -> ExpandCommand:
    """Validate NodeExpandVolume; a negative or inverted capacity_range is OUT_OF_RANGE."""
    where = parse_volume_path(request.volume_id, request.volume_path)
    cap = _capability(request)
    access = parse_access(cap) if cap is not None else None
    need, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
    if need < 0 or limit < 0 or (limit and need > limit):
        raise OutOfRange(f"capacity_range (required_bytes {need}, limit_bytes {limit}) is negative or inverted")
    return ExpandCommand(where.volume_id, where.path, access, need, limit)
