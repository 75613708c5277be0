"""VolumeCapability builders for the node tests (unit and integration)."""

from __future__ import annotations

from shared.csi import csi_pb2

_Mode = csi_pb2.VolumeCapability.AccessMode


def mount_capability(fs_type: str = "", mode: csi_pb2.VolumeCapability.AccessMode.Mode = _Mode.SINGLE_NODE_WRITER
                     ) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=_Mode(mode=mode))


def block_capability(mode: csi_pb2.VolumeCapability.AccessMode.Mode = _Mode.SINGLE_NODE_WRITER
                     ) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=_Mode(mode=mode))
