"""`xo-csi-frontend --mode node` starts and serves with no XOA_* variable at all (issue 10 item 6): its node id from
DMI, its topology from its Node's labels through the Kubernetes API (a stand-in server here; the k8s suite does it
against a real kube-apiserver with the shipped RBAC)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest

from dev.process import service_process
from dev.stack import socket_answers
from services.csi_frontend.node_identity import HOST_LABEL, POOL_LABEL
from shared.csi import csi_pb2, csi_pb2_grpc
from tests.support.kube_api import fake_kube_api

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

VM = "9d5c2f1a-3b4e-4c6d-8e7f-0a1b2c3d4e5f"


async def test_node_plugin_starts_without_any_xo_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("XOA_")]:
        monkeypatch.delenv(name)
    dmi = tmp_path / "product_uuid"
    dmi.write_text(VM.upper() + "\n")
    socket = tmp_path / "node.sock"
    async with fake_kube_api() as api:
        api.add_node("worker-1", {POOL_LABEL: "pool-1", HOST_LABEL: "host-a"}, f"xenorchestra://pool-1/{VM}")
        argv = [sys.executable, "-m", "services.csi_frontend", "--mode", "node", "--endpoint", f"unix://{socket}",
                "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig")), "--host-topology"]
        env = {"CSI_NODE_NAME": "worker-1", "CSI_DMI_UUID_PATH": str(dmi), "CSI_DEVICE_DIR": str(tmp_path)}
        async with service_process(argv, log_dir=tmp_path / "logs", env=env, ready=lambda: socket_answers(socket),
                                   name="node-without-xo", timeout_s=30) as node:
            async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
                info = await csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5)
                probe = await csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=5)
            assert info.node_id == VM
            assert dict(info.accessible_topology.segments) == {"pool": "pool-1", "host": "host-a"}
            assert probe.ready.value is True
            assert "XOA" not in node.log_text() and "xo_" not in node.log_text()
        assert api.requests == [("GET", "/api/v1/nodes/worker-1")]


async def test_node_plugin_without_a_node_name_says_how_to_set_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith(("XOA_", "CSI_"))]:
        monkeypatch.delenv(name)
    async with fake_kube_api() as api:
        argv = [sys.executable, "-m", "services.csi_frontend", "--mode", "node", "--endpoint",
                f"unix://{tmp_path / 'n.sock'}", "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig"))]
        done = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(done.communicate(), timeout=30)
    assert done.returncode == 1, output.decode()
    assert "--node-name (CSI_NODE_NAME" in output.decode() and "spec.nodeName" in output.decode()
