"""A node plugin on a real kube-apiserver with the shipped RBAC (k8s/base/rbac-node.yaml) and no XO setting: it
reads its Node as the xo-csi-node ServiceAccount (get nodes, nothing more), takes its pool and host from the XO CCM's
labels and its node id from DMI, byte-swapped as the Node's providerID says."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest

from dev.process import service_process
from dev.stack import socket_answers
from services.csi_frontend.node_identity import HOST_LABEL, POOL_LABEL, byte_swapped
from shared.csi import csi_pb2, csi_pb2_grpc
from tests.k8s import objects
from tests.k8s.cluster import Cluster
from tests.k8s.objects import NAMESPACE

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(120)]

VM = "6f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
NODE = "ccm-labelled-node"


async def test_node_plugin_reads_its_node_with_only_get_nodes(k8s_cluster: Cluster, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = k8s_cluster
    for path in ("k8s/base/namespace.yaml", "k8s/base/rbac-node.yaml"):
        await cluster.apply(*objects.manifest(path))
    await cluster.apply({"apiVersion": "v1", "kind": "Node",
                         "metadata": {"name": NODE, "labels": {POOL_LABEL: "pool-7", HOST_LABEL: "host-7b"}},
                         "spec": {"providerID": f"xenorchestra://pool-7/{VM}"}})
    try:
        account = f"system:serviceaccount:{NAMESPACE}:xo-csi-node"
        for verb, expected in (("get", "yes"), ("list", "no"), ("watch", "no"), ("patch", "no")):
            answer = await _can_i(cluster, account, verb, "nodes")
            assert answer == expected, (verb, answer)
        assert await _can_i(cluster, account, "get", "persistentvolumeclaims") == "no"

        kubeconfig = await cluster.token_kubeconfig(NAMESPACE, "xo-csi-node", tmp_path / "node.kubeconfig")
        for name in [name for name in os.environ if name.startswith("XOA_")]:
            monkeypatch.delenv(name)
        dmi = tmp_path / "product_uuid"
        dmi.write_text(byte_swapped(VM).upper() + "\n")  # a UEFI VM: DMI holds the byte-swapped UUID
        socket = tmp_path / "node.sock"
        argv = [sys.executable, "-m", "services.csi_frontend", "--mode", "node", "--endpoint", f"unix://{socket}",
                "--kubeconfig", str(kubeconfig), "--host-topology"]
        env = {"CSI_NODE_NAME": NODE, "CSI_DMI_UUID_PATH": str(dmi), "CSI_DEVICE_DIR": str(tmp_path)}
        async with service_process(argv, log_dir=tmp_path / "logs", env=env, ready=lambda: socket_answers(socket),
                                   name="node-plugin-k8s", timeout_s=60):
            async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
                info = await csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5)
        assert info.node_id == VM
        assert dict(info.accessible_topology.segments) == {"pool": "pool-7", "host": "host-7b"}
    finally:
        await cluster.delete("node", NODE)


async def _can_i(cluster: Cluster, account: str, verb: str, resource: str) -> str:
    process = await _kubectl_no_check(cluster, "auth", "can-i", verb, resource, f"--as={account}")
    return process.strip()


async def _kubectl_no_check(cluster: Cluster, *args: str) -> str:
    """kubectl auth can-i exits 1 when the answer is "no": read stdout either way."""
    process = await asyncio.create_subprocess_exec(
        str(cluster.binary("kubectl")), f"--kubeconfig={cluster.kubeconfig}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return out.decode()
