"""e2e helpers: capabilities; the stack itself runs through services/devstack/stack.py (separate processes)."""

from __future__ import annotations

from shared.csi import csi_pb2

MODE = csi_pb2.VolumeCapability.AccessMode


def mount_cap(fs_type: str = "ext4", mode: int = MODE.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))
