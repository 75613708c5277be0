"""A node plugin learns its VM and topology with no XO credentials: DMI for the node id (raw or byte-swapped as the
Node's providerID says), the XO CCM's labels on its Node for pool and host, read with lightkube over real HTTP from
a stand-in API server (tests/support/kube_api.py; tests/k8s/test_node_metadata_k8s.py does it on a real one).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from services.csi_frontend.node_identity import HOST_LABEL, POOL_LABEL, byte_swapped, from_kubernetes
from shared.errors import BackendFailure, BackendUnavailable, NodeNotFound, PreconditionFailed
from shared.kube import KubeReader
from tests.support.kube_api import FakeKubeApi, fake_kube_api

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

RAW = "4b3e1a2f-6c7d-4e8f-9a0b-1c2d3e4f5a6b"
SWAPPED = byte_swapped(RAW)
POOL, HOST = "pool-uuid-1", "host-uuid-a"
LABELS = {POOL_LABEL: POOL, HOST_LABEL: HOST}


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    async with fake_kube_api() as server:
        yield server


@pytest.fixture
async def kube(api: FakeKubeApi, tmp_path: Path) -> AsyncIterator[KubeReader]:
    reader = KubeReader.from_config(api.kubeconfig(tmp_path / "kubeconfig"), timeout_s=5)
    yield reader
    await reader.close()


@pytest.fixture
def dmi(tmp_path: Path) -> Path:
    path = tmp_path / "product_uuid"
    path.write_text(RAW.upper() + "\n")  # DMI prints upper case
    return path


async def _metadata(kube: KubeReader, dmi: Path, *, host_topology: bool = False, wait_s: float = 0.0,
                    node_id: str | None = None) -> tuple[str, dict[str, str]]:
    found = await from_kubernetes(kube, "worker-1", node_id=node_id, dmi_path=dmi, host_topology=host_topology,
                                  wait_s=wait_s)
    return found.node_id, found.topology


@pytest.mark.parametrize(("provider_id", "expected"), [
    (f"xenorchestra://{POOL}/{RAW}", RAW),
    (f"xenorchestra://{POOL}/{SWAPPED}", SWAPPED),  # UEFI/SMBIOS 2.8 VM: DMI shows the byte-swapped UUID
])
async def test_node_id_form_follows_the_provider_id_and_topology_the_ccm_labels(
        api: FakeKubeApi, kube: KubeReader, dmi: Path, provider_id: str, expected: str) -> None:
    api.add_node("worker-1", LABELS, provider_id)
    assert await _metadata(kube, dmi) == (expected, {"pool": POOL})
    assert await _metadata(kube, dmi, host_topology=True) == (expected, {"pool": POOL, "host": HOST})
    assert api.requests == [("GET", "/api/v1/nodes/worker-1")] * 2  # one read each; nothing else asked


async def test_without_a_provider_id_the_raw_dmi_uuid_is_used_with_a_warning(
        api: FakeKubeApi, kube: KubeReader, dmi: Path) -> None:
    api.add_node("worker-1", LABELS)
    with capture_logs() as logs:
        assert await _metadata(kube, dmi) == (RAW, {"pool": POOL})
    warnings = [entry for entry in logs if entry["event"] == "node_id_unverified"]
    assert [(w["node_id"], w["byte_swapped"], w["log_level"]) for w in warnings] == [(RAW, SWAPPED, "warning")]


async def test_a_provider_id_naming_another_vm_is_refused(api: FakeKubeApi, kube: KubeReader, dmi: Path) -> None:
    other = "00000000-1111-2222-3333-444444444444"
    api.add_node("worker-1", LABELS, f"xenorchestra://{POOL}/{other}")
    with pytest.raises(PreconditionFailed, match=f"names VM {other}, but .* holds {RAW}.*--node-id"):
        await _metadata(kube, dmi)
    assert await _metadata(kube, dmi, node_id=other.upper()) == (other, {"pool": POOL})  # --node-id wins


async def test_missing_labels_name_the_labels_and_the_ccm(api: FakeKubeApi, kube: KubeReader, dmi: Path) -> None:
    api.add_node("worker-1", {POOL_LABEL: POOL})
    assert await _metadata(kube, dmi) == (RAW, {"pool": POOL})  # no host wanted: fine
    with pytest.raises(PreconditionFailed) as raised:
        await _metadata(kube, dmi, host_topology=True, wait_s=0.3)
    message = raised.value.message
    assert f"no label {HOST_LABEL} after 0.3 s" in message and "cloud controller manager" in message
    assert "--node-metadata=xo" in message
    assert len(api.requests) >= 3  # re-read while waiting


async def test_labels_set_while_waiting_are_picked_up(api: FakeKubeApi, kube: KubeReader, dmi: Path) -> None:
    api.add_node("worker-1", {})

    async def ccm_labels_it() -> None:
        while len(api.requests) < 2:
            await asyncio.sleep(0.01)
        api.nodes["worker-1"]["metadata"]["labels"] = dict(LABELS)

    labeller = asyncio.create_task(ccm_labels_it())
    assert await _metadata(kube, dmi, host_topology=True, wait_s=10) == (RAW, {"pool": POOL, "host": HOST})
    await labeller


async def test_an_unknown_node_name_is_node_not_found(kube: KubeReader, dmi: Path) -> None:
    with pytest.raises(NodeNotFound, match="no Node 'worker-1'.*CSI_NODE_NAME"):
        await _metadata(kube, dmi)


async def test_forbidden_names_the_rbac_rule_and_unreachable_is_unavailable(
        api: FakeKubeApi, kube: KubeReader, dmi: Path, tmp_path: Path) -> None:
    api.forbidden.add("/api/v1/nodes/worker-1")
    with pytest.raises(BackendFailure, match=r"refused to read Node worker-1 \(403.*RBAC `get nodes`"):
        await _metadata(kube, dmi)
    closed = FakeKubeApi(url="http://127.0.0.1:9")  # discard port: nothing listens
    unreachable = KubeReader.from_config(closed.kubeconfig(tmp_path / "closed"), timeout_s=2)
    try:
        with pytest.raises(BackendUnavailable, match="cannot be reached reading Node worker-1"):
            await _metadata(unreachable, dmi)
    finally:
        await unreachable.close()
