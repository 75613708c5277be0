"""Kubernetes objects the suite creates in place of the scheduler, the kubelet, the attach-detach controller and
a user: Nodes + CSINodes from the node plugins' NodeGetInfo, the controller pods' owner chain, StorageClasses from
k8s/examples, PVCs (with the scheduler's selected-node annotation), static PVs and VolumeAttachments.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any

import yaml

from shared.csi import csi_pb2
from tests.k8s.cluster import REPO, Cluster, Obj

DRIVER = "csi.xen-orchestra.marcsi.ch"
NAMESPACE = "xo-csi"  # the driver's, from k8s/base
APPS = "default"  # where the test's claims live
SELECTED_NODE = "volume.kubernetes.io/selected-node"
BASE = REPO / "k8s/base"
EXAMPLES = REPO / "k8s/examples"


def manifest(path: str) -> list[Obj]:
    """The documents of a manifest file under the repository."""
    return [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]


def storage_class(example: str, name: str | None = None, **changes: Any) -> Obj:
    """A StorageClass of k8s/examples (e.g. "storageclass-xoa-migrating.yaml"), renamed/changed if asked."""
    (sc,) = manifest(f"k8s/examples/{example}")
    sc = copy.deepcopy(sc)
    if name:
        sc["metadata"]["name"] = name
    sc.update(changes)
    return sc


async def register_node(cluster: Cluster, name: str, info: csi_pb2.NodeGetInfoResponse) -> None:
    """What the kubelet does when the node plugin registers: the Node carries the plugin's topology segments as
    labels, the CSINode lists the driver with its node id (the VM UUID) and topology keys."""
    segments = dict(info.accessible_topology.segments)
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **segments}}}
    await cluster.apply(node)
    uid = (await cluster.get("node", name))["metadata"]["uid"]
    driver = {"name": DRIVER, "nodeID": info.node_id, "topologyKeys": sorted(segments)}
    if info.max_volumes_per_node:
        driver["allocatable"] = {"count": info.max_volumes_per_node}
    await cluster.apply({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
                         "metadata": {"name": name, "ownerReferences": [
                             {"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]},
                         "spec": {"drivers": [driver]}})


async def controller_pods(cluster: Cluster, deployment: Obj, pods: list[str]) -> None:
    """The Deployment of k8s/base/controller.yaml, a ReplicaSet it owns and its Pods (Pending: no scheduler), as
    the Deployment controller would make them. The provisioner walks Pod -> ReplicaSet -> Deployment to own its
    CSIStorageCapacity objects (--capacity-ownerref-level=2)."""
    await cluster.apply(deployment)
    meta = deployment["metadata"]
    owner = await cluster.get("deployment", meta["name"], meta["namespace"])
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    rs_name = f"{meta['name']}-{hashlib.sha256(meta['name'].encode()).hexdigest()[:10]}"
    replica_set = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                   "metadata": {"name": rs_name, "namespace": meta["namespace"], "labels": labels,
                                "ownerReferences": [_owner(owner)]},
                   "spec": {"replicas": len(pods), "selector": deployment["spec"]["selector"], "template": template}}
    await cluster.apply(replica_set)
    rs = await cluster.get("replicaset", rs_name, meta["namespace"])
    for pod in pods:
        await cluster.apply({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": pod, "namespace": meta["namespace"],
                                          "labels": labels, "ownerReferences": [_owner(rs)]},
                             "spec": template["spec"]})


def _owner(obj: Obj) -> Obj:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def claim(name: str, storage_class_name: str, size: str, node: str | None = None) -> Obj:
    """A ReadWriteOnce filesystem PVC; ``node``: the scheduler's pick for a WaitForFirstConsumer class."""
    meta: Obj = {"name": name, "namespace": APPS}
    if node:
        meta["annotations"] = {SELECTED_NODE: node}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta,
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": storage_class_name,
                     "resources": {"requests": {"storage": size}}}}


def static_volume(name: str, handle: str, size: str, *, fs_type: str = "ext4",
                  attributes: Mapping[str, str] | None = None) -> Obj:
    """A pre-provisioned PV with reclaim Retain (an admin's, for a disk made elsewhere)."""
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "csi": {"driver": DRIVER, "volumeHandle": handle, "fsType": fs_type,
                             "volumeAttributes": dict(attributes or {})}}}


def attachment_name(pv: str, node: str) -> str:
    """The name the attach-detach controller gives: csi-<sha256(volume handle-ish + attacher + node)>."""
    return "csi-" + hashlib.sha256(f"{pv}{DRIVER}{node}".encode()).hexdigest()


def attachment(pv: str, node: str) -> Obj:
    return {"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
            "metadata": {"name": attachment_name(pv, node)},
            "spec": {"attacher": DRIVER, "nodeName": node, "source": {"persistentVolumeName": pv}}}
