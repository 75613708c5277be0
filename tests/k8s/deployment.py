"""The driver deployed on the test control plane as k8s/base deploys it: namespace, CSIDriver, RBAC, the controller
Deployment (two replicas, each a frontend + the manifest's sidecars), and the node plugins registered as the kubelet
would. ``Deployed`` gives the tests what a user sees with kubectl (PVCs, PVs, VolumeAttachments, Leases, events) and
what XO holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from dev.stack import Stack
from dev.wait import eventually
from shared.csi import csi_pb2, csi_pb2_grpc
from tests.k8s import objects
from tests.k8s.cluster import Cluster, Obj
from tests.k8s.objects import APPS, NAMESPACE
from tests.k8s.sidecars import SIDECARS, Replica, ReplicaConfig, controller_deployment, start_replica, start_sidecar

PODS = ("xo-csi-controller-0", "xo-csi-controller-1")  # replica A (first leader), replica B
# the sidecars' leader-election locks (csi-lib-utils names them after the driver)
LEASES = {"csi-provisioner": "csi-xen-orchestra-marcsi-ch",
          "csi-attacher": "external-attacher-leader-csi-xen-orchestra-marcsi-ch",
          "csi-resizer": "external-resizer-csi-xen-orchestra-marcsi-ch"}
LEASE_WAIT_S = 60.0  # a lease held by a dead pod expires after 15 s (the sidecars' default), retried every 5 s


@dataclass
class Deployed:
    """The deployed driver, its cluster and the stack under it."""

    cluster: Cluster
    stack: Stack
    config: ReplicaConfig
    replicas: dict[str, Replica] = field(default_factory=dict)
    retired: list[Replica] = field(default_factory=list)  # killed or restarted replicas, for their logs

    # --- controller replicas and leases ------------------------------------------------------------------

    async def start(self, pod: str, extra_args: Mapping[str, Sequence[str]] | None = None) -> Replica:
        self.replicas[pod] = await start_replica(self.config, pod, extra_args)
        return self.replicas[pod]

    async def restart_sidecars(self, name: str, extra: Sequence[str] = ()) -> None:
        """Restart sidecar ``name`` of every replica with ``extra`` flags on top of the manifest's; replica A
        leads again. Its Lease is deleted between stop and start: a stopped sidecar does not release it, and
        waiting 15 s for it to expire tells nothing."""
        for replica in self.replicas.values():
            await replica.processes[name].stop()
        await self.cluster.delete("lease", LEASES[name], NAMESPACE)
        for pod in sorted(self.replicas):
            await start_sidecar(self.config, self.replicas[pod], name, extra)
            if pod == PODS[0]:
                await self.wait_leader(PODS[0])

    async def kill(self, pod: str) -> Replica:
        """kill -9 the pod's frontend and sidecars at once (a node or pod dies)."""
        replica = self.replicas.pop(pod)
        self.retired.append(replica)
        await replica.kill()
        await replica.close()
        return replica

    async def lease_holders(self) -> dict[str, str]:
        """Lease name -> holder identity (the pod name) for the sidecars' leases in the driver's namespace."""
        return {lease["metadata"]["name"]: lease["spec"].get("holderIdentity", "")
                for lease in await self.cluster.list("lease", NAMESPACE)}

    async def wait_leader(self, pod: str, timeout_s: float = LEASE_WAIT_S) -> dict[str, str]:
        """Until the three sidecars' leases are all held by ``pod``."""
        async def held() -> dict[str, str]:
            holders = await self.lease_holders()
            assert holders == dict.fromkeys(LEASES.values(), pod), holders
            return holders
        return await eventually(held, timeout_s, interval_s=0.5, description=f"every lease held by {pod}")

    def all_replicas(self) -> list[Replica]:
        return [*self.retired, *self.replicas.values()]

    def sidecar_log_lines(self, pattern: str) -> list[str]:
        """Lines of every sidecar log (live and retired replicas) matching ``pattern``."""
        regex = re.compile(pattern)
        return [line for r in self.all_replicas() for name in SIDECARS if name in r.processes
                for line in r.log(name).splitlines() if regex.search(line)]

    def rpc_codes(self, rpc: str, volume_id: str | None = None) -> list[str]:
        """The gRPC codes of the ``rpc`` calls the frontends of every replica finished (their rpc_finished
        lines), in order."""
        codes = []
        for replica in self.all_replicas():
            for line in replica.log("xo-csi-frontend").splitlines():
                if '"rpc_finished"' in line:
                    entry = json.loads(line)
                    if entry.get("rpc") == rpc and volume_id in (None, entry.get("volume_id")):
                        codes.append(str(entry["grpc_code"]))
        return codes

    def log_tails(self) -> str:
        return "\n".join(r.log_tails() for r in self.all_replicas())

    # --- what the user sees ------------------------------------------------------------------------------

    async def bound(self, pvc: str, timeout_s: float = 60.0) -> tuple[Obj, Obj]:
        """Until the claim is Bound; (PVC, PV) as kubectl shows them."""
        async def is_bound() -> Obj:
            obj = await self.cluster.get("pvc", pvc, APPS)
            assert obj["status"].get("phase") == "Bound", obj["status"]
            return obj
        claim = await eventually(is_bound, timeout_s, interval_s=0.25, description=f"PVC {pvc} Bound")
        return claim, await self.cluster.get("pv", claim["spec"]["volumeName"])

    async def attach(self, pv: str, node: str, timeout_s: float = 120.0) -> tuple[Obj, float]:
        """Create the VolumeAttachment the attach-detach controller would; (VA once attached, seconds it took)."""
        started = time.monotonic()
        await self.cluster.apply(objects.attachment(pv, node))
        attached = await self.attached(pv, node, timeout_s)
        return attached, time.monotonic() - started

    async def attached(self, pv: str, node: str, timeout_s: float = 120.0) -> Obj:
        name = objects.attachment_name(pv, node)

        async def is_attached() -> Obj:
            va = await self.cluster.get("volumeattachment", name)
            assert va.get("status", {}).get("attached") is True, va.get("status")
            return va
        return await eventually(is_attached, timeout_s, interval_s=0.25, description=f"VA {name} attached")

    async def detach(self, pv: str, node: str, timeout_s: float = 60.0) -> None:
        """Delete the VolumeAttachment; until the attacher removed its finalizer (it detached) and it is gone."""
        name = objects.attachment_name(pv, node)
        await self.cluster.delete("volumeattachment", name)
        await eventually(lambda: self._gone("volumeattachment", name), timeout_s, interval_s=0.25,
                         description=f"VA {name} gone")

    async def gone(self, kind: str, name: str, namespace: str | None = None, timeout_s: float = 60.0) -> None:
        await eventually(lambda: self._gone(kind, name, namespace), timeout_s, interval_s=0.25,
                         description=f"{kind} {name} gone")

    async def _gone(self, kind: str, name: str, namespace: str | None = None) -> bool:
        return await self.cluster.find(kind, name, namespace) is None

    # --- what XO holds -----------------------------------------------------------------------------------

    async def vdis(self, disk: str) -> list[str]:
        """VDI uuids named ``disk``."""
        return sorted(v.id for v in await self.stack.xo.find_vdis(name_label=disk))

    async def vbds(self, disk: str) -> list[tuple[str, bool]]:
        """(VM uuid, attached) of every VBD of every VDI named ``disk``."""
        found = []
        for vdi in await self.stack.xo.find_vdis(name_label=disk):
            found += [(vbd.vm_id, vbd.attached) for vbd in await self.stack.xo.find_vbds(vdi_id=vdi.id)]
        return sorted(found)

    async def node_info(self, vm: str) -> csi_pb2.NodeGetInfoResponse:
        return await self.stack.node(vm).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)

    async def controller_capabilities(self) -> list[int]:
        """The RPC capabilities of the controller service (ControllerGetCapabilities)."""
        replica = next(iter(self.replicas.values()))
        async with grpc.aio.insecure_channel(f"unix://{replica.socket}") as channel:
            response = await csi_pb2_grpc.ControllerStub(channel).ControllerGetCapabilities(
                csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10)
        return [c.rpc.type for c in response.capabilities]

    async def plugin_expansion(self) -> int:
        """The VolumeExpansion type the plugin advertises (csi_pb2.PluginCapability.VolumeExpansion.ONLINE or
        OFFLINE), as the sidecars read it (Identity.GetPluginCapabilities)."""
        replica = next(iter(self.replicas.values()))
        async with grpc.aio.insecure_channel(f"unix://{replica.socket}") as channel:
            response = await csi_pb2_grpc.IdentityStub(channel).GetPluginCapabilities(
                csi_pb2.GetPluginCapabilitiesRequest(), timeout=10)
        (expansion,) = [c.volume_expansion.type for c in response.capabilities if c.HasField("volume_expansion")]
        return int(expansion)


@contextlib.asynccontextmanager
async def deployed(cluster: Cluster, stack: Stack, kubeconfig_dir: Path, frontend_args: tuple[str, ...] = ()
                   ) -> AsyncIterator[Deployed]:
    """Apply k8s/base (namespace, CSIDriver, controller RBAC and Deployment), register the stack's node plugins,
    start replica A, wait until it leads, then start replica B. Everything is stopped on exit (objects stay:
    the control plane is the session's)."""
    for path in ("k8s/base/namespace.yaml", "k8s/base/csidriver.yaml", "k8s/base/rbac-controller.yaml"):
        await cluster.apply(*objects.manifest(path))
    await objects.controller_pods(cluster, controller_deployment(), list(PODS))
    for vm in sorted(stack.vm_ids):
        info = await stack.node(vm).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
        await objects.register_node(cluster, vm, info)
    kubeconfig = await cluster.token_kubeconfig(NAMESPACE, "xo-csi-controller", kubeconfig_dir / "sa.kubeconfig")
    config = ReplicaConfig(cluster, kubeconfig, NAMESPACE, stack.log_dir, stack.service_env(), frontend_args)
    env = Deployed(cluster, stack, config)
    try:
        await env.start(PODS[0])
        stack.controller_socket = env.replicas[PODS[0]].socket  # direct CSI calls of the tests go to replica A
        await env.wait_leader(PODS[0])
        await env.start(PODS[1])
        yield env
    finally:
        await asyncio.gather(*(r.close() for r in env.replicas.values()), return_exceptions=True)
