"""ControllerPublish/Unpublish logic: attach a volume's VDI to a node VM, and detach it.

A disk whose SR the node cannot use goes to the ``MigrationGate`` (disk migration through the queue; a node of
another pool gets the disk by a cross-pool move, services/migrator/transfer.py); without one, such an attach fails
with FAILED_PRECONDITION saying why.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from services.csi_frontend.disks import Disk, DiskLocator, InFlight
from services.csi_frontend.stale_marks import MarkPolicy
from services.csi_frontend.volume_locks import VolumeLocks
from shared import placement
from shared.errors import (
    AlreadyExistsIncompatible,
    AttachedElsewhere,
    BackendFailure,
    CapacityExhausted,
    NodeNotFound,
    OperationPending,
    PreconditionFailed,
)
from shared.logging import get_logger
from shared.volume_id import VolumeId
from shared.xo.client import XoClient
from shared.xo.errors import XoNoFreeDevice, XoVdiInUse
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
    """Moves a disk to an SR usable from ``place`` and returns the disk as found afterwards; ``finish_move`` does it
    for a disk whose move across pools got past its rename (OperationPending while a job of the disk is active)."""

    async def migrate_for(self, disk: Disk, place: NodePlace, deadline_s: float) -> Disk: ...

    async def finish_move(self, disk: Disk, place: NodePlace, deadline_s: float) -> Disk: ...


class Attacher:
    """Publish/unpublish against XO. Idempotent; the answers follow the CSI spec's tables.

    One call at a time per volume in this controller (``VolumeLocks``); across replicas XO's state decides: the
    VBDs are re-read before attaching, an attached VBD of the volume on the node is reused, other VBDs of the
    volume on the node are removed, and a plug XO refuses because the disk got plugged meanwhile is settled by
    reading again (this node: success; another node: FAILED_PRECONDITION naming it). A VBD of XAPI's control
    domain (XO exporting or copying the disk) is no node's: ABORTED until it is gone, and never removed.
    """

    def __init__(
        self,
        xo: XoClient,
        inventory: Inventory,
        disks: DiskLocator,
        *,
        device_wait_s: float,
        locks: VolumeLocks | None = None,
        migrations: MigrationGate | None = None,
        marks: MarkPolicy | None = None,
    ) -> None:
        self._xo = xo
        self._inventory = inventory
        self._disks = disks
        self._device_wait_s = device_wait_s
        self._locks = locks or VolumeLocks()
        self._migrations = migrations
        self._marks = marks or MarkPolicy(xo, None)

    async def publish(self, volume_id: VolumeId, node_id: str, read_only: bool, deadline_s: float) -> dict[str, str]:
        """Attach the volume to the node VM and return the publish context ``{device, vbd}``."""
        until = asyncio.get_running_loop().time() + deadline_s  # the lock's wait comes out of the caller's time
        return await self._locks.run_volume(volume_id, self._disks.prefix,
                                            lambda: self._publish(volume_id, node_id, read_only, until),
                                            deadline_s=deadline_s)

    async def _publish(self, volume_id: VolumeId, node_id: str, read_only: bool, until: float) -> dict[str, str]:
        try:
            flight = InFlight(await self._disks.get(volume_id), finishing=False)
        except OperationPending as pending:
            flight = await self._copy_to_join(volume_id, pending)
        disk = flight.disk
        place = await self.place_of(node_id)
        # The VDI was just read, with its VBDs ($VBDs, in the same XO cache as the VBDs themselves): one without any
        # has none to reuse or remove, so a fresh attach saves that read. XO refusing the plug still re-reads.
        context = await self._reuse(disk, node_id, read_only) if disk.vdi.vbd_ids else None
        if context is not None:
            return context
        usable = await self._ensure_usable(disk, place, until - asyncio.get_running_loop().time(),
                                           finishing=flight.finishing)
        if usable.vdi.id != disk.vdi.id and usable.vdi.vbd_ids:  # it moved: reuse or remove what the new VDI has
            context = await self._reuse(usable, node_id, read_only)
            if context is not None:
                return context
        return await self._attach(usable, place, read_only)

    async def _attach(self, disk: Disk, place: NodePlace, read_only: bool) -> dict[str, str]:
        """``vm.attachDisk`` (which removes the VBD it created when the plug fails). XO refusing the plug because
        the disk is in use means someone attached it meanwhile (another replica): XO's state decides."""
        try:
            vbd = await self._xo.attach_disk(place.vm.id, disk.vdi.id, read_only=read_only)
        except XoVdiInUse as refused:
            context = await self._reuse(disk, place.vm.id, read_only)  # AttachedElsewhere when on another node
            if context is not None:
                log.info("disk_attached_meanwhile", vdi=disk.vdi.id, node_id=place.vm.id)
                return context
            raise OperationPending(f"XO refused to plug volume {disk.volume_id} on node {place.vm.id} "
                                   f"({refused.message}) but shows it attached nowhere; retry") from refused
        except XoNoFreeDevice as full:  # the spec's "max volumes attached": RESOURCE_EXHAUSTED
            raise CapacityExhausted(
                f"node {place.vm.id} has no free disk slot for volume {disk.volume_id} ({full.message}): detach a "
                "disk from its VM, or set the node plugin's --max-volumes-per-node to what the VM takes, so that the "
                "scheduler stops before") from full
        log.info("disk_attached", vdi=disk.vdi.id, node_id=place.vm.id, vbd=vbd.id)
        return _context(vbd)

    async def _copy_to_join(self, volume_id: VolumeId, pending: OperationPending) -> InFlight:
        """A retried publish that lands while XO copies the disk joins the disk's migration job (the gate waits
        for it) instead of failing at once; one that finds a move across pools past its rename has a job finish
        it (``MigrationGate.finish_move``); in any other case ``pending`` is raised."""
        flight = await self._disks.in_flight(volume_id) if self._migrations is not None else None
        if flight is None or not flight.disk.is_migrating_volume:
            raise pending
        return flight

    async def unpublish(self, volume_id: VolumeId, node_id: str | None, deadline_s: float | None = None) -> None:
        """Detach and remove every VBD linking the volume's VDI(s) to the node (to any VM when ``node_id`` is
        None; never a VBD of XAPI's control domain, through which XO exports or copies the disk). A missing volume,
        node or VBD is success, once XO is known to see every pool (absent is not detached: XoPoolDisconnected
        while XO lost one)."""
        await self._locks.run_volume(volume_id, self._disks.prefix, lambda: self._unpublish(volume_id, node_id),
                                     deadline_s=deadline_s)

    async def _unpublish(self, volume_id: VolumeId, node_id: str | None) -> None:
        vdis = await self._xo.lookup_confirmed(f"volume {volume_id}", lambda: self._disks.candidates(volume_id))
        found = 0
        for vdi in vdis:
            for vbd in await self._nodes_vbds(await self._xo.find_vbds(vm_id=node_id, vdi_id=vdi.id), node_id):
                await self._xo.delete_vbd(vbd.id)
                found += 1
                log.info("disk_detached", vdi=vdi.id, vbd=vbd.id, node_id=vbd.vm_id)
        if vdis and not found and node_id is not None and await self._inventory.vm(node_id) is None:
            await self._xo.check_view_complete(f"node VM {node_id}")

    async def _nodes_vbds(self, vbds: list[Vbd], node_id: str | None) -> list[Vbd]:
        """``vbds`` but those of XAPI's control domains (XO exporting or copying the disk: never a node's, never
        ours to remove). No call for a node the inventory knows as a VM."""
        if not vbds or (node_id is not None and await self._inventory.vm(node_id) is not None):
            return vbds
        xo = await self._xo.control_domains.hosts_of({vbd.vm_id for vbd in vbds})
        for vbd in vbds:
            if vbd.vm_id in xo:
                log.info("control_domain_vbd_kept", vdi=vbd.vdi_id, vbd=vbd.id, host=xo[vbd.vm_id])
        return [vbd for vbd in vbds if vbd.vm_id not in xo]

    async def place_of(self, node_id: str) -> NodePlace:
        """The node VM and where it runs; NodeNotFound when XO has no such VM (once XO is known to see every pool:
        NOT_FOUND is final for the attacher)."""
        vm = await self._inventory.vm(node_id)
        if vm is None:
            vm = await self._xo.confirm_absent(f"node VM {node_id}", lambda: self._xo.get_vm(node_id))
        if vm is None:
            raise NodeNotFound(f"node {node_id} is not a VM known to XO (the node id is the VM UUID)")
        if vm.power_state != "Running" or vm.container == vm.pool_id:
            raise PreconditionFailed(f"node VM {node_id} is {vm.power_state or 'not running'}; it must be Running")
        return NodePlace(vm, vm.container, vm.pool_id)

    async def _reuse(self, disk: Disk, node_id: str, read_only: bool) -> dict[str, str] | None:
        """The context of the volume's plugged VBD on the node, after removing its other VBDs there (unplugged
        leftovers of failed or overlapping attaches: never kept just because they are the last); None when it
        has none. AttachedElsewhere when another node has it plugged."""
        vbds = await self._xo.find_vbds(vdi_id=disk.vdi.id)
        await self._check_elsewhere(disk, [vbd for vbd in vbds if vbd.vm_id != node_id])
        mine = [vbd for vbd in vbds if vbd.vm_id == node_id]
        plugged = next((vbd for vbd in mine if vbd.attached), None)
        for extra in mine:
            if extra is not plugged:
                await self._xo.delete_vbd(extra.id)
                log.info("stray_vbd_removed", vdi=disk.vdi.id, vbd=extra.id, node_id=node_id)
        if plugged is None:
            return None
        if plugged.read_only != read_only:
            raise AlreadyExistsIncompatible(
                f"volume {disk.volume_id} is already published to node {node_id} "
                f"{'read-only' if plugged.read_only else 'read-write'}"
            )
        if plugged.device:
            return _context(plugged)
        return await self._wait_device(node_id, disk.vdi.id)

    async def _check_elsewhere(self, disk: Disk, others: list[Vbd]) -> None:
        """AttachedElsewhere when another node has the disk plugged; OperationPending (ABORTED) when XAPI's control
        domain has it (XO exporting or copying it: XAPI refuses a VM's plug meanwhile). Others' VBDs are looked at
        only when one is plugged: the common path costs no call."""
        plugged = await self._xo.control_domains.split(others)
        if plugged.by_vms:
            raise AttachedElsewhere(
                f"volume {disk.volume_id} is attached to node {plugged.by_vms[0].vm_id}; it can only be attached to "
                "one node at a time: unpublish it there first"
            )
        if plugged.by_xo:
            raise OperationPending(plugged.xo_at_work(f"volume {disk.volume_id}"))

    async def _ensure_usable(self, disk: Disk, place: NodePlace, deadline_s: float, *, finishing: bool = False
                             ) -> Disk:
        if finishing:  # usable from the node or not, the disk is not used as it is: a job finishes its move first
            assert self._migrations is not None, "only a gate makes a publish finish a move (_copy_to_join)"
            return await self._migrations.finish_move(disk, place, deadline_s)
        sr = await self._inventory.sr(disk.vdi.sr_id, usage=False)
        if sr is not None and placement.usable_from(placement.view(sr), place.host_id, place.pool_id):
            return await self._marks.settle(disk)
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
