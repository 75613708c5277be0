"""Creating, deleting, growing, listing and measuring volumes in XO (the controller's volume logic).

Talks to XO only through XoClient/Inventory and decides placement only through shared/placement.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from services.csi_frontend.disks import Disk, DiskLocator, duplicate_error
from shared import placement, vdi_metadata
from shared import volume_id as vid
from shared.errors import (
    AlreadyExistsIncompatible,
    InvalidRequest,
    OperationPending,
    OutOfRange,
    PreconditionFailed,
    VolumeNotFound,
)
from shared.logging import get_logger
from shared.storage_class import StorageParams
from shared.units import format_size
from shared.vdi_metadata import StorageInfo
from shared.xo.client import XoClient
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
class VolumeEntry:
    volume_id: vid.VolumeId
    vdi: Vdi
    published_vms: list[str]
    abnormal: bool
    condition: str
    handle: str | None = None  # the PV's handle when it is not str(volume_id): an m4rCsi-made fixed volume

    @property
    def listed_id(self) -> str:
        """The id ListVolumes reports: the handle the volume's PV carries (vid.listed_handle)."""
        return self.handle or str(self.volume_id)


@dataclass(frozen=True)
class VolumeState:
    size_bytes: int
    published_vms: list[str]
    abnormal: bool
    message: str


class Provisioner:
    """CreateVolume / DeleteVolume / expansion / listing / capacity against XO."""

    def __init__(self, xo: XoClient, inventory: Inventory, disks: DiskLocator, *, host_topology: bool) -> None:
        self._xo = xo
        self._inventory = inventory
        self._disks = disks
        self._host_topology = host_topology
        self._busy: set[str] = set()

    # -- create ----------------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        size: tuple[int, int],
        params: StorageParams,
        requisite: Sequence[Mapping[str, str]],
        preferred: Sequence[Mapping[str, str]],
    ) -> CreatedVolume:
        """Idempotent by name: an existing disk of a compatible size and class, reachable from ``requisite``,
        is returned as is; any other existing disk is AlreadyExistsIncompatible (spec: ALREADY_EXISTS).

        The disk is created under ``<prefix>temp-<name>`` and renamed once described, so a crash
        leaves only a temporary disk that the next attempt (or --temp-cleanup) picks up.
        """
        async with self._exclusive(name):
            srs = await self._class_srs(params)
            disk_name = vid.disk_name(self._disks.prefix, name)
            existing = await self._xo.find_vdis(name_label=disk_name)
            if len(existing) > 1:
                raise duplicate_error(disk_name, existing)
            vdi = existing[0] if existing else None
            if vdi is not None:
                _check_size(vdi, size, disk_name)
                _check_class(vdi, params, disk_name)
            else:
                vdi = await self._create_disk(name, size[0], params, srs, requisite, preferred)
            return self._created(name, vdi, params, srs, requisite)

    async def _create_disk(
        self,
        name: str,
        size_bytes: int,
        params: StorageParams,
        srs: list[placement.SrView],
        requisite: Sequence[Mapping[str, str]],
        preferred: Sequence[Mapping[str, str]],
    ) -> Vdi:
        temp_name = vid.temp_disk_name(self._disks.prefix, name)
        leftovers = await self._xo.find_vdis(name_label=temp_name)
        for extra in leftovers[1:]:
            await self._xo.delete_vdi(extra.id)
        if leftovers and leftovers[0].size >= size_bytes:
            vdi_id = leftovers[0].id
        else:
            if leftovers:
                await self._xo.delete_vdi(leftovers[0].id)
            target = placement.choose_for_create(srs, size_bytes, requisite, preferred)
            vdi_id = await self._xo.create_disk(temp_name, size_bytes, target.id)
            self._inventory.invalidate()
            log.info("disk_created", disk_name=temp_name, vdi=vdi_id, sr=target.id, size_bytes=size_bytes)
        info = StorageInfo(srs_with_tag=params.srs_with_tag, sr_uuid=params.sr_uuid, migrating=params.migrating)
        await self._xo.set_vdi(vdi_id, name_description=info.to_description())
        await self._xo.set_vdi(vdi_id, name_label=vid.disk_name(self._disks.prefix, name))
        vdi = await self._xo.get_vdi(vdi_id)
        if vdi is None:
            raise OperationPending(f"disk {vdi_id} vanished right after its creation; retry")
        return vdi

    def _created(self, name: str, vdi: Vdi, params: StorageParams, srs: list[placement.SrView],
                 requisite: Sequence[Mapping[str, str]]) -> CreatedVolume:
        volume_id = vid.by_name(name) if params.migrating else vid.by_uuid(vdi.id)
        home = next((sr for sr in srs if sr.id == vdi.sr_id), None)
        if params.migrating and home is not None:
            # Every SR of the tag: the migrator moves the disk to any of them, across pools by streaming its content.
            reachable = srs
        else:
            reachable = [home] if home is not None else []
        if requisite and not any(placement.matches(sr, term) for sr in reachable for term in requisite):
            raise AlreadyExistsIncompatible(
                f"volume {vdi.name_label} already exists on SR {vdi.sr_id}, which the requested topology cannot "
                "reach; use another name or a topology that reaches it"
            )
        context = {**params.context(), "diskName": vid.disk_name(self._disks.prefix, name)}
        if params.fs_type:
            context["fsType"] = params.fs_type
        return CreatedVolume(volume_id, vdi.size, context,
                             placement.accessible_segments(reachable, self._host_topology))

    # -- for clones (services/csi_frontend/cloning.py) --------------------------------------------------

    async def class_srs(self, params: StorageParams) -> list[placement.SrView]:
        """The SRs a volume of the class may live on (InvalidRequest when the class names none XO has)."""
        return await self._class_srs(params)

    def describe_created(self, name: str, vdi: Vdi, params: StorageParams, srs: list[placement.SrView],
                         requisite: Sequence[Mapping[str, str]]) -> CreatedVolume:
        """CreateVolume's answer for the volume's disk ``vdi``, as ``create`` gives it."""
        return self._created(name, vdi, params, srs, requisite)

    async def _class_srs(self, params: StorageParams) -> list[placement.SrView]:
        if params.sr_uuid:
            sr = await self._inventory.sr(params.sr_uuid)
            if sr is None:
                raise InvalidRequest(f"parameter srUUID={params.sr_uuid}: XO has no such SR; check the StorageClass")
            return [placement.view(sr)]
        assert params.srs_with_tag is not None
        tagged = await self._inventory.srs(tag=params.srs_with_tag)
        if not tagged:
            raise InvalidRequest(
                f"parameter srsWithTag={params.srs_with_tag}: no SR in XO carries this tag; tag the SRs in XO"
            )
        _check_homogeneous(tagged, params.srs_with_tag)
        return [placement.view(sr) for sr in tagged if sr.content_type in ("user", "")]

    # -- delete / expand -------------------------------------------------------------------------

    async def delete(self, volume_id: vid.VolumeId) -> None:
        """Idempotent: a missing disk is success. Attached -> PreconditionFailed naming the VM."""
        async with self._exclusive(str(volume_id)):
            disk = await self._disks.find(volume_id)
            if disk is None:
                return
            attached = [vbd for vbd in await self._xo.find_vbds(vdi_id=disk.vdi.id) if vbd.attached]
            if attached:
                raise PreconditionFailed(
                    f"volume {volume_id} is attached to node {attached[0].vm_id}; unpublish it before deleting"
                )
            await self._xo.delete_vdi(disk.vdi.id)
            self._inventory.invalidate()
            log.info("disk_deleted", vdi=disk.vdi.id, disk_name=disk.vdi.name_label)

    async def expand(self, volume_id: vid.VolumeId, size: tuple[int, int]) -> int:
        """Grow the VDI online to at least ``size[0]``; returns the new size. Idempotent: a volume already that
        large is OK as is. Never shrinks: a volume above ``size[1]`` (limit) is OutOfRange."""
        async with self._exclusive(str(volume_id)):
            disk = await self._disks.get(volume_id)
            _refuse_while_migrating(disk)
            required, limit = size
            if limit and disk.vdi.size > limit:
                raise OutOfRange(
                    f"volume {volume_id} is already {format_size(disk.vdi.size)}, above capacity_range.limit_bytes "
                    f"{limit}; volumes never shrink"
                )
            if disk.vdi.size >= required:
                return disk.vdi.size
            await self._xo.set_vdi(disk.vdi.id, size_bytes=required)
            self._inventory.invalidate()
            return required

    # -- list / capacity -------------------------------------------------------------------------

    async def list_volumes(self) -> list[VolumeEntry]:
        """Every driver disk (temporary ones excluded), sorted by the id ListVolumes reports (the handle its PV
        carries, see vid.listed_handle), with the VMs it is attached to and its condition (a migrating volume
        has two VDIs while a copy runs: one entry)."""
        vdis, vbds, srs = await asyncio.gather(self._xo.find_vdis(), self._xo.find_vbds(), self._xo.find_srs())
        attached: dict[str, set[str]] = {}
        for vbd in vbds:
            if vbd.attached and vbd.vdi_id:
                attached.setdefault(vbd.vdi_id, set()).add(vbd.vm_id)
        shared = {sr.id for sr in srs if placement.view(sr).is_shared}
        found: dict[str, tuple[vid.VolumeId, list[Vdi]]] = {}
        for vdi in vdis:
            listed = self._listed(vdi, shared)
            if listed is not None:
                found.setdefault(listed[0], (listed[1], []))[1].append(vdi)
        entries = []
        for key in sorted(found):
            volume, copies = found[key]
            vms = sorted(set().union(*(attached.get(v.id, set()) for v in copies)))
            abnormal, condition = _condition(copies)
            entries.append(VolumeEntry(volume, max(copies, key=lambda v: v.size), vms, abnormal, condition,
                                       None if key == str(volume) else key))
        return entries

    def _listed(self, vdi: Vdi, shared_srs: set[str]) -> tuple[str, vid.VolumeId] | None:
        """(handle its PV carries, volume id) of a driver disk, None for other disks."""
        volume_name = vid.volume_name_of_disk(self._disks.prefix, vdi.name_label)
        info = vdi_metadata.parse(vdi.name_description)
        if volume_name is None or info is None:
            return None
        volume = vid.by_name(volume_name) if info.migrating else vid.by_uuid(vdi.id)
        handle = vid.listed_handle(volume_name, vdi.id, migrating=info.migrating,
                                   class_recorded=bool(info.srs_with_tag or info.sr_uuid),
                                   shared_sr=vdi.sr_id in shared_srs)
        return handle, volume

    async def describe(self, volume_id: vid.VolumeId) -> VolumeState:
        """Size, attached nodes and condition (abnormal: missing on its SR, or a stray same-named copy)."""
        vdis = await self._disks.candidates(volume_id)
        if not vdis:
            raise VolumeNotFound(f"volume {volume_id} does not exist")
        vbds = await asyncio.gather(*(self._xo.find_vbds(vdi_id=v.id) for v in vdis))
        nodes = sorted({vbd.vm_id for found in vbds for vbd in found if vbd.attached})
        abnormal, message = _condition(vdis)
        return VolumeState(max(v.size for v in vdis), nodes, abnormal, message)

    async def capacity(self, params: StorageParams, term: Mapping[str, str]) -> tuple[int, int]:
        """(available bytes, largest volume that fits) for the class within the topology segment."""
        return placement.capacity(await self._class_srs(params), term)

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str) -> AsyncIterator[None]:
        # The provisioner and resizer are leader-elected, so one controller acts at a time; this guards
        # against the sidecar's own retries overlapping a still-running call for the same volume.
        if key in self._busy:
            raise OperationPending(f"an operation on volume {key} is already in progress; retry")
        self._busy.add(key)
        try:
            yield
        finally:
            self._busy.discard(key)


def _check_size(vdi: Vdi, size: tuple[int, int], disk_name: str) -> None:
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


check_size = _check_size  # for clones (cloning.py): an existing disk must fit the request as in create
check_class = _check_class


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


def _refuse_while_migrating(disk: Disk) -> None:
    if disk.info is not None and disk.info.in_progress_to_sr and disk.info.in_progress_to_sr != disk.vdi.sr_id:
        raise OperationPending(
            f"volume {disk.volume_id} is being migrated to SR {disk.info.in_progress_to_sr}; retry after it finishes"
        )


def _condition(vdis: list[Vdi]) -> tuple[bool, str]:
    if len(vdis) > 1:
        if any(v.current_operations for v in vdis):
            return False, "a migration copy is in progress"
        return True, f"{len(vdis)} VDIs carry this volume's name; remove the stray copy in XO"
    if vdis[0].missing:
        return True, f"XO marks VDI {vdis[0].id} as missing from its SR"
    return False, "volume is healthy"
