"""CSI Node service: stage, publish, expand and report XO disks attached to this VM (e.g. /dev/xvdb).

No RPC here calls XO: ControllerPublishVolume names the device in publish_context["device"]. This node's VM and
topology are learnt once at start-up (node_identity.py: the Node's CCM labels, or XO with --node-metadata=xo).
Request parsing lives in validation.py; filesystem rules (format, fsck, grow) in filesystem.py; OS calls in mounter.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from services.csi_frontend import filesystem, mounter
from services.csi_frontend.validation import (
    ExpandCommand,
    PathCommand,
    PublishCommand,
    StageCommand,
    parse_expand,
    parse_path,
    parse_publish,
    parse_stage,
    parse_volume_id,
    parse_volume_path,
)
from shared.backoff import Backoff
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.errors import (
    AlreadyExistsIncompatible,
    BackendUnavailable,
    InvalidRequest,
    OperationPending,
    OutOfRange,
    PreconditionFailed,
    VolumeNotFound,
)
from shared.logging import get_logger

log = get_logger(__name__)

_DEVICE_POLL = Backoff(start_s=0.01, cap_s=0.2)  # waiting for an attached disk's device node
_Rpc = csi_pb2.NodeServiceCapability.RPC
_CAPABILITIES = (_Rpc.STAGE_UNSTAGE_VOLUME, _Rpc.EXPAND_VOLUME, _Rpc.GET_VOLUME_STATS, _Rpc.VOLUME_CONDITION,
                 _Rpc.SINGLE_NODE_MULTI_WRITER)
_HEALTHY = "volume is healthy"


@dataclass(frozen=True)
class NodeConfig:
    """What the node service needs to know about this VM; built once in __main__ from settings and XO."""

    node_id: str
    topology: Mapping[str, str] = field(default_factory=dict)
    device_dir: Path = Path("/dev")
    max_volumes_per_node: int = 239
    device_wait_s: float = 10.0
    margin_s: float = 2.0
    """While a device is formatted, checked or grown (filesystem.DeviceJobs), answer ABORTED this long before the
    caller's deadline; the job goes on and the retry joins it (CSI_PUBLISH_MARGIN_S, as the controller's waits)."""

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("NodeConfig.node_id must not be empty")
        if self.max_volumes_per_node < 0 or self.device_wait_s < 0 or self.margin_s < 0:
            raise ValueError("NodeConfig.max_volumes_per_node, device_wait_s and margin_s must not be negative")


class RpcContext(Protocol):
    """The part of grpc.aio.ServicerContext a node handler may read; the interceptor enforces the deadline."""

    def time_remaining(self) -> float | None: ...


# --- concurrency -----------------------------------------------------------------------------------


class VolumeLocks:
    """Volume ids with a call in flight in this process.

    A second call on a busy volume fails at once with OperationPending (ABORTED, the spec's "operation
    pending for volume"); the CO retries with back-off. An id is dropped as soon as its call ends, so
    nothing accumulates. This is in-process only: the CO serialises calls per volume across the cluster.
    """

    def __init__(self) -> None:
        self._busy: set[str] = set()

    @contextlib.asynccontextmanager
    async def hold(self, volume_id: str) -> AsyncIterator[None]:
        if volume_id in self._busy:
            raise OperationPending(f"another operation on volume {volume_id} is in progress on this node; retry")
        self._busy.add(volume_id)
        try:
            yield
        finally:
            self._busy.discard(volume_id)


# --- the servicer --------------------------------------------------------------------------------------


class NodeServicer(csi_pb2_grpc.NodeServicer):
    """CSI Node service. Every mutating RPC is idempotent and serialised per volume (else ABORTED); handlers
    raise only shared.errors types, and the interceptor maps them and bounds each call by its deadline."""

    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        self._locks = VolumeLocks()

    async def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: RpcContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        """Wait for the device, then (mount access) format it if blank, check it (fsck -a, ext*), grow it to
        the device (offline expansion) and mount it at staging_target_path: filesystem.stage.

        NOT_FOUND: the device did not appear. ALREADY_EXISTS: the path holds another device, fs type or
        ro-ness. FAILED_PRECONDITION: the device holds another filesystem than requested (never reformatted),
        or fsck found errors it cannot repair unattended. ABORTED: the format, check or growth still runs
        ``margin_s`` before the deadline; it goes on, and the retry continues with it (CSI §Timeouts).
        """
        cmd = parse_stage(request)
        async with self._locks.hold(cmd.volume_id):
            device = await self._wait_for_device(cmd.device_name)
            if cmd.access.is_block:
                await _check_nothing_staged(cmd.staging_path)
            else:
                await _stage_filesystem(cmd, device, self._give_up_at(context))
        return csi_pb2.NodeStageVolumeResponse()

    async def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: RpcContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        """Unmount staging_target_path. Not staged, or the path missing, is success (spec: idempotent). ABORTED
        while a NodeStageVolume cut by its deadline still prepares the device for this path (its format, check or
        growth goes on): the disk must not be detached under it."""
        cmd = PathCommand(
            parse_volume_id(request.volume_id), parse_path(request.staging_target_path, "staging_target_path")
        )
        async with self._locks.hold(cmd.volume_id):
            if (preparing := filesystem.JOBS.preparing(cmd.path)) is not None:
                device, doing = preparing
                raise OperationPending(f"still {doing} {device} for {cmd.path} (a NodeStageVolume cut by its deadline "
                                       "goes on until it has finished); retry")
            await mounter.unmount(cmd.path)
        return csi_pb2.NodeUnstageVolumeResponse()

    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: RpcContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        """Bind the staged filesystem (or the device node, block access) onto target_path, ro if asked.

        Same source and ro-ness already there: success. ALREADY_EXISTS: target holds something else or
        the other ro-ness. FAILED_PRECONDITION: not staged, or SINGLE_NODE_SINGLE_WRITER and already published at
        another target_path. NOT_FOUND: block device gone.
        """
        cmd = parse_publish(request)
        async with self._locks.hold(cmd.volume_id):
            if cmd.access.is_block:
                await self._publish_block(cmd)
            else:
                await _publish_filesystem(cmd)
        return csi_pb2.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: RpcContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        """Unmount target_path and delete the directory or file there; already gone is success.

        A non-empty unmounted directory or file is never deleted (it would be user data): FAILED_PRECONDITION.
        """
        cmd = PathCommand(parse_volume_id(request.volume_id), parse_path(request.target_path, "target_path"))
        async with self._locks.hold(cmd.volume_id):
            await mounter.unmount(cmd.path)
            await mounter.remove_path(cmd.path)
        return csi_pb2.NodeUnpublishVolumeResponse()

    async def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: RpcContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        """Usage in BYTES and INODES (filesystem) or BYTES total (block) plus a volume condition.

        Read-only, so it takes no volume lock. NOT_FOUND: nothing at volume_path (ENOENT, ENOTDIR). Abnormal,
        not an error, with the best usage known (at least BYTES, total 0 when nothing is known): a path that is
        no longer mounted, whose device vanished, that fails to read (EIO ...), or whose filesystem the kernel
        made read-only after an error.
        """
        return await _volume_stats(parse_volume_path(request.volume_id, request.volume_path))

    async def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: RpcContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        """Grow the filesystem mounted at volume_path online to fill its device; return the device size.

        Idempotent: a filesystem already filling its device stays as is (NodeStageVolume grows it first when
        the disk grew while detached, the usual case: XO resizes detached disks only). Block volumes need no work.
        NOT_FOUND: nothing (mounted) at volume_path. INVALID_ARGUMENT: fs_type differs from the mounted one.
        OUT_OF_RANGE: bad capacity_range, or the device exceeds limit_bytes. UNAVAILABLE: the device is
        still smaller than capacity_range.required_bytes (the XO resize has not reached this VM yet). ABORTED:
        the growth still runs ``margin_s`` before the deadline (it goes on; the retry joins it).
        """
        cmd = parse_expand(request)
        async with self._locks.hold(cmd.volume_id):
            capacity_bytes = await _expand(cmd, self._give_up_at(context))
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=capacity_bytes)

    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: RpcContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        """STAGE_UNSTAGE_VOLUME, EXPAND_VOLUME, GET_VOLUME_STATS and VOLUME_CONDITION."""
        caps = [csi_pb2.NodeServiceCapability(rpc=_Rpc(type=kind)) for kind in _CAPABILITIES]
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=caps)

    async def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: RpcContext
    ) -> csi_pb2.NodeGetInfoResponse:
        """This VM's node id, its free device slots, and its topology segments (omitted when empty)."""
        response = csi_pb2.NodeGetInfoResponse(
            node_id=self._config.node_id, max_volumes_per_node=self._config.max_volumes_per_node
        )
        if self._config.topology:
            response.accessible_topology.segments.update(self._config.topology)
        return response

    def _give_up_at(self, context: RpcContext) -> float | None:
        """When (loop time) to stop waiting for a device's job: ``margin_s`` before the caller's deadline, so that
        the ABORTED answer goes out before the interceptor cuts the call."""
        remaining_s = context.time_remaining()
        if remaining_s is None:
            return None
        return asyncio.get_running_loop().time() + remaining_s - self._config.margin_s

    async def _wait_for_device(self, name: str) -> mounter.PathInfo:
        """Poll device_dir/name with capped, jittered back-off until it exists or device_wait_s runs out."""
        path = self._config.device_dir / name
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._config.device_wait_s
        delays = _DEVICE_POLL.delays()
        while (info := await mounter.path_info(path)) is None:
            left_s = give_up_at - loop.time()
            if left_s <= 0:
                raise VolumeNotFound(
                    f"device {name} did not appear in {self._config.device_dir} after "
                    f"{self._config.device_wait_s:g}s; is the volume attached to this node?"
                )
            await asyncio.sleep(min(next(delays), left_s))
        return _require_block_device(path, info)

    async def _publish_block(self, cmd: PublishCommand) -> None:
        """Bind the device node onto a file at target_path.

        A read-only bind marks the mount "ro" but the kernel still lets a device node be opened for
        writing; read-only raw block access is enforced by the container runtime's device rules.
        """
        path = self._config.device_dir / cmd.device_name
        device = await mounter.path_info(path)
        if device is None:
            raise VolumeNotFound(f"device {path} of volume {cmd.volume_id} is gone; is it still attached?")
        device = _require_block_device(path, device)
        existing = await mounter.mount_info(cmd.target_path)
        if existing is not None:
            current = await mounter.path_info(cmd.target_path)
            same = current is not None and current.is_block_device and current.rdev == device.rdev
            _check_republish(cmd, existing, is_same_source=same)
            return
        await _check_single_writer(cmd, device.resolved)
        await mounter.make_file(cmd.target_path)
        await mounter.bind_mount(device.resolved, cmd.target_path, readonly=cmd.readonly)
        log.debug("block_published", volume_id=cmd.volume_id, target=str(cmd.target_path))


def _require_block_device(path: Path, info: mounter.PathInfo) -> mounter.PathInfo:
    if not info.is_block_device:
        raise PreconditionFailed(f"{path} resolves to {info.resolved}, which is not a block device")
    return info


async def _check_nothing_staged(staging_path: Path) -> None:
    """Block access stages nothing; a filesystem mounted there means an incompatible earlier stage."""
    if await mounter.mount_info(staging_path) is not None:
        raise AlreadyExistsIncompatible(
            f"staging_target_path {staging_path} holds a mounted filesystem (staged with mount access), "
            "but block access was requested; call NodeUnstageVolume first"
        )


async def _stage_filesystem(cmd: StageCommand, device: mounter.PathInfo, give_up_at: float | None) -> None:
    existing = await mounter.mount_info(cmd.staging_path)
    if existing is not None:
        _check_restage(cmd, device, existing)
        return
    await mounter.make_dir(cmd.staging_path)
    fs_type = await filesystem.stage(device.resolved, cmd.staging_path, cmd.access, give_up_at=give_up_at)
    log.debug("volume_staged", volume_id=cmd.volume_id, device=str(device.resolved), fs_type=fs_type)


def _check_restage(cmd: StageCommand, device: mounter.PathInfo, existing: mounter.MountInfo) -> None:
    """A repeated NodeStageVolume is OK only for the same device, fs type and ro-ness (else ALREADY_EXISTS)."""
    where = f"staging_target_path {cmd.staging_path}"
    if existing.device_number != device.rdev:
        raise AlreadyExistsIncompatible(f"{where} already has {existing.source} mounted, not {device.resolved}")
    if cmd.access.fs_type is not None and existing.fstype != cmd.access.fs_type:
        raise AlreadyExistsIncompatible(f"{where} is staged as {existing.fstype}, not {cmd.access.fs_type}")
    if existing.is_readonly != cmd.access.is_stage_readonly:
        state = "read-only" if existing.is_readonly else "read-write"
        raise AlreadyExistsIncompatible(f"{where} is staged {state}; unstage it to change mount_flags")


async def _publish_filesystem(cmd: PublishCommand) -> None:
    staged = await mounter.mount_info(cmd.staging_path)
    if staged is None:
        raise PreconditionFailed(f"volume is not staged at {cmd.staging_path}; call NodeStageVolume first")
    if cmd.access.fs_type is not None and staged.fstype != cmd.access.fs_type:
        raise PreconditionFailed(f"volume is staged as {staged.fstype} but publish asks for {cmd.access.fs_type}")
    existing = await mounter.mount_info(cmd.target_path)
    if existing is not None:
        same = (existing.device_number, existing.root) == (staged.device_number, staged.root)
        _check_republish(cmd, existing, is_same_source=same)
        return
    await _check_single_writer(cmd, cmd.staging_path)
    await mounter.make_dir(cmd.target_path)
    await mounter.bind_mount(cmd.staging_path, cmd.target_path, readonly=cmd.readonly)
    log.debug("volume_published", volume_id=cmd.volume_id, target=str(cmd.target_path), readonly=cmd.readonly)


async def _check_single_writer(cmd: PublishCommand, source: Path) -> None:
    """SINGLE_NODE_SINGLE_WRITER (Kubernetes' ReadWriteOncePod): a publish at a new target_path while the volume
    (``source``: its staging mount, or its device node) is published at another is FAILED_PRECONDITION (spec,
    second NodePublishVolume table). SINGLE_NODE_MULTI_WRITER and SINGLE_NODE_WRITER publish at every target, as
    Kubernetes does for the pods of one node sharing a ReadWriteOnce claim."""
    if not cmd.access.is_single_writer:
        return
    own = {os.path.realpath(source), os.path.realpath(cmd.target_path)}
    others = sorted(set(await mounter.mount_points_showing(source)) - own)
    if others:
        raise PreconditionFailed(
            f"volume {cmd.volume_id} is already published at {others[0]} with access mode SINGLE_NODE_SINGLE_WRITER "
            "(ReadWriteOncePod): one workload at a time; unpublish it there first"
        )


def _check_republish(cmd: PublishCommand, existing: mounter.MountInfo, *, is_same_source: bool) -> None:
    """A repeated NodePublishVolume is OK only for the same source and ro-ness (else ALREADY_EXISTS)."""
    if not is_same_source:
        raise AlreadyExistsIncompatible(f"target_path {cmd.target_path} already has another volume mounted")
    if existing.is_readonly != cmd.readonly:
        state = "read-only" if existing.is_readonly else "read-write"
        raise AlreadyExistsIncompatible(f"target_path {cmd.target_path} is already published {state}")


async def _volume_stats(cmd: PathCommand) -> csi_pb2.NodeGetVolumeStatsResponse:
    try:
        info = await mounter.path_info(cmd.path)
    except mounter.MountError as exc:  # something is there, but reading it fails (EIO: I/O errors, xfs shut down)
        mounted = await mounter.mount_info(cmd.path)
        usage = await _device_usage(mounted) if mounted is not None else _bytes_usage(0)
        return _stats_response(usage, f"volume_path {cmd.path} cannot be read: {exc.message}")
    if info is None:
        raise VolumeNotFound(f"volume {cmd.volume_id} is not at volume_path {cmd.path}: nothing is there")
    if info.is_block_device:
        return await _block_stats(cmd.path)
    mounted = await mounter.mount_info(cmd.path)
    if mounted is None:
        return _stats_response(_bytes_usage(0), f"{cmd.path} is no longer a mountpoint; the volume was unmounted")
    if not await _is_source_present(mounted):  # no statvfs of a filesystem whose disk is gone
        gone = f"device {mounted.source} behind {cmd.path} is gone; is the disk detached?"
        return _stats_response(_bytes_usage(0), gone)
    try:
        stats = await mounter.fs_stats(cmd.path)
    except mounter.MountError as exc:
        return _stats_response(await _device_usage(mounted), f"filesystem at {cmd.path} cannot be read: {exc.message}")
    usage = [
        csi_pb2.VolumeUsage(
            unit=csi_pb2.VolumeUsage.BYTES,
            total=stats.total_bytes,
            used=stats.used_bytes,
            available=stats.available_bytes,
        ),
        csi_pb2.VolumeUsage(
            unit=csi_pb2.VolumeUsage.INODES,
            total=stats.total_inodes,
            used=stats.used_inodes,
            available=stats.free_inodes,
        ),
    ]
    return _stats_response(usage, _readonly_problem(cmd.path, mounted))


def _readonly_problem(path: Path, mounted: mounter.MountInfo) -> str | None:
    """Why a filesystem that answers statvfs is abnormal anyway: the kernel made it read-only after an error (read
    from the mountinfo line already at hand, no I/O on the volume); None when it is not."""
    if not mounted.is_forced_readonly:
        return None
    repair = "xfs_repair" if mounted.fstype == "xfs" else "e2fsck -f"
    return (
        f"the {mounted.fstype} filesystem on {mounted.source} at {path} turned read-only although it was mounted "
        "read-write, as ext4 does after an error with errors=remount-ro (see the node's kernel log): stop the "
        f"pods using it so that it is unmounted, then run `{repair} {mounted.source}` on the node"
    )


async def _block_stats(path: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
    try:
        size_bytes = await mounter.device_size_bytes(path)
    except mounter.MountError as exc:
        return _stats_response(_bytes_usage(0), f"block device at {path} cannot be read: {exc.message}")
    return _stats_response(_bytes_usage(size_bytes), None)


async def _device_usage(mounted: mounter.MountInfo) -> list[csi_pb2.VolumeUsage]:
    """The best figure for a filesystem that statvfs cannot read: its device's size, or 0 when that is gone too."""
    if not await _is_source_present(mounted):
        return _bytes_usage(0)
    try:
        return _bytes_usage(await mounter.device_size_bytes(Path(mounted.source)))
    except mounter.MountError:
        return _bytes_usage(0)


def _bytes_usage(total_bytes: int) -> list[csi_pb2.VolumeUsage]:
    return [csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=total_bytes)]


def _stats_response(usage: Sequence[csi_pb2.VolumeUsage], problem: str | None) -> csi_pb2.NodeGetVolumeStatsResponse:
    """Usage is never empty, abnormal or not: kubelet (pkg/volume/csi/csi_client.go, NodeGetVolumeStats) fails with
    "usage is nil" before it reads volume_condition, so an abnormal answer without usage never reaches an event."""
    condition = csi_pb2.VolumeCondition(abnormal=problem is not None, message=problem or _HEALTHY)
    return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)


async def _is_source_present(mounted: mounter.MountInfo) -> bool:
    """True when the mount's source is still the block device the filesystem lives on."""
    if not mounted.source.startswith("/"):
        return False
    source = await mounter.path_info(Path(mounted.source))
    return source is not None and source.is_block_device and source.rdev == mounted.device_number


async def _expand(cmd: ExpandCommand, give_up_at: float | None) -> int:
    """Grow the filesystem at cmd.path to its device; return the device size (0 when unknown, block)."""
    info = await mounter.path_info(cmd.path)
    if info is None:
        raise VolumeNotFound(f"volume {cmd.volume_id} is not at volume_path {cmd.path}: nothing is there")
    if info.is_block_device:
        return await mounter.device_size_bytes(cmd.path)
    mounted = await mounter.mount_info(cmd.path)
    if mounted is None:
        if cmd.access is not None and cmd.access.is_block:
            return 0  # a block volume has no filesystem to grow; the CO reads the size elsewhere
        raise VolumeNotFound(f"volume {cmd.volume_id} is not mounted at volume_path {cmd.path}")
    _check_expandable(cmd, mounted)
    device = Path(mounted.source)
    size_bytes = await mounter.device_size_bytes(device)
    if cmd.limit_bytes and size_bytes > cmd.limit_bytes:
        raise OutOfRange(
            f"{device} is {size_bytes} bytes, above capacity_range.limit_bytes {cmd.limit_bytes}; "
            "the filesystem always grows to the whole device"
        )
    if size_bytes < cmd.required_bytes:
        raise BackendUnavailable(
            f"{device} is {size_bytes} bytes, less than the required {cmd.required_bytes}; the disk resize "
            "has not reached this node yet, retry later"
        )
    await filesystem.grow_mounted(device, cmd.path, mounted.fstype, give_up_at=give_up_at)
    return size_bytes


def _check_expandable(cmd: ExpandCommand, mounted: mounter.MountInfo) -> None:
    if cmd.access is not None and cmd.access.is_block:
        raise InvalidRequest(f"volume_capability asks for block access but {cmd.path} is a mounted filesystem")
    if cmd.access is not None and cmd.access.fs_type not in (None, mounted.fstype):
        raise InvalidRequest(f"volume_capability fs_type {cmd.access.fs_type} differs from mounted {mounted.fstype}")
    if mounted.fstype not in mounter.SUPPORTED_FS_TYPES:
        raise PreconditionFailed(f"{cmd.path} holds {mounted.fstype}, which cannot be grown online")
