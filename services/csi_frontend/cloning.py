"""CreateVolume from another volume (``volume_content_source.volume``, capability CLONE_VOLUME).

The new disk is created and filled by a clone job on the migration queue (services/migrator/clone.py); this waits
for the job as ControllerPublishVolume waits for a migration (QueueMigrationGate.run_job), answering ABORTED before
the caller's deadline while it runs. Idempotent by name: a retry joins the running job first (before it would check
the source, which the job's export shows plugged into XAPI's control domain, or place a disk next to the job's
target), or finds the finished disk and answers as CreateVolume does for an existing volume. A stale migration mark
on the source is settled as an attach settles one (services/csi_frontend/stale_marks.py). Same pool or not: the
content goes through XO's REST export and import. The source must be detached (XO cannot export a VDI a VM has
plugged): FAILED_PRECONDITION "detach the source volume (or stop its pod) to clone it" otherwise. XAPI's control
domain having it plugged is not a VM using it (shared/xo/control_domains.py): another clone's export (read-only)
shares it, and XO writing it (an import, a copy onto it) answers ABORTED naming the cause."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.csi_frontend.disks import Disk, DiskLocator
from services.csi_frontend.migration_gate import QueueMigrationGate, failed_job_error
from services.csi_frontend.provisioning import (
    CreatedVolume,
    Provisioner,
    VolumePlan,
    check_size,
    check_source,
    disk_size,
)
from shared import messages, transfer_marks
from shared import volume_id as vid
from shared.errors import OperationPending, OutOfRange, PreconditionFailed, VolumeNotFound
from shared.logging import get_logger
from shared.messages import CloneRequested
from shared.storage_class import StorageParams
from shared.units import disk_step_up, format_size
from shared.xo.client import XoClient
from shared.xo.models import Vdi

log = get_logger(__name__)


@dataclass(frozen=True)
class CloneRequest:
    """What CreateVolume asks for: volume ``name`` (as the CO names it) of ``size`` (required, limit; ``sized``
    False when the request gave no capacity_range), class ``params``, topology terms, filled from volume
    ``source_id``."""

    name: str
    size: tuple[int, int]
    sized: bool
    params: StorageParams
    requisite: Sequence[Mapping[str, str]]
    preferred: Sequence[Mapping[str, str]]
    source_id: str


class Cloner:
    """CreateVolume with a volume source, within the provisioner's CreateVolume frame (its SRs, names, lock, lookup
    and answer) and over the gate's job machinery."""

    def __init__(self, xo: XoClient, disks: DiskLocator, provisioner: Provisioner, gate: QueueMigrationGate) -> None:
        self._xo = xo
        self._disks = disks
        self._provisioner = provisioner
        self._gate = gate

    async def create(self, request: CloneRequest, deadline_s: float) -> CreatedVolume:
        """The new volume once its disk holds the source's content (Provisioner.provide, as CreateVolume; a disk
        still carrying a transfer mark is not the volume's yet). Raises VolumeNotFound (NOT_FOUND: the source),
        OutOfRange (a limit below the source's size), PreconditionFailed (an attached source), OperationPending
        (ABORTED: the clone still runs), AlreadyExistsIncompatible (a volume of that name with another size,
        class or source), and what a failed clone job reports."""
        async def clone(plan: VolumePlan) -> Vdi:
            return await self._run(request, plan, deadline_s)

        return await self._provisioner.provide(request.name, request.size, request.params, request.requisite, clone,
                                               deadline_s=deadline_s, final_only=True, source=request.source_id)

    async def _run(self, request: CloneRequest, plan: VolumePlan, deadline_s: float) -> Vdi:
        """The clone's disk: the running job of ``plan.disk_name`` joined first (a retry while it streams must not
        check the source, which the job's export shows plugged into the control domain, nor place a second disk
        next to the target the job already made), else a new job, once the source is checked and the target
        placed."""
        doing = f"volume {request.name} is being cloned from {request.source_id}"
        result = await self._gate.join_job(plan.disk_name, deadline_s, doing)
        if result is None:
            source = await self._source(request.source_id)
            size = _size_for(request, source.vdi)
            target = await self._provisioner.place(plan.srs, size, request.requisite, request.preferred)
            job = CloneRequested(
                kind="clone", job_id=messages.new_job_id(), disk_name=plan.disk_name,
                volume_id=str(vid.by_name(plan.name)), source_volume_id=str(source.volume_id),
                source_vdi_seen=source.vdi.id,
                source_disk_name=source.vdi.name_label if source.volume_id.kind == "name" else "", sr_id=target.id,
                size_bytes=size, description=plan.info.to_description(), requested_at=messages.utc_now(),
                correlation_id=uuid.uuid4().hex)
            result = await self._gate.run_job(job, deadline_s, doing)
        if result.outcome == "failed":
            raise failed_job_error(f"clone of volume {request.source_id} into {request.name} (job {result.job_id})",
                                   result.error)
        done = await self._provisioner.existing(plan.disk_name, final_only=True)
        if done is None:
            raise OperationPending(f"the clone job of volume {request.name} succeeded but XO does not show disk "
                                   f"{plan.disk_name} yet; retry")
        check_source(done, request.source_id, plan.disk_name)  # a blank disk of that name made meanwhile
        check_size(done, request.size, plan.disk_name)  # a job joined may have been asked for another size
        log.info("volume_cloned", disk_name=plan.disk_name, vdi=done.id, sr=done.sr_id, source=request.source_id)
        return done

    async def _source(self, source_id: str) -> Disk:
        field = "volume_content_source.volume.volume_id"
        try:
            source = await self._disks.get(vid.parse(source_id, field))
        except VolumeNotFound as exc:
            raise VolumeNotFound(f"{field} {source_id!r}: the source volume does not exist ({exc.message})") from exc
        source = await self._provisioner.settled(source)  # a stale migration mark: cleared, as an attach would
        plugged = await self._xo.plugged(source.vdi.id)
        if plugged.by_vms:
            raise PreconditionFailed(f"source volume {source_id} is attached to node {plugged.by_vms[0].vm_id}: "
                                     f"{transfer_marks.DETACH_TO_CLONE}")
        if plugged.xo_writes:  # another clone's export (read-only) shares it: only a write holds it
            raise OperationPending(plugged.xo_at_work(f"source volume {source_id}"))
        return source


def _size_for(request: CloneRequest, source: Vdi) -> int:
    """The new disk's size: the source's without a capacity_range, else the larger of the two (a larger request
    rounded up as ``disk_size`` does), within the limit."""
    required, limit = request.size
    whole = disk_step_up(source.size)  # what XAPI makes of the source's size (already so on a VHD SR)
    if limit and limit < whole:
        raise OutOfRange(f"capacity_range.limit_bytes {limit} is below the size of the source volume "
                         f"({format_size(whole)}): a clone holds all of its source")
    if not request.sized or required <= whole:
        return whole
    return disk_size((required, limit), "capacity_range")  # grown: XAPI rounds the size up to its 2 MiB step

