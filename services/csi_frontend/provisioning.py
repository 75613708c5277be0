"""Creating, deleting, growing, listing and measuring volumes in XO (the controller's volume logic).

Talks to XO only through XoClient/Inventory and decides placement only through shared/placement.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from services.csi_frontend.disks import Disk, DiskLocator, duplicate_error
from services.csi_frontend.listing import VolumeEntry, condition, list_volumes
from services.csi_frontend.stale_marks import MarkPolicy
from services.csi_frontend.volume_locks import VolumeLocks
from shared import placement, transfer_marks, vdi_metadata
from shared import volume_id as vid
from shared.errors import (
    AlreadyExistsIncompatible,
    CapacityExhausted,
    InvalidRequest,
    OperationPending,
    OutOfRange,
    PlacementImpossible,
    PreconditionFailed,
    VolumeNotFound,
)
from shared.logging import get_logger
from shared.storage_class import StorageParams
from shared.units import DISK_STEP, disk_step_up, format_size
from shared.vdi_metadata import StorageInfo
from shared.xo.client import XoClient
from shared.xo.errors import XoVdiInUse
from shared.xo.inventory import Inventory
from shared.xo.models import Sr, Vdi

log = get_logger(__name__)


@dataclass(frozen=True)
class CreatedVolume:
    volume_id: vid.VolumeId
    size_bytes: int
    context: dict[str, str]
    topology: list[dict[str, str]]


@dataclass(frozen=True)
class VolumePlan:
    """What CreateVolume settles before it looks for or makes the disk (Provisioner.provide): the class's SRs,
    whether the handle is the volume's name or its VDI UUID, the name the handle carries and the disk's name."""

    params: StorageParams
    srs: list[placement.SrView]
    by_name: bool
    name: str
    disk_name: str
    source: str | None = None  # a clone's source volume id (volume_content_source), None for a blank disk

    @property
    def info(self) -> StorageInfo:
        """The ``csi:info`` the new disk carries: the class, how its handle names it, and a clone's source."""
        return StorageInfo(srs_with_tag=self.params.srs_with_tag, sr_uuid=self.params.sr_uuid,
                           migrating=self.params.migrating, handle=vid.HANDLE_NAME if self.by_name else vid.HANDLE_VDI,
                           source_volume=self.source)


@dataclass(frozen=True)
class VolumeState:
    size_bytes: int
    published_vms: list[str]
    abnormal: bool
    message: str


class Provisioner:
    """CreateVolume / DeleteVolume / expansion / listing / capacity against XO.

    Create, delete and expand hold the volume's lock (``VolumeLocks``, shared with the attacher and the
    temporary-disk cleanup): CreateVolume by disk name, the others by the volume's key (volume_locks.key_of).
    Every negative decision (no disk, no SR, no room) is taken only once XO is known to see every pool.
    """

    def __init__(self, xo: XoClient, inventory: Inventory, disks: DiskLocator, *, host_topology: bool,
                 locks: VolumeLocks | None = None, marks: MarkPolicy | None = None) -> None:
        self._xo = xo
        self._inventory = inventory
        self._disks = disks
        self._host_topology = host_topology
        self._locks = locks or VolumeLocks()
        self._marks = marks or MarkPolicy(xo, None)

    # -- create ----------------------------------------------------------------------------------

    async def create(
        self,
        request_name: str,
        size: tuple[int, int],
        params: StorageParams,
        requisite: Sequence[Mapping[str, str]],
        preferred: Sequence[Mapping[str, str]],
        deadline_s: float | None = None,
    ) -> CreatedVolume:
        """CreateVolume without a content source (``provide``): a blank disk of ``size[0]`` on an SR of the class.

        The disk is created under ``<prefix>temp-<name>``, then described and renamed in one vdi.set, so a crash
        leaves only a temporary disk that the next attempt (or --temp-cleanup) picks up.
        """
        async def make(plan: VolumePlan) -> Vdi:
            return await self._create_disk(plan, (disk_size(size, "capacity_range"), size[1]), (requisite, preferred))

        return await self.provide(request_name, size, params, requisite, make, deadline_s=deadline_s)

    async def provide(self, request_name: str, size: tuple[int, int], params: StorageParams,
                      requisite: Sequence[Mapping[str, str]], make: Callable[[VolumePlan], Awaitable[Vdi]], *,
                      deadline_s: float | None = None, final_only: bool = False,
                      source: str | None = None) -> CreatedVolume:
        """CreateVolume's one frame, for a blank disk (``create``) and a clone of volume ``source`` (cloning.py).
        Idempotent by name: under the volume's lock, an existing disk (``existing``) of a compatible size, class and
        content source (``check_source``), reachable from ``requisite``, is returned as is; any other existing disk
        is AlreadyExistsIncompatible (spec: ALREADY_EXISTS); without one, ``make(plan)`` makes the disk.
        InvalidRequest when the class names no SR XO has.

        The handle follows m4rCsi (vid.named_by_disk): ``name:<name>`` for migrating or local-SR volumes (long
        names mapped by vid.volume_name_for_id), the bare VDI UUID for fixed shared ones.
        """
        srs = await self._class_srs(params)
        by_name = vid.named_by_disk(migrating=params.migrating, shared_sr=all(sr.is_shared for sr in srs))
        name = vid.volume_name_for_id(request_name) if by_name else request_name
        plan = VolumePlan(params, srs, by_name, name, vid.disk_name(self._disks.prefix, name), source)

        async def provided() -> CreatedVolume:
            vdi = await self.existing(plan.disk_name, final_only=final_only)
            if vdi is not None:
                check_size(vdi, size, plan.disk_name)
                check_source(vdi, source, plan.disk_name)  # before an empty description is completed as asked
                vdi = await self._described(vdi, plan)
                _check_class(vdi, params, plan.disk_name)
            else:
                vdi = await make(plan)
            return self._created(plan, vdi, requisite)

        return await self._locks.run(plan.disk_name, provided, deadline_s=deadline_s, volume=request_name)

    async def _described(self, vdi: Vdi, plan: VolumePlan) -> Vdi:
        """``vdi`` with the class's ``csi:info`` written when its description is empty: XO's vdi.set renames
        (VDI.set_name_label) before it describes (VDI.set_name_description), two XAPI calls, so a creation cut
        between them leaves the final name with no description; its retry completes it. Both drivers describe
        every volume (m4rCsi writes ``csi:info: {}`` at least), so an empty one is never a finished volume's."""
        if vdi.name_description.strip():
            return vdi
        await self._xo.set_vdi(vdi.id, name_description=plan.info.to_description())
        log.info("disk_description_completed", disk_name=plan.disk_name, vdi=vdi.id)
        return vdi.model_copy(update={"name_description": plan.info.to_description()})

    async def existing(self, disk_name: str, *, final_only: bool = False) -> Vdi | None:
        """The VDI named ``disk_name``; None only once XO is known to see every pool (a disk of a pool XO lost must
        not be created again). Several VDIs of that name: duplicate_error. ``final_only``: a disk still carrying a
        transfer mark (a clone finishing) counts as none yet."""
        vdis = await self._xo.lookup_confirmed(f"disk {disk_name}", lambda: self._xo.find_vdis(name_label=disk_name))
        if len(vdis) > 1:
            raise duplicate_error(disk_name, vdis)
        if not vdis or (final_only and transfer_marks.is_marked(vdis[0].name_description)):
            return None
        return vdis[0]

    async def _create_disk(self, plan: VolumePlan, size: tuple[int, int],
                           topology: tuple[Sequence[Mapping[str, str]], Sequence[Mapping[str, str]]]) -> Vdi:
        """A new disk of ``size`` (bytes as XO will make them, limit), made under its temporary name, or the temporary
        disk an earlier attempt left (cut after disk.create), when it is one this request would have made: of a
        size in the range, on an SR of the class that the request's topology reaches. Any other leftover is deleted
        and the disk placed anew: reused, it would take the final name and answer ALREADY_EXISTS to this request and
        every retry (the scheduler moved the pod to another host since, the class changed, the range shrank)."""
        size_bytes, limit = size
        temp_name = vid.temp_disk_name(self._disks.prefix, plan.name)
        leftovers = await self._xo.find_vdis(name_label=temp_name)
        for extra in leftovers[1:]:
            await self._xo.delete_vdi(extra.id)
        if leftovers and size_bytes <= leftovers[0].size <= (limit or leftovers[0].size) \
                and _reaches(self._reachable(plan, leftovers[0].sr_id), topology[0]):
            vdi_id = leftovers[0].id
            log.info("disk_creation_resumed", disk_name=temp_name, vdi=vdi_id, sr=leftovers[0].sr_id)
        else:
            if leftovers:
                await self._xo.delete_vdi(leftovers[0].id)
                log.info("disk_leftover_deleted", disk_name=temp_name, vdi=leftovers[0].id, sr=leftovers[0].sr_id,
                         reason="not what this request would make (size, SR or topology)")
            target = await self.place(plan.srs, size_bytes, *topology)
            vdi_id = await self._xo.create_disk(temp_name, size_bytes, target.id)
            self._inventory.usage_changed()
            log.info("disk_created", disk_name=temp_name, vdi=vdi_id, sr=target.id, size_bytes=size_bytes)
        # One vdi.set: XO renames, then describes (two XAPI calls). A creation cut in between leaves the final name
        # undescribed, which the retry's provide() completes (_described); it is never described but temporary.
        await self._xo.set_vdi(vdi_id, name_label=plan.disk_name, name_description=plan.info.to_description())
        vdi = await self._xo.get_vdi(vdi_id)
        if vdi is None:
            raise OperationPending(f"disk {vdi_id} vanished right after its creation; retry")
        return vdi

    async def place(self, srs: list[placement.SrView], size_bytes: int, requisite: Sequence[Mapping[str, str]],
                     preferred: Sequence[Mapping[str, str]]) -> placement.SrView:
        """The SR for a new disk; "no SR" or "no room" only once XO is known to see every pool (an SR of a pool
        XO lost is missing from the view)."""
        try:
            return placement.choose_for_create(srs, size_bytes, requisite, preferred)
        except (PlacementImpossible, CapacityExhausted):
            await self._xo.check_view_complete("the SRs of the StorageClass")
            raise

    @staticmethod
    def _reachable(plan: VolumePlan, sr_id: str) -> list[placement.SrView]:
        """The SRs a volume of ``plan`` whose disk is on ``sr_id`` can be used from: every SR of the tag when it
        migrates (the migrator moves the disk to any of them, across pools by streaming its content), else its own
        SR; none when ``sr_id`` is not an SR of the class."""
        home = next((sr for sr in plan.srs if sr.id == sr_id), None)
        if home is None:
            return []
        return plan.srs if plan.params.migrating else [home]

    def _created(self, plan: VolumePlan, vdi: Vdi, requisite: Sequence[Mapping[str, str]]) -> CreatedVolume:
        volume_id = vid.by_name(plan.name) if plan.by_name else vid.by_vdi(vdi.id)
        reachable = self._reachable(plan, vdi.sr_id)
        if not _reaches(reachable, requisite):
            raise AlreadyExistsIncompatible(
                f"volume {vdi.name_label} already exists on SR {vdi.sr_id}, which the requested topology cannot "
                "reach; use another name or a topology that reaches it"
            )
        context = {**plan.params.context(), "diskName": plan.disk_name}
        if plan.params.fs_type:
            context["fsType"] = plan.params.fs_type
        return CreatedVolume(volume_id, vdi.size, context,
                             placement.accessible_segments(reachable, self._host_topology))

    async def _class_srs(self, params: StorageParams) -> list[placement.SrView]:
        """The SRs of the class; "no such SR" only once XO is known to see every pool."""
        if params.sr_uuid:
            sr = await self._inventory.sr(params.sr_uuid)
            if sr is None:
                await self._xo.check_view_complete(f"SR {params.sr_uuid}")
                raise InvalidRequest(f"parameter srUUID={params.sr_uuid}: XO has no such SR; check the StorageClass")
            return [placement.view(sr)]
        assert params.srs_with_tag is not None
        tagged = await self._inventory.srs(tag=params.srs_with_tag)
        if not tagged:
            await self._xo.check_view_complete(f"the SRs tagged {params.srs_with_tag}")
            raise InvalidRequest(
                f"parameter srsWithTag={params.srs_with_tag}: no SR in XO carries this tag; tag the SRs in XO"
            )
        _check_homogeneous(tagged, params.srs_with_tag)
        return [placement.view(sr) for sr in tagged if sr.content_type in ("user", "")]

    async def settled(self, disk: Disk) -> Disk:
        """``disk`` with a finished or stale migration mark cleared (``MarkPolicy.settle``); OperationPending while
        a migration of it runs. A clone's source goes through it: a mark nobody clears would make every clone job
        of the source wait for a move that never comes."""
        return await self._marks.settle(disk)

    # -- delete / expand -------------------------------------------------------------------------

    async def delete(self, volume_id: vid.VolumeId, deadline_s: float | None = None) -> None:
        """Idempotent: a missing disk is success (once XO is known to see every pool). Attached ->
        PreconditionFailed naming the VM; plugged into XAPI's control domain (XO exporting or copying it) ->
        OperationPending (ABORTED) naming it. A disk marked as migrating is deleted under the migrators' disk lock,
        with what a move across pools left in the other pool (``MarkPolicy.delete``); ABORTED while a move runs."""
        await self._locks.run_volume(volume_id, self._disks.prefix, lambda: self._delete(volume_id),
                                     deadline_s=deadline_s)

    async def _delete(self, volume_id: vid.VolumeId) -> None:
        try:
            disk = await self._disks.find(volume_id)
        except OperationPending:
            flight = await self._disks.in_flight(volume_id)
            if flight is None or not flight.finishing:
                raise  # XO copies the disk now: ABORTED until it has finished
            await self._marks.delete_unfinished(volume_id, self._disks)
            self._inventory.usage_changed()
            return
        if disk is None:
            return
        plugged = await self._xo.plugged(disk.vdi.id)
        if plugged.by_vms:
            raise PreconditionFailed(
                f"volume {volume_id} is attached to node {plugged.by_vms[0].vm_id}; unpublish it before deleting"
            )
        if plugged.by_xo:  # XAPI would refuse to destroy it (VDI_IN_USE, after XO's retries)
            raise OperationPending(plugged.xo_at_work(f"volume {volume_id}"))
        await self._marks.delete(disk)
        self._inventory.usage_changed()
        log.info("disk_deleted", vdi=disk.vdi.id, disk_name=disk.vdi.name_label)

    async def expand(self, volume_id: vid.VolumeId, size: tuple[int, int], deadline_s: float | None = None) -> int:
        """Grow the detached VDI to at least ``size[0]``; returns the new size. Offline only (no XCP-ng SR driver
        resizes an attached VDI): an attached disk is PreconditionFailed naming its node, one XO exports or copies
        (plugged into XAPI's control domain) OperationPending (ABORTED). Idempotent: a volume
        already that large is OK as is. Never shrinks: a volume above ``size[1]`` (limit) is OutOfRange."""
        return await self._locks.run_volume(volume_id, self._disks.prefix, lambda: self._expand(volume_id, size),
                                            deadline_s=deadline_s)

    async def _expand(self, volume_id: vid.VolumeId, size: tuple[int, int]) -> int:
        disk = await self._marks.settle(await self._disks.get(volume_id))
        required, limit = size
        if limit and disk.vdi.size > limit:
            raise OutOfRange(
                f"volume {volume_id} is already {format_size(disk.vdi.size)}, above capacity_range.limit_bytes "
                f"{limit}; volumes never shrink"
            )
        if disk.vdi.size >= required:
            return disk.vdi.size
        wanted = disk_size(size, "capacity_range")
        await self._check_detached(volume_id, disk)
        try:
            grown = await self._xo.set_vdi(disk.vdi.id, size_bytes=wanted)
        except XoVdiInUse as exc:  # attached meanwhile (another replica, an export): XO refuses the resize
            await self._check_detached(volume_id, disk)
            raise _in_use(volume_id, "another node") from exc
        self._inventory.usage_changed()
        new_size = max(wanted, int(grown.get("size") or 0)) if grown is not None else wanted
        log.info("disk_expanded", vdi=disk.vdi.id, size_bytes=new_size)
        return new_size

    async def _check_detached(self, volume_id: vid.VolumeId, disk: Disk) -> None:
        plugged = await self._xo.plugged(disk.vdi.id)
        if plugged.by_vms:
            raise _in_use(volume_id, plugged.by_vms[0].vm_id)
        if plugged.by_xo:
            raise OperationPending(plugged.xo_at_work(f"volume {volume_id}"))

    # -- list / capacity -------------------------------------------------------------------------

    async def list_volumes(self) -> list[VolumeEntry]:
        """Every volume under the handle its PV carries (services/csi_frontend/listing.py)."""
        return await list_volumes(self._xo, self._disks.prefix)

    async def describe(self, volume_id: vid.VolumeId) -> VolumeState:
        """Size, attached nodes and condition (abnormal: missing on its SR, or a stray same-named copy)."""
        vdis = await self._xo.lookup_confirmed(f"volume {volume_id}", lambda: self._disks.candidates(volume_id))
        if not vdis:
            raise VolumeNotFound(f"volume {volume_id} does not exist")
        plugged = await asyncio.gather(*(self._xo.plugged(v.id) for v in vdis))
        nodes = sorted({vbd.vm_id for found in plugged for vbd in found.by_vms})  # XO's own VBDs are no node
        abnormal, message = condition(vdis)
        return VolumeState(max(v.size for v in vdis), nodes, abnormal, message)

    async def capacity(self, params: StorageParams, term: Mapping[str, str]) -> tuple[int, int]:
        """(available bytes, largest volume that fits) for the class within the topology segment. Checked against
        XO's view first: while it lost a pool, that pool's SRs are missing and the answer would be too low."""
        await self._xo.check_view_complete("the SRs of the StorageClass")
        return placement.capacity(await self._class_srs(params), term)


def _in_use(volume_id: vid.VolumeId, node: str) -> PreconditionFailed:
    return PreconditionFailed(
        f"volume {volume_id} is attached to node {node}: XCP-ng grows a disk only while it is detached (offline "
        "expansion); unpublish it first (stop the pod), then expand"
    )


def disk_size(size: tuple[int, int], field: str) -> int:
    """The size to ask XO for, for a disk within ``size`` (required, limit): required rounded up to XAPI's 2 MiB
    step (XAPI rounds so itself, and the answer must not exceed the limit). OutOfRange when the range holds no
    whole step."""
    required, limit = size
    wanted = disk_step_up(required)
    if limit and wanted > limit:
        raise OutOfRange(f"{field}: XCP-ng sizes disks in whole steps of {format_size(DISK_STEP)}, and none lies "
                         f"between {required} and limit_bytes {limit}; raise the limit to {wanted} or more")
    return wanted


def _reaches(srs: Sequence[placement.SrView], requisite: Sequence[Mapping[str, str]]) -> bool:
    """Whether a volume usable from ``srs`` meets the requisite topology (any of its terms; none: anywhere)."""
    return not requisite or any(placement.matches(sr, term) for sr in srs for term in requisite)


def check_size(vdi: Vdi, size: tuple[int, int], disk_name: str) -> None:
    """AlreadyExistsIncompatible when the volume's disk is outside the requested range (required, limit)."""
    required, limit = size
    if vdi.size < required or (limit and vdi.size > limit):
        wanted = format_size(required) + (f" (limit {format_size(limit)})" if limit else "")
        raise AlreadyExistsIncompatible(
            f"volume {disk_name} already exists with {format_size(vdi.size)}, not {wanted}; "
            "use another name or the existing size"
        )


def _check_class(vdi: Vdi, params: StorageParams, disk_name: str) -> None:
    info = vdi_metadata.parse(vdi.name_description)
    mismatch = class_mismatch(params, info) if info is not None else None
    if mismatch:
        raise AlreadyExistsIncompatible(f"volume {disk_name} already exists: {mismatch}; use another name")


def check_source(vdi: Vdi, source: str | None, disk_name: str) -> None:
    """AlreadyExistsIncompatible unless the existing disk was made from ``source`` (a clone's source volume id; None:
    blank), as its ``csi:info`` records (spec: a volume "incompatible with the specified ... volume_content_source").
    A clone made before this driver recorded sources reads as blank, and so does an empty description (a blank
    creation cut before XO described the disk); a clone still finishing (its transfer mark) reads as the clone its
    mark's final ``csi:info`` says."""
    mark = transfer_marks.parse(vdi.name_description)
    info = vdi_metadata.parse(mark.info if mark is not None else vdi.name_description)
    recorded = info.source_volume if info is not None else None
    if recorded != source:
        made = f"a clone of volume {recorded}" if recorded else "a blank volume"
        asked = f"a clone of volume {source}" if source else "a blank volume"
        raise AlreadyExistsIncompatible(f"volume {disk_name} already exists as {made}, not {asked}; use another "
                                        "name")


def class_mismatch(params: StorageParams, info: StorageInfo) -> str | None:
    """How a volume's recorded StorageClass (its ``csi:info``) differs from ``params``, or None."""
    recorded = (info.sr_uuid, info.srs_with_tag, info.migrating)
    if recorded == (params.sr_uuid, params.srs_with_tag, params.migrating):
        return None
    return (f"it was made with srUUID={info.sr_uuid or '-'}, srsWithTag={info.srs_with_tag or '-'}, "
            f"migrating={str(info.migrating).lower()}, not srUUID={params.sr_uuid or '-'}, "
            f"srsWithTag={params.srs_with_tag or '-'}, migrating={str(params.migrating).lower()}")


def _check_homogeneous(srs: list[Sr], tag: str) -> None:
    views = [placement.view(sr) for sr in srs]
    if len({v.is_shared for v in views}) > 1:
        shared = ", ".join(v.name for v in views if v.is_shared)
        local = ", ".join(v.name for v in views if not v.is_shared)
        raise InvalidRequest(
            f"SRs tagged {tag} mix shared ({shared}) and local ({local}) SRs; all must be shared or all local"
        )
