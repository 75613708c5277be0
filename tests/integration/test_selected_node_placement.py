"""WaitForFirstConsumer without the host topology key (issue 10 item 8): CreateVolume reads the claim's selected node
(PVC annotation -> CSINode node id -> the VM's host in XO) and creates the disk on an SR usable from that host, where
it used to take the roomiest SR of the pool (another host's: a migration at the very first attach). The API server
is the HTTP stand-in of tests/support/kube_api.py; placement is otherwise unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.csi_frontend.controller import ControllerServicer
from services.csi_frontend.selected_node import PVC_NAME, PVC_NAMESPACE, SELECTED_NODE
from services.csi_frontend.settings import DEFAULT_DRIVER_NAME
from services.xo_simulator.topology import derived_id
from shared.csi import csi_pb2
from shared.units import GiB
from tests.support.brokers import RedisEndpoint
from tests.support.capabilities import mount_capability
from tests.support.kube_api import FakeKubeApi, fake_kube_api
from tests.support.migration import POOL_A, SR_A1, SR_A2, TAG, VM_A2, Env, open_env, vdis_named
from tests.support.node_host import FakeContext

pytestmark = pytest.mark.integration

VM_A1 = derived_id("vm", "Pool A", "host-a1", "node-a1")


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    async with fake_kube_api() as server:
        server.add_csinode("node-a1", {DEFAULT_DRIVER_NAME: VM_A1, "other.csi.example": "x"})
        server.add_csinode("node-a2", {DEFAULT_DRIVER_NAME: VM_A2})
        yield server


@pytest.fixture
async def env(api: FakeKubeApi, tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint,
              redis_prefix: str) -> AsyncIterator[Env]:
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    async with open_env(amqp_vhost, redis_server, redis_prefix, frontend={"kubeconfig": kubeconfig}) as env:
        yield env


def _controller(env: Env) -> ControllerServicer:
    (servicer,) = [s for s, _ in env.frontend.servicers if isinstance(s, ControllerServicer)]
    return servicer


async def _create(env: Env, name: str, claim: str | None) -> str:
    """CreateVolume as external-provisioner sends it for a WaitForFirstConsumer claim with pool-only topology;
    returns the SR the disk landed on."""
    parameters = {"srsWithTag": TAG, "migrating": "true"}
    if claim:
        parameters |= {PVC_NAME: claim, PVC_NAMESPACE: "apps"}
    pool_only = csi_pb2.Topology(segments={"pool": POOL_A})
    request = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[mount_capability()],
        parameters=parameters, accessibility_requirements=csi_pb2.TopologyRequirement(requisite=[pool_only],
                                                                                     preferred=[pool_only]))
    response = await _controller(env).CreateVolume(request, FakeContext())  # type: ignore[arg-type]
    assert [dict(t.segments) for t in response.volume.accessible_topology] == [{"pool": POOL_A}]
    [vdi] = vdis_named(env.sim, f"csi-{name}")
    return str(vdi["$SR"])


def _free(env: Env, sr: str) -> int:
    [found] = [o for o in env.sim.state.of_type("SR") if o["id"] == sr]
    return int(found["size"]) - int(found["physical_usage"])


async def test_the_disk_lands_near_the_selected_node_not_on_the_roomiest_sr(env: Env, api: FakeKubeApi) -> None:
    assert _free(env, SR_A2) > _free(env, SR_A1)  # pool-only topology alone would pick host a2's SR
    api.add_pvc("apps", "data-a1", {SELECTED_NODE: "node-a1"})
    api.add_pvc("apps", "data-a2", {SELECTED_NODE: "node-a2"})
    assert await _create(env, "pvc-near-a1", "data-a1") == SR_A1
    assert await _create(env, "pvc-near-a2", "data-a2") == SR_A2
    reads: list[Any] = sorted(path for _, path in api.requests)
    assert reads == sorted(["/api/v1/namespaces/apps/persistentvolumeclaims/data-a1",
                            "/apis/storage.k8s.io/v1/csinodes/node-a1",
                            "/api/v1/namespaces/apps/persistentvolumeclaims/data-a2",
                            "/apis/storage.k8s.io/v1/csinodes/node-a2"])


@pytest.mark.parametrize("case", ["immediate binding", "no claim metadata", "node without our driver", "forbidden"])
async def test_without_a_usable_selected_node_placement_is_unchanged(env: Env, api: FakeKubeApi, case: str) -> None:
    claim: str | None = "data"
    if case == "immediate binding":
        api.add_pvc("apps", "data", {})
    elif case == "no claim metadata":
        claim = None
    elif case == "node without our driver":
        api.add_pvc("apps", "data", {SELECTED_NODE: "node-b9"})
        api.add_csinode("node-b9", {"other.csi.example": VM_A1})
    else:
        api.add_pvc("apps", "data", {SELECTED_NODE: "node-a1"})
        api.forbidden.add("/apis/storage.k8s.io/v1/csinodes/node-a1")
    assert await _create(env, "pvc-anywhere", claim) == SR_A2  # the roomiest, as before
