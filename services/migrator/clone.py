"""handle(CloneRequested, deps): a new volume's disk, filled with the content of another volume through XO's REST
export and import (transfer.py), under the new disk's Redis lock; the source's pool does not matter.

Idempotent: an attempt first settles what an interrupted one left (``transfer.settle``), and a disk that already
carries the new volume's name is the finished clone. The source must be detached: XO refuses to export a VDI a
VM has plugged (the harsher reading of what XAPI allows, see docs/migrations.md), so an attached source fails the
job with PreconditionFailed "detach the source volume (or stop its pod) to clone it"; plugged into XAPI's control
domain is not attached (another clone exporting it at the same time). Raises the domain errors of
migrate.handle, plus VolumeNotFound when the source volume is gone.
"""

from __future__ import annotations

import time

from services.migrator import transfer
from services.migrator.migrate import HandlerDeps, copy_slots
from shared import metrics, transfer_marks, vdi_metadata
from shared.errors import AlreadyExistsIncompatible, OperationPending, PreconditionFailed, VolumeNotFound
from shared.locks import DiskLock
from shared.logging import get_logger
from shared.messages import CloneRequested, MigrationFinished
from shared.transfer_marks import TransferMark
from shared.xo.client import XoClient
from shared.xo.models import Vdi

log = get_logger(__name__)


async def handle(request: CloneRequested, deps: HandlerDeps) -> MigrationFinished:
    """Create and fill disk ``request.disk_name`` on ``request.sr_id``; its VDI once it carries its ``csi:info``."""
    started = time.monotonic()
    name = request.disk_name
    async with DiskLock(deps.redis, deps.key_prefix, name, ttl_s=deps.lock_ttl_s, wait_s=deps.lock_wait_s) as lock:
        metrics.LOCK_WAIT.observe(time.monotonic() - started)
        done = await _finished(deps.xo, request, await transfer.settle(deps.xo, name, lock))
        if done is None:
            source = await _source(deps.xo, request)
            mark = TransferMark("copying", "clone", source.id, request.job_id, request.description)
            log.info("clone_started", disk_name=name, source=source.id, sr_from=source.sr_id, sr_to=request.sr_id)
            async with copy_slots(deps, name, source.sr_id, request.sr_id):
                target_id = await transfer.fill(deps, name, source, request.sr_id, mark, lock,
                                                grow_to=request.size_bytes)
            done = await transfer.finish(deps.xo, name, target_id, mark.completed(), lock)
    return MigrationFinished(job_id=request.job_id, disk_name=name, outcome="succeeded", vdi_id=done.id,
                             sr_id=done.sr_id, duration_s=round(time.monotonic() - started, 3))


async def _finished(xo: XoClient, request: CloneRequested, named: list[Vdi]) -> Vdi | None:
    """The new disk when a previous attempt finished it, from ``named``, the VDIs ``settle`` left with the name (a
    VDI with the name is final then). AlreadyExistsIncompatible when a disk of that name was not cloned from this
    job's source (its ``csi:info`` says another, or none: a blank volume of that name made meanwhile)."""
    disk_name = request.disk_name
    # a clone finished in a pool XO lost must not be made again
    vdis = named or await xo.confirm_absent(f"disk {disk_name}", lambda: xo.find_vdis(name_label=disk_name))
    if len(vdis) > 1:
        ids = ", ".join(f"{v.id} on SR {v.sr_id}" for v in vdis)
        raise PreconditionFailed(f"{len(vdis)} VDIs are named {disk_name} ({ids}); remove the strays in XO")
    if vdis:
        made, wanted = (_source_of(d) for d in (vdis[0].name_description, request.description))
        if made != wanted:
            was = f"from {made}" if made else "a blank volume"
            raise AlreadyExistsIncompatible(f"disk {disk_name} already exists and was not cloned from volume "
                                            f"{wanted or '-'} ({was}); the clone needs another name")
        log.info("clone_found_finished", disk_name=disk_name, vdi=vdis[0].id)
    return vdis[0] if vdis else None


async def _source(xo: XoClient, request: CloneRequested) -> Vdi:
    """The source volume's one VDI, detached and not being migrated; VolumeNotFound once XO (seeing every pool)
    has none, OperationPending while it moves or XO writes it, PreconditionFailed while a VM has it plugged."""
    where = request.source_volume_id
    if request.source_disk_name:
        vdis = await xo.lookup_confirmed(f"the source volume {where}",
                                         lambda: xo.find_vdis(name_label=request.source_disk_name))
    else:
        found = await xo.lookup_confirmed(f"the source volume {where}", lambda: xo.get_vdi(request.source_vdi_seen))
        vdis = [found] if found is not None else []
    if not vdis:
        raise VolumeNotFound(f"the source volume {where} of the clone does not exist any more")
    if len(vdis) > 1 or any(_moving(v) for v in vdis):
        raise OperationPending(f"the source volume {where} is being migrated; the clone starts once it is in place")
    source = vdis[0]
    plugged = await xo.plugged(source.id)
    if plugged.by_vms:
        raise PreconditionFailed(f"the source volume {where} is attached to node {plugged.by_vms[0].vm_id}: "
                                 f"{transfer_marks.DETACH_TO_CLONE}")
    if plugged.xo_writes:  # another clone's export (read-only, a control domain's VBD) shares it
        raise OperationPending(plugged.xo_at_work(f"the source volume {where}"))
    return source


def _moving(vdi: Vdi) -> bool:
    info = vdi_metadata.parse(vdi.name_description)
    marked = info is not None and info.in_progress_to_sr not in (None, vdi.sr_id)
    return marked or bool(vdi.current_operations) or transfer_marks.is_marked(vdi.name_description)


def _source_of(description: str) -> str | None:
    info = vdi_metadata.parse(description)
    return info.source_volume if info is not None else None
