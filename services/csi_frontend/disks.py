"""Finding a volume's VDI in XO from its volume id, and what its description says.

The one place that resolves ``name:``/``uuid:`` ids to VDIs and decides what two VDIs with one
name mean (a migration copy in progress, or a stray duplicate an operator must remove). A VDI whose description
is a transfer mark (shared/transfer_marks.py: a cross-pool move or clone finishing) is never the volume's disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import transfer_marks, vdi_metadata
from shared.errors import OperationPending, PreconditionFailed, VolumeNotFound
from shared.vdi_metadata import StorageInfo
from shared.volume_id import VolumeId
from shared.xo.client import XoClient
from shared.xo.models import Vdi


@dataclass(frozen=True)
class Disk:
    """A volume's VDI with its parsed ``csi:info`` description."""

    volume_id: VolumeId
    vdi: Vdi
    info: StorageInfo | None

    @property
    def is_migrating_volume(self) -> bool:
        return self.info is not None and self.info.migrating

    @property
    def tag(self) -> str | None:
        return self.info.srs_with_tag if self.info else None


@dataclass(frozen=True)
class InFlight:
    """A name-identified volume in the middle of a migration, as a retried publish finds it: ``disk`` is the VDI a
    migration job is asked for; ``finishing``, that a move across pools got past its rename (``unfinished_move``)
    and only a job carries it through."""

    disk: Disk
    finishing: bool


class DiskLocator:
    """Resolves volume ids against XO (never cached: VDIs change UUID when they migrate)."""

    def __init__(self, xo: XoClient, disk_prefix: str) -> None:
        self._xo = xo
        self.prefix = disk_prefix

    def disk_name(self, volume_id: VolumeId) -> str:
        return volume_id.disk_name(self.prefix)

    async def candidates(self, volume_id: VolumeId) -> list[Vdi]:
        """Every VDI that answers to the id (two while a migration copy runs)."""
        if volume_id.kind == "uuid":
            vdi = await self._xo.get_vdi(volume_id.value)
            return [vdi] if vdi is not None else []
        return await self._xo.find_vdis(name_label=self.disk_name(volume_id))

    async def find(self, volume_id: VolumeId) -> Disk | None:
        """The volume's single VDI, or None when it does not exist. Absent is not deleted: an empty lookup is
        believed only once XO sees every pool (XoPoolDisconnected, i.e. UNAVAILABLE, while it lost one).

        Two VDIs with the name: OperationPending while one of them carries a migration mark or an XAPI
        operation (a copy runs), else PreconditionFailed naming both so an operator can remove the stray.
        """
        vdis = await self._xo.lookup_confirmed(f"volume {volume_id}", lambda: self.candidates(volume_id))
        if not vdis:
            return None
        if len(vdis) == 1 and transfer_marks.is_marked(vdis[0].name_description):
            raise OperationPending(f"volume {volume_id} is being migrated: its copy {vdis[0].id} is being finished; "
                                   "retry shortly")
        if len(vdis) == 1:
            return Disk(volume_id, vdis[0], vdi_metadata.parse(vdis[0].name_description))
        raise duplicate_error(self.disk_name(volume_id), vdis)

    async def copy_source(self, volume_id: VolumeId) -> Disk | None:
        """While XO copies a name-identified disk (two VDIs, busy with the copy), the source being copied; None in
        any other situation (``copy_source``)."""
        if volume_id.kind != "name":
            return None
        return copy_source(volume_id, await self.candidates(volume_id))

    async def in_flight(self, volume_id: VolumeId) -> InFlight | None:
        """What a publish of a name-identified volume that ``find`` answers OperationPending can go on from, from one
        lookup: a move across pools past its rename (``unfinished_move``), else the source XO copies
        (``copy_source``); None in any other situation."""
        if volume_id.kind != "name":
            return None
        vdis = await self.candidates(volume_id)
        unfinished = unfinished_move(volume_id, vdis)
        if unfinished is not None:
            return InFlight(unfinished, finishing=True)
        source = copy_source(volume_id, vdis)
        return InFlight(source, finishing=False) if source is not None else None

    async def get(self, volume_id: VolumeId) -> Disk:
        """Like ``find`` but VolumeNotFound when there is no VDI."""
        disk = await self.find(volume_id)
        if disk is None:
            raise VolumeNotFound(f"volume {volume_id} does not exist: no VDI {self._what(volume_id)} in XO")
        return disk

    def _what(self, volume_id: VolumeId) -> str:
        return f"with UUID {volume_id.value}" if volume_id.kind == "uuid" else f"named {self.disk_name(volume_id)}"


def copy_in_progress(vdis: list[Vdi]) -> bool:
    """Whether the VDIs of one name are a move under way rather than a stray copy: XO runs an operation on one, or
    one carries a migration mark (``inProgressToSRUUID``) or a transfer mark (a move across pools, a clone). Between
    the end of XO's copy and the source's destruction both VDIs are idle, and only the marks tell."""
    return any(v.current_operations or transfer_marks.is_marked(v.name_description) for v in vdis) or any(
        (info := vdi_metadata.parse(v.name_description)) is not None and info.in_progress_to_sr for v in vdis
    )


def copy_source(volume_id: VolumeId, vdis: list[Vdi]) -> Disk | None:
    """Of the VDIs named after a disk, the source XO copies (two VDIs, busy with the copy), or None.

    XO shows a current operation on BOTH the source and the copy, and the copy carries the source's
    description, so the source is told by the migration mark: the copy is the VDI on the mark's target SR.
    """
    # XO copies the disk (a VDI busy), or a cross-pool copy that took the name is finishing (a transfer mark):
    # the source is the marked VDI off the SR its mark names.
    if len(vdis) != 2 or not any(v.current_operations or transfer_marks.is_marked(v.name_description) for v in vdis):
        return None
    return next((Disk(volume_id, v, info) for v in vdis if (info := vdi_metadata.parse(v.name_description))
                 and info.in_progress_to_sr and v.sr_id != info.in_progress_to_sr
                 and all(o.sr_id == info.in_progress_to_sr for o in vdis if o.id != v.id)), None)


def unfinished_move(volume_id: VolumeId, vdis: list[Vdi]) -> Disk | None:
    """Of the VDIs named after a disk, the one to ask a migration job for when a move across pools got past its
    rename (services/migrator/transfer.py step 6): the target, marked complete, is one of them; the other, if any,
    is the source its mark names (steps 6-7), and that is the answer; alone (step 7 done), the target is, with the
    ``csi:info`` it gets at the end. None otherwise."""
    marked = [(vdi, mark) for vdi in vdis if (mark := transfer_marks.parse(vdi.name_description)) is not None]
    if len(marked) != 1 or marked[0][1].kind != "move" or not marked[0][1].complete:
        return None
    target, mark = marked[0]
    others = [vdi for vdi in vdis if vdi.id != target.id]
    if not others:
        return Disk(volume_id, target, vdi_metadata.parse(mark.info))
    if len(others) == 1 and others[0].id == mark.source:
        return Disk(volume_id, others[0], vdi_metadata.parse(others[0].name_description))
    return None


def duplicate_error(name: str, vdis: list[Vdi]) -> OperationPending | PreconditionFailed:
    """The error for several VDIs carrying one disk name."""
    ids = ", ".join(f"{v.id} on SR {v.sr_id}" for v in vdis)
    if copy_in_progress(vdis):
        return OperationPending(f"disk {name} is being migrated (copy in progress: {ids}); retry shortly")
    return PreconditionFailed(
        f"{len(vdis)} VDIs are named {name} ({ids}) and none is migrating; disk names must be unique: "
        "remove or rename the stray copy in XO"
    )
