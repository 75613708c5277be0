"""Which VM a node plugin runs in (the CSI node id: the VM UUID) and its topology, learnt once at start-up.

``--node-metadata=kubernetes`` (default, as m4rCsi): no XO credentials. The node id is ``--node-id``, else DMI's
product_uuid; the pool and host come from this Node's labels set by the XO cloud controller manager
(``topology.k8s.xenorchestra/pool_id``, ``.../host_id``), read through the Kubernetes API (RBAC: get nodes).
XCP-ng VMs booted with UEFI/SMBIOS 2.8 expose the UUID's first three groups little-endian: the raw or the
byte-swapped form is chosen by the VM UUID in the Node's providerID (``xenorchestra://<pool>/<vm>``, set by the
CCM); without one the raw form is used, as m4rCsi does, with a warning.
``--node-metadata=xo``: the VM is looked up in XO (any signed-in account), both forms tried.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from shared import placement
from shared.backoff import Backoff
from shared.errors import NodeNotFound, PreconditionFailed
from shared.kube import KubeReader, NodeObject
from shared.logging import get_logger
from shared.xo.inventory import Inventory

log = get_logger(__name__)

POOL_LABEL = "topology.k8s.xenorchestra/pool_id"
HOST_LABEL = "topology.k8s.xenorchestra/host_id"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_LABELS_POLL = Backoff(start_s=0.2, cap_s=5.0)


@dataclass(frozen=True)
class NodeMetadata:
    """This node's VM UUID and its topology segments (``pool``, and ``host`` with --host-topology)."""

    node_id: str
    topology: dict[str, str]


def byte_swapped(vm_uuid: str) -> str:
    """The UUID with its first three fields byte-swapped (SMBIOS 2.8 little-endian encoding)."""
    return str(uuid.UUID(bytes_le=uuid.UUID(vm_uuid).bytes))


async def read_dmi_uuid(path: Path) -> str:
    text = await asyncio.to_thread(path.read_text)
    return text.strip().lower()


async def from_kubernetes(kube: KubeReader, node_name: str, *, node_id: str | None, dmi_path: Path,
                          host_topology: bool, wait_s: float) -> NodeMetadata:
    """Node id and topology from DMI and the Node object. The labels are awaited up to ``wait_s`` (the CCM sets
    them shortly after the Node registers); then PreconditionFailed naming the labels and the CCM. NodeNotFound
    when no Node ``node_name`` exists by then; BackendUnavailable/BackendFailure when the API cannot be read."""
    wanted = (POOL_LABEL, HOST_LABEL) if host_topology else (POOL_LABEL,)
    node = await _labelled_node(kube, node_name, wanted, wait_s)
    chosen = node_id.lower() if node_id else choose_dmi_form(await read_dmi_uuid(dmi_path), node.provider_id, dmi_path)
    return NodeMetadata(chosen, placement.node_segments(node.labels[POOL_LABEL], node.labels.get(HOST_LABEL, ""),
                                                        host_topology))


async def _labelled_node(kube: KubeReader, node_name: str, wanted: tuple[str, ...], wait_s: float) -> NodeObject:
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + wait_s
    delays = _LABELS_POLL.delays()
    while True:
        node = await kube.node(node_name)
        missing = [label for label in wanted if not (node and node.labels.get(label))]
        if node is not None and not missing:
            return node
        left_s = give_up_at - loop.time()
        if left_s <= 0:
            if node is None:
                raise NodeNotFound(f"the Kubernetes API has no Node {node_name!r}; --node-name (CSI_NODE_NAME) must "
                                   "be this node's name (the DaemonSet sets it from spec.nodeName)")
            raise PreconditionFailed(
                f"Node {node_name} has no label {', '.join(missing)} after {wait_s:g} s: the XO cloud controller "
                "manager (vatesfr/xenorchestra-cloud-controller-manager) sets them; install it, or run the node "
                "plugin with --node-metadata=xo and an XO account")
        log.info("node_labels_awaited", node_name=node_name, missing=missing, node_found=node is not None)
        await asyncio.sleep(min(next(delays), left_s))  # capped back-off while the CCM labels the Node


def choose_dmi_form(raw: str, provider_id: str, dmi_path: Path) -> str:
    """The raw DMI UUID or its byte-swapped form, whichever the providerID names; raw (with a warning) when the
    providerID names no UUID. PreconditionFailed when it names a UUID that is neither (another VM's?)."""
    swapped = byte_swapped(raw)
    found = _UUID.findall(provider_id)
    if not found:
        log.warning("node_id_unverified", node_id=raw, byte_swapped=swapped, provider_id=provider_id or None,
                    note="no VM UUID in the Node's providerID: using the raw DMI UUID (m4rCsi's choice); if this "
                         "VM boots with UEFI, pass --node-id with the VM UUID")
        return raw
    vm_id = str(found[-1]).lower()
    if vm_id in (raw, swapped):
        return vm_id
    raise PreconditionFailed(
        f"the Node's providerID {provider_id} names VM {vm_id}, but {dmi_path} holds {raw} (byte-swapped {swapped}); "
        "pass --node-id with this VM's UUID")


async def resolve_node(inventory: Inventory, node_id: str | None, dmi_path: Path) -> str:
    """--node-metadata=xo: the VM UUID of this node. NodeNotFound when neither DMI form is a VM that XO knows."""
    if node_id:
        return node_id.lower()
    raw = await read_dmi_uuid(dmi_path)
    for candidate in (raw, byte_swapped(raw)):
        if await inventory.vm(candidate) is not None:
            return candidate
    raise NodeNotFound(
        f"XO knows no VM with UUID {raw} (nor its byte-swapped form {byte_swapped(raw)}) read from {dmi_path}; "
        "pass --node-id with the VM UUID"
    )
