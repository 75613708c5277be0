"""Which VM this node is, and its topology, from XO's view of the VM.

The node id is the VM UUID: ``--node-id``, else DMI's product_uuid, retried byte-swapped because
XCP-ng VMs booted with UEFI/SMBIOS 2.8 expose the first three groups little-endian.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from services.csi_frontend.attach import NodePlace
from shared import placement
from shared.errors import NodeNotFound
from shared.xo.inventory import Inventory


def byte_swapped(vm_uuid: str) -> str:
    """The UUID with its first three fields byte-swapped (SMBIOS 2.8 little-endian encoding)."""
    return str(uuid.UUID(bytes_le=uuid.UUID(vm_uuid).bytes))


async def read_dmi_uuid(path: Path) -> str:
    text = await asyncio.to_thread(path.read_text)
    return text.strip().lower()


async def resolve_node(inventory: Inventory, node_id: str | None, dmi_path: Path) -> str:
    """The VM UUID of this node. NodeNotFound when neither form is a VM that XO knows."""
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


def topology(place: NodePlace, host_topology: bool) -> dict[str, str]:
    """Node topology segments: the pool, and the host with --host-topology."""
    segments = {placement.POOL_KEY: place.pool_id}
    if host_topology:
        segments[placement.HOST_KEY] = place.host_id
    return segments
