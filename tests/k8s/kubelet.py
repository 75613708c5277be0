"""The kubelet's side of a volume, played by the test: NodeStage/NodePublish from the PV (handle, fsType, volume
attributes) and the VolumeAttachment's attachment metadata, NodeExpandVolume, and the claim's resize status."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from shared.csi import csi_pb2
from tests.k8s.cluster import Obj
from tests.k8s.deployment import Deployed
from tests.k8s.objects import APPS, DRIVER, attachment_name

_Mode = csi_pb2.VolumeCapability.AccessMode


def capability(pv: Obj) -> csi_pb2.VolumeCapability:
    """A filesystem capability with the PV's fsType and the mode the kubelet sends a node plugin that advertises
    SINGLE_NODE_MULTI_WRITER (pkg/volume/csi asCSIAccessModeV1): ReadWriteOncePod as SINGLE_NODE_SINGLE_WRITER,
    ReadWriteOnce as SINGLE_NODE_MULTI_WRITER."""
    once_pod = "ReadWriteOncePod" in pv["spec"].get("accessModes", [])
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=pv["spec"]["csi"].get("fsType", "")),
        access_mode=_Mode(mode=_Mode.SINGLE_NODE_SINGLE_WRITER if once_pod else _Mode.SINGLE_NODE_MULTI_WRITER))


@contextlib.asynccontextmanager
async def mounted(env: Deployed, node: str, pv_name: str) -> AsyncIterator[Path]:
    """Stage (global mount) and publish (pod mount) the attached volume on ``node`` as the kubelet would; yields
    the pod's mount path; unpublish and unstage on exit."""
    pv = await env.cluster.get("pv", pv_name)
    va = await env.cluster.get("volumeattachment", attachment_name(pv_name, node))
    csi = pv["spec"]["csi"]
    root = env.stack.work / "kubelet" / node
    digest = hashlib.sha256(csi["volumeHandle"].encode()).hexdigest()
    staging = root / "plugins/kubernetes.io/csi" / DRIVER / digest / "globalmount"
    target = root / "pods" / digest[:12] / "volumes/kubernetes.io~csi" / pv_name / "mount"
    plugin = env.stack.node(node)
    common = {"volume_id": csi["volumeHandle"], "publish_context": va["status"].get("attachmentMetadata", {}),
              "volume_capability": capability(pv), "volume_context": csi.get("volumeAttributes", {}),
              "staging_target_path": str(staging)}
    await plugin.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(**common), timeout=60)
    try:
        await plugin.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(**common, target_path=str(target)),
                                       timeout=30)
        try:
            yield target
        finally:
            await plugin.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=csi["volumeHandle"], target_path=str(target)), timeout=30)
    finally:
        await plugin.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=csi["volumeHandle"], staging_target_path=str(staging)), timeout=30)


async def expand(env: Deployed, node: str, pv_name: str, target: Path, size_bytes: int) -> None:
    """NodeExpandVolume on the published volume: the kubelet calls it once the resizer is done, on the mounted volume
    (ONLINE) or right after staging it again (OFFLINE, the claim NodeResizePending)."""
    pv = await env.cluster.get("pv", pv_name)
    await env.stack.node(node).NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=pv["spec"]["csi"]["volumeHandle"], volume_path=str(target), volume_capability=capability(pv),
        capacity_range=csi_pb2.CapacityRange(required_bytes=size_bytes)), timeout=60)


async def finish_resize(env: Deployed, pvc: str, size: str) -> None:
    """Record on the claim that the filesystem was grown, as the kubelet does: capacity, no resize condition."""
    await env.cluster.patch("pvc", pvc, {"status": {"capacity": {"storage": size}, "conditions": None,
                                                    "allocatedResourceStatuses": None}}, APPS, "status")
