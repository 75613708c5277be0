"""ControllerPublish/Unpublish logic: attach a volume's VDI to a node VM, and detach it.

A disk whose SR the node cannot use goes to the ``MigrationGate`` (disk migration through the queue; a node of
another pool gets the disk by a cross-pool move, services/migrator/transfer.py); without one, such an attach fails
with FAILED_PRECONDITION saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from services.csi_frontend.disks import Disk, DiskLocator
from shared import placement, vdi_metadata
from shared.errors import (
    AlreadyExistsIncompatible,
    AttachedElsewhere,
    BackendFailure,
    NodeNotFound,
    OperationPending,
    PreconditionFailed,
)
from shared.logging import get_logger
from shared.volume_id import VolumeId
from shared.xo.client import XoClient
from shared.xo.inventory import Inventory
from shared.xo.models import Vbd, Vm

log = get_logger(__name__)


@dataclass(frozen=True)
class NodePlace:
    """Where a node VM runs."""

    vm: Vm
    host_id: str
    pool_id: str


class MigrationGate(Protocol):
    """Moves a disk to an SR usable from ``place`` and returns the disk as found afterwards."""

    async def migrate_for(self, disk: Disk, place: NodePlace, deadline_s: float) -> Disk: ...


class Attacher:
    """Publish/unpublish against XO. Idempotent; the answers follow the CSI spec's tables."""

    def __init__(
        self,
        xo: XoClient,
        inventory: Inventory,
        disks: DiskLocator,
        *,
        device_wait_s: float,
        migrations: MigrationGate | None = None,
    ) -> None:
        self._xo = xo
        self._inventory = inventory
        self._disks = disks
        self._device_wait_s = device_wait_s
        self._migrations = migrations

    async def publish(self, volume_id: VolumeId, node_id: str, read_only: bool, deadline_s: float) -> dict[str, str]:
        """Attach the volume to the node VM and return the publish context ``{device, vbd}``."""
        try:
            disk = await self._disks.get(volume_id)
        except OperationPending as pending:
            disk = await self._copy_to_join(volume_id, pending)
        place = await self.place_of(node_id)
        existing = await self._existing_vbd(disk, node_id, read_only)
        if existing is not None:
            return await self._plugged(existing)
        disk = await self._ensure_usable(disk, place, deadline_s)
        vbd = await self._xo.attach_disk(place.vm.id, disk.vdi.id, read_only=read_only,
                                         known_vbd_ids=frozenset(disk.vdi.vbd_ids))
        log.info("disk_attached", vdi=disk.vdi.id, node_id=node_id, vbd=vbd.id)
        return _context(vbd)

    async def _copy_to_join(self, volume_id: VolumeId, pending: OperationPending) -> Disk:
        """A retried publish that lands while XO copies the disk joins the disk's migration job (the gate waits
        for it) instead of failing at once; in any other case ``pending`` is raised."""
        source = await self._disks.copy_source(volume_id) if self._migrations is not None else None
        if source is None or not source.is_migrating_volume:
            raise pending
        return source

    async def unpublish(self, volume_id: VolumeId, node_id: str | None) -> None:
        """Detach and remove every VBD linking the volume's VDI(s) to the node (to any VM when ``node_id`` is
        None). A missing volume, node or VBD is success."""
        for vdi in await self._disks.candidates(volume_id):
            for vbd in await self._xo.find_vbds(vm_id=node_id, vdi_id=vdi.id):
                await self._xo.delete_vbd(vbd.id)
                log.info("disk_detached", vdi=vdi.id, vbd=vbd.id, node_id=vbd.vm_id)

    async def place_of(self, node_id: str) -> NodePlace:
        """The node VM and where it runs; NodeNotFound when XO has no such VM."""
        vm = await self._inventory.vm(node_id)
        if vm is None:
            raise NodeNotFound(f"node {node_id} is not a VM known to XO (the node id is the VM UUID)")
        if vm.power_state != "Running" or vm.container == vm.pool_id:
            raise PreconditionFailed(f"node VM {node_id} is {vm.power_state or 'not running'}; it must be Running")
        return NodePlace(vm, vm.container, vm.pool_id)

    async def _existing_vbd(self, disk: Disk, node_id: str, read_only: bool) -> Vbd | None:
        if not disk.vdi.vbd_ids:
            return None
        mine: Vbd | None = None
        for vbd in await self._xo.find_vbds(vdi_id=disk.vdi.id):
            if vbd.vm_id == node_id:
                mine = vbd
            elif vbd.attached:
                raise AttachedElsewhere(
                    f"volume {disk.volume_id} is attached to node {vbd.vm_id}; it can only be attached to one node "
                    "at a time: unpublish it there first"
                )
        if mine is not None and mine.read_only != read_only:
            raise AlreadyExistsIncompatible(
                f"volume {disk.volume_id} is already published to node {node_id} "
                f"{'read-only' if mine.read_only else 'read-write'}"
            )
        return mine

    async def _plugged(self, vbd: Vbd) -> dict[str, str]:
        if vbd.attached and vbd.device:
            return _context(vbd)
        if not vbd.attached:
            return _context(await self._xo.connect_vbd(vbd.id))
        return await self._wait_device(vbd.vm_id, vbd.vdi_id or "")

    async def _ensure_usable(self, disk: Disk, place: NodePlace, deadline_s: float) -> Disk:
        sr = await self._inventory.sr(disk.vdi.sr_id)
        if sr is not None and placement.usable_from(placement.view(sr), place.host_id, place.pool_id):
            return await self._clear_stale_mark(disk)
        where = f"SR {sr.name_label} ({sr.id})" if sr else f"SR {disk.vdi.sr_id}"
        if not disk.is_migrating_volume:
            raise PreconditionFailed(
                f"volume {disk.volume_id} lives on {where}, which node {place.vm.id} (host {place.host_id}, "
                f"pool {place.pool_id}) cannot use, and its StorageClass does not allow migration "
                '(migrating: "true" with srsWithTag)'
            )
        if self._migrations is None:
            raise PreconditionFailed(
                f"volume {disk.volume_id} lives on {where}, which node {place.vm.id} cannot use; it must migrate "
                "first, but this controller has no migration service configured (set AMQP_URL and REDIS_URL)"
            )
        return await self._migrations.migrate_for(disk, place, deadline_s)

    async def _clear_stale_mark(self, disk: Disk) -> Disk:
        # m4rCsi's self-healing rule: one VDI, already on its marked target SR -> the migration finished.
        info = disk.info
        if info is None or not info.in_progress_to_sr:
            return disk
        if info.in_progress_to_sr != disk.vdi.sr_id:
            raise OperationPending(f"volume {disk.volume_id} is being migrated to SR {info.in_progress_to_sr}")
        cleared = info.marked(None)
        await self._xo.set_vdi(disk.vdi.id, name_description=cleared.to_description())
        return Disk(disk.volume_id, disk.vdi, vdi_metadata.parse(cleared.to_description()))

    async def _wait_device(self, vm_id: str, vdi_id: str) -> dict[str, str]:
        async def plugged() -> dict[str, str] | None:
            for vbd in await self._xo.find_vbds(vm_id=vm_id, vdi_id=vdi_id):
                if vbd.attached and vbd.device:
                    return {"device": vbd.device, "vbd": vbd.id}
            return None

        def relevant(obj_id: str, obj: dict[str, object] | None) -> bool:
            return obj is not None and obj.get("type") == "VBD" and obj.get("VM") == vm_id and obj.get("VDI") == vdi_id

        context = await self._xo.wait_until(plugged, timeout_s=self._device_wait_s, relevant=relevant)
        if context is None:
            raise BackendFailure(
                f"XO created the VBD of VDI {vdi_id} on VM {vm_id} but it was not plugged with a device "
                f"within {self._device_wait_s:g}s; check the VM's PV drivers"
            )
        return context


def _context(vbd: Vbd) -> dict[str, str]:
    """The publish context of a plugged VBD: its device (e.g. xvdb) for the node, and its id."""
    return {"device": vbd.device or "", "vbd": vbd.id}
