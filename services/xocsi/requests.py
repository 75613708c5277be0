"""Pure parts of the xocsi CLI: endpoint targets, argument types and argparse Namespace -> CSI request.

No I/O and no gRPC calls live here; every builder returns one request message from shared.csi.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from typing import Any

from google.protobuf.message import Message

from shared.csi import csi_pb2
from shared.units import parse_size

DEFAULT_ENDPOINT = "unix:///csi/csi.sock"

_Mode = csi_pb2.VolumeCapability.AccessMode.Mode
ACCESS_MODES: dict[str, int] = {
    "single-node-writer": _Mode.SINGLE_NODE_WRITER,
    "single-node-reader-only": _Mode.SINGLE_NODE_READER_ONLY,
    "single-node-single-writer": _Mode.SINGLE_NODE_SINGLE_WRITER,
    "single-node-multi-writer": _Mode.SINGLE_NODE_MULTI_WRITER,
    "multi-node-reader-only": _Mode.MULTI_NODE_READER_ONLY,
    "multi-node-single-writer": _Mode.MULTI_NODE_SINGLE_WRITER,
    "multi-node-multi-writer": _Mode.MULTI_NODE_MULTI_WRITER,
}


class UsageError(ValueError):
    """The arguments parsed but do not form a valid request; the CLI exits with status 2."""


# --- endpoint -------------------------------------------------------------------------------


def endpoint_target(endpoint: str) -> str:
    """Return the gRPC target for ``unix:///path``, ``unix:/path``, ``/path``, ``tcp://host:port``
    or ``host:port``. Unix socket paths become ``unix:///absolute/path``.

    Raises UsageError for an empty path or a host without a valid port.
    """
    value = endpoint.strip()
    if value.startswith("tcp://"):
        return _host_port(value.removeprefix("tcp://").rstrip("/"), endpoint)
    if value.startswith("unix:"):
        path = value.removeprefix("unix:")
        # unix:///abs -> "///abs"; unix:/abs -> "/abs"; both name the same absolute path.
        path = "/" + path.lstrip("/") if path.startswith("/") else path
    elif "/" in value:
        path = value
    else:
        return _host_port(value, endpoint)
    if not path.strip("/"):
        raise UsageError(f"endpoint {endpoint!r} names no socket path")
    return "unix://" + os.path.abspath(path)


def _host_port(value: str, endpoint: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(
            f"endpoint {endpoint!r} is not unix:///path, /path, tcp://host:port or host:port"
        )
    return f"{host}:{port}"


# --- argument types (raise ArgumentTypeError so argparse reports a usage error) -----------------


def key_value(text: str) -> tuple[str, str]:
    """Parse ``K=V`` (the value may itself contain ``=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def segments(text: str) -> dict[str, str]:
    """Parse a topology segment list ``K=V[,K=V]...``."""
    return dict(key_value(part) for part in text.split(","))


def size_bytes(text: str) -> int:
    """Parse a size such as ``1GiB``, ``512M`` or ``1073741824`` with shared.units.parse_size."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def positive_seconds(text: str) -> float:
    """Parse a deadline in seconds; it must be a positive number."""
    try:
        seconds = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from exc
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"timeout must be positive, got {text!r}")
    return seconds


def non_negative_int(text: str) -> int:
    """Parse a count that may be zero but not negative."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


# --- shared pieces ----------------------------------------------------------------------------


def capability(args: argparse.Namespace) -> csi_pb2.VolumeCapability:
    """Build the VolumeCapability from --block / --fs / --mount-flag / --access-mode."""
    cap = csi_pb2.VolumeCapability()
    cap.access_mode.mode = ACCESS_MODES[args.access_mode]  # type: ignore[assignment]
    if args.block:
        if args.mount_flag:
            raise UsageError("--mount-flag needs mount access; it cannot be combined with --block")
        cap.block.SetInParent()
    else:
        cap.mount.SetInParent()
        cap.mount.fs_type = args.fs or ""
        cap.mount.mount_flags.extend(args.mount_flag)
    return cap


def optional_capability(args: argparse.Namespace) -> csi_pb2.VolumeCapability | None:
    """The capability only when --block or --fs was given (the request field is OPTIONAL)."""
    if args.block or args.fs is not None:
        return capability(args)
    if args.mount_flag:
        raise UsageError("--mount-flag needs --fs")
    return None


def apply_secrets(request: Message, secrets: Iterable[tuple[str, str]]) -> None:
    """Copy --secret pairs into the request's ``secrets`` map.

    Raises UsageError when secrets were given but the RPC takes none, so they are never dropped silently.
    """
    pairs = dict(secrets)
    if not pairs:
        return
    if "secrets" not in request.DESCRIPTOR.fields_by_name:
        raise UsageError(f"--secret is not accepted by {request.DESCRIPTOR.name}")
    target: Any = request
    target.secrets.update(pairs)


def _topologies(values: Iterable[dict[str, str]]) -> list[csi_pb2.Topology]:
    return [csi_pb2.Topology(segments=value) for value in values]


# --- Identity / Controller / Node request builders ---------------------------------------------


def create_volume(args: argparse.Namespace) -> csi_pb2.CreateVolumeRequest:
    request = csi_pb2.CreateVolumeRequest(
        name=args.name,
        volume_capabilities=[capability(args)],
        parameters=dict(args.param),
        mutable_parameters=dict(args.mutable_param),
    )
    if args.size is not None:
        request.capacity_range.required_bytes = args.size
    if args.limit is not None:
        request.capacity_range.limit_bytes = args.limit
    if args.requisite or args.preferred:
        request.accessibility_requirements.requisite.extend(_topologies(args.requisite))
        request.accessibility_requirements.preferred.extend(_topologies(args.preferred))
    if args.from_snapshot:
        request.volume_content_source.snapshot.snapshot_id = args.from_snapshot
    elif args.from_volume:
        request.volume_content_source.volume.volume_id = args.from_volume
    return request


def delete_volume(args: argparse.Namespace) -> csi_pb2.DeleteVolumeRequest:
    return csi_pb2.DeleteVolumeRequest(volume_id=args.volume_id)


def list_volumes(args: argparse.Namespace) -> csi_pb2.ListVolumesRequest:
    return csi_pb2.ListVolumesRequest(max_entries=args.max or 0, starting_token=args.starting_token)


def get_volume(args: argparse.Namespace) -> csi_pb2.ControllerGetVolumeRequest:
    return csi_pb2.ControllerGetVolumeRequest(volume_id=args.volume_id)


def expand_volume(args: argparse.Namespace) -> csi_pb2.ControllerExpandVolumeRequest:
    request = csi_pb2.ControllerExpandVolumeRequest(volume_id=args.volume_id)
    request.capacity_range.required_bytes = args.size
    if (cap := optional_capability(args)) is not None:
        request.volume_capability.CopyFrom(cap)
    return request


def modify_volume(args: argparse.Namespace) -> csi_pb2.ControllerModifyVolumeRequest:
    return csi_pb2.ControllerModifyVolumeRequest(
        volume_id=args.volume_id, mutable_parameters=dict(args.mutable_param)
    )


def validate_volume(args: argparse.Namespace) -> csi_pb2.ValidateVolumeCapabilitiesRequest:
    return csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=args.volume_id,
        volume_capabilities=[capability(args)],
        volume_context=dict(args.context),
        parameters=dict(args.param),
    )


def controller_publish(args: argparse.Namespace) -> csi_pb2.ControllerPublishVolumeRequest:
    return csi_pb2.ControllerPublishVolumeRequest(
        volume_id=args.volume_id,
        node_id=args.node,
        volume_capability=capability(args),
        readonly=args.readonly,
        volume_context=dict(args.context),
    )


def controller_unpublish(args: argparse.Namespace) -> csi_pb2.ControllerUnpublishVolumeRequest:
    return csi_pb2.ControllerUnpublishVolumeRequest(volume_id=args.volume_id, node_id=args.node or "")


def get_capacity(args: argparse.Namespace) -> csi_pb2.GetCapacityRequest:
    request = csi_pb2.GetCapacityRequest(parameters=dict(args.param))
    if (cap := optional_capability(args)) is not None:
        request.volume_capabilities.append(cap)
    if args.segment:
        request.accessible_topology.segments.update(dict(args.segment))
    return request


def create_snapshot(args: argparse.Namespace) -> csi_pb2.CreateSnapshotRequest:
    return csi_pb2.CreateSnapshotRequest(
        source_volume_id=args.source_volume_id, name=args.name, parameters=dict(args.param)
    )


def delete_snapshot(args: argparse.Namespace) -> csi_pb2.DeleteSnapshotRequest:
    return csi_pb2.DeleteSnapshotRequest(snapshot_id=args.snapshot_id)


def list_snapshots(args: argparse.Namespace) -> csi_pb2.ListSnapshotsRequest:
    return csi_pb2.ListSnapshotsRequest(
        max_entries=args.max or 0,
        starting_token=args.starting_token,
        source_volume_id=args.volume or "",
        snapshot_id=args.snapshot or "",
    )


def get_snapshot(args: argparse.Namespace) -> csi_pb2.GetSnapshotRequest:
    return csi_pb2.GetSnapshotRequest(snapshot_id=args.snapshot_id)


def _attached_volume(args: argparse.Namespace) -> dict[str, Any]:
    """The fields NodeStageVolume and NodePublishVolume share: the volume, its contexts and capability."""
    return {"volume_id": args.volume_id, "publish_context": dict(args.publish_context),
            "volume_context": dict(args.context), "volume_capability": capability(args)}


def node_stage(args: argparse.Namespace) -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(staging_target_path=args.staging_path, **_attached_volume(args))


def node_unstage(args: argparse.Namespace) -> csi_pb2.NodeUnstageVolumeRequest:
    return csi_pb2.NodeUnstageVolumeRequest(volume_id=args.volume_id, staging_target_path=args.staging_path)


def node_publish(args: argparse.Namespace) -> csi_pb2.NodePublishVolumeRequest:
    return csi_pb2.NodePublishVolumeRequest(staging_target_path=args.staging_path or "", target_path=args.target_path,
                                            readonly=args.readonly, **_attached_volume(args))


def node_unpublish(args: argparse.Namespace) -> csi_pb2.NodeUnpublishVolumeRequest:
    return csi_pb2.NodeUnpublishVolumeRequest(volume_id=args.volume_id, target_path=args.target_path)


def node_stats(args: argparse.Namespace) -> csi_pb2.NodeGetVolumeStatsRequest:
    return csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=args.volume_id, volume_path=args.path, staging_target_path=args.staging_path or ""
    )


def node_expand(args: argparse.Namespace) -> csi_pb2.NodeExpandVolumeRequest:
    request = csi_pb2.NodeExpandVolumeRequest(
        volume_id=args.volume_id, volume_path=args.path, staging_target_path=args.staging_path or ""
    )
    request.capacity_range.required_bytes = args.size
    if (cap := optional_capability(args)) is not None:
        request.volume_capability.CopyFrom(cap)
    return request
