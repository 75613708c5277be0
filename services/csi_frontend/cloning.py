"""CreateVolume from another volume (``volume_content_source.volume``, capability CLONE_VOLUME).

The new disk is created and filled by a clone job on the migration queue (services/migrator/clone.py); this waits
for the job as ControllerPublishVolume waits for a migration (QueueMigrationGate.run_job), answering ABORTED before
the caller's deadline while it runs. Idempotent by name: a retry joins the running job, or finds the finished disk
and answers as CreateVolume does for an existing volume. Same pool or not: the content goes through XO's REST
export and import. The source must be detached (XO cannot export a VDI a VM has plugged): FAILED_PRECONDITION
"detach the source volume (or stop its pod) to clone it" otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.csi_frontend.disks import Disk, DiskLocator, duplicate_error
from services.csi_frontend.migration_gate import QueueMigrationGate, failed_job_error
from services.csi_frontend.provisioning import CreatedVolume, Provisioner, check_class, check_size
from services.csi_frontend.volume_locks import VolumeLocks
from shared import messages, placement, transfer_marks
from shared import volume_id as vid
from shared.errors import OperationPending, OutOfRange, PreconditionFailed, VolumeNotFound
from shared.logging import get_logger
from shared.messages import CloneRequested
from shared.storage_class import StorageParams
from shared.units import format_size
from shared.vdi_metadata import StorageInfo
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
    """CreateVolume with a volume source, over the provisioner's placement and the gate's job machinery; holds the
    new volume's lock (``VolumeLocks``, shared with the provisioner) while it runs, as CreateVolume does."""

    def __init__(self, xo: XoClient, disks: DiskLocator, provisioner: Provisioner, gate: QueueMigrationGate,
                 locks: VolumeLocks) -> None:
        self._xo = xo
        self._disks = disks
        self._provisioner = provisioner
        self._gate = gate
        self._locks = locks

    async def create(self, request: CloneRequest, deadline_s: float) -> CreatedVolume:
        """The new volume once its disk holds the source's content. Raises VolumeNotFound (NOT_FOUND: the source),
        OutOfRange (a limit below the source's size), PreconditionFailed (an attached source), OperationPending
        (ABORTED: the clone still runs), AlreadyExistsIncompatible (a volume of that name with another size or
        class), and what a failed clone job reports."""
        srs = await self._provisioner.class_srs(request.params)
        by_name = vid.named_by_disk(migrating=request.params.migrating, shared_sr=all(sr.is_shared for sr in srs))
        name = vid.volume_name_for_id(request.name) if by_name else request.name
        disk_name = vid.disk_name(self._disks.prefix, name)
        async with self._locks.hold(disk_name, deadline_s=deadline_s, volume=request.name):
            existing = await self._finished(disk_name)
            if existing is not None:
                check_size(existing, request.size, disk_name)
                check_class(existing, request.params, disk_name)
            else:
                info = _info(request.params, vid.HANDLE_NAME if by_name else vid.HANDLE_VDI)
                existing = await self._run(request, name, disk_name, srs, info, deadline_s)
        return self._provisioner.describe_created(name, by_name, existing, request.params, srs, request.requisite)

    async def _run(self, request: CloneRequest, name: str, disk_name: str, srs: list[placement.SrView],
                   info: StorageInfo, deadline_s: float) -> Vdi:
        source = await self._source(request.source_id)
        size = _size_for(request, source.vdi)
        target = await self._provisioner.place(srs, size, request.requisite, request.preferred)
        job = CloneRequested(
            kind="clone", job_id=messages.new_job_id(), disk_name=disk_name, volume_id=str(vid.by_name(name)),
            source_volume_id=str(source.volume_id), source_vdi_seen=source.vdi.id,
            source_disk_name=source.vdi.name_label if source.volume_id.kind == "name" else "", sr_id=target.id,
            size_bytes=size, description=info.to_description(), requested_at=messages.utc_now(),
            correlation_id=uuid.uuid4().hex)
        result = await self._gate.run_job(job, deadline_s, f"volume {request.name} is being cloned from "
                                          f"{request.source_id}")
        if result.outcome == "failed":
            raise failed_job_error(f"clone of volume {request.source_id} into {request.name} (job {result.job_id})",
                                   result.error)
        done = await self._finished(disk_name)
        if done is None:
            raise OperationPending(f"the clone job of volume {request.name} succeeded but XO does not show disk "
                                   f"{disk_name} yet; retry")
        log.info("volume_cloned", disk_name=disk_name, vdi=done.id, sr=done.sr_id, source=request.source_id)
        return done

    async def _finished(self, disk_name: str) -> Vdi | None:
        """The volume's disk when it exists and is final (a disk still carrying a transfer mark is not yet); "none"
        only once XO is known to see every pool."""
        vdis = await self._xo.lookup_confirmed(f"disk {disk_name}", lambda: self._xo.find_vdis(name_label=disk_name))
        if len(vdis) > 1:
            raise duplicate_error(disk_name, vdis)
        if not vdis or transfer_marks.is_marked(vdis[0].name_description):
            return None
        return vdis[0]

    async def _source(self, source_id: str) -> Disk:
        field = "volume_content_source.volume.volume_id"
        try:
            source = await self._disks.get(vid.parse(source_id, field))
        except VolumeNotFound as exc:
            raise VolumeNotFound(f"{field} {source_id!r}: the source volume does not exist ({exc.message})") from exc
        attached = [vbd for vbd in await self._xo.find_vbds(vdi_id=source.vdi.id) if vbd.attached]
        if attached:
            raise PreconditionFailed(f"source volume {source_id} is attached to node {attached[0].vm_id}: "
                                     f"{transfer_marks.DETACH_TO_CLONE}")
        return source


def _size_for(request: CloneRequest, source: Vdi) -> int:
    """The new disk's size: the source's without a capacity_range, else the larger of the two, within the limit."""
    required, limit = request.size
    if limit and limit < source.size:
        raise OutOfRange(f"capacity_range.limit_bytes {limit} is below the size of the source volume "
                         f"({format_size(source.size)}): a clone holds all of its source")
    return max(required, source.size) if request.sized else source.size


def _info(params: StorageParams, handle: str) -> StorageInfo:
    return StorageInfo(srs_with_tag=params.srs_with_tag, sr_uuid=params.sr_uuid, migrating=params.migrating,
                       handle=handle)
