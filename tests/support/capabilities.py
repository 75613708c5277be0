"""VolumeCapability builders for the node tests (unit and integration)."""

from __future__ import annotations

from collections.abc import Sequence

from shared.csi import csi_pb2

_Mode = csi_pb2.VolumeCapability.AccessMode


def mount_capability(fs_type: str = "", mode: csi_pb2.VolumeCapability.AccessMode.Mode = _Mode.SINGLE_NODE_WRITER,
                     flags: Sequence[str] = ()) -> csi_pb2.VolumeCapability:
    """``flags``: mount_flags, as a PV's mountOptions reach the node."""
    mount = csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags))
    return csi_pb2.VolumeCapability(mount=mount, access_mode=_Mode(mode=mode))


def block_capability(mode: csi_pb2.VolumeCapability.AccessMode.Mode = _Mode.SINGLE_NODE_WRITER
                     ) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=_Mode(mode=mode))
