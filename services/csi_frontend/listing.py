"""ListVolumes: every volume under the handle its PV carries, with the nodes it is attached to.

external-attacher (LIST_VOLUMES_PUBLISHED_NODES) reconciles each VolumeAttachment by looking its PV's handle up in
this list; a volume listed under another handle than its PV's is re-processed every period. So:

- driver disks (``<prefix><volume>``, csi:info in the description): the handle CreateVolume returned, recorded in
  csi:info since this version (``handle``), else by m4rCsi's rule (vid.listed_handles; earlier versions of this
  driver wrote ``uuid:<VDI>`` for fixed volumes, listed under both forms);
- static volumes (a PV whose handle is the bare UUID of a VDI this driver did not make): a foreign VDI is listed,
  under its bare UUID, when it is plugged through a VBD that is neither bootable nor a CD drive, i.e. a data disk
  some VM uses now and not a VM's system disk. Detached foreign disks are not listed: nothing tells them from the
  thousands of disks of a pool that no PV names, and a detached static volume has no attachment to reconcile.

A VBD of XAPI's control domain (XO exporting or copying the disk, shared/xo/control_domains.py) is neither a
published node nor a use of a foreign disk.

A listing claims completeness, so it is refused (XoPoolDisconnected: UNAVAILABLE) while XO has lost a pool.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from shared import placement, vdi_metadata
from shared import volume_id as vid
from shared.xo.client import XoClient
from shared.xo.models import Vbd, Vdi

from .disks import copy_in_progress


@dataclass(frozen=True)
class VolumeEntry:
    """One listed handle; ``vdi`` is the volume's (largest) VDI."""

    listed_id: str
    vdi: Vdi
    published_vms: list[str]
    abnormal: bool
    condition: str


async def list_volumes(xo: XoClient, prefix: str) -> list[VolumeEntry]:
    """Every volume, sorted by handle (a migrating volume has two VDIs while a copy runs: one entry). A listing
    claims completeness: XO's view is checked before the reads (a pool lost, or still loading its objects) and
    after them (a pool lost while they ran), XoPoolDisconnected otherwise."""
    await xo.check_view_complete("the volume list")
    vdis, vbds, srs = await asyncio.gather(xo.find_vdis(), xo.find_vbds(), xo.find_srs())
    await xo.check_view_complete("the volume list")
    split = await xo.control_domains.split(vbd for vbd in vbds if vbd.vdi_id)
    plugged: dict[str, list[Vbd]] = {}
    for vbd in split.by_vms:  # a control domain's VBD is XO exporting or copying the disk: not a node
        plugged.setdefault(str(vbd.vdi_id), []).append(vbd)
    shared = {sr.id for sr in srs if placement.view(sr).is_shared}
    found: dict[str, list[Vdi]] = {}
    for vdi in vdis:
        for handle in _handles(vdi, prefix, shared, plugged.get(vdi.id, [])):
            found.setdefault(handle, []).append(vdi)
    entries = []
    for handle in sorted(found):
        copies = found[handle]
        vms = sorted({vbd.vm_id for v in copies for vbd in plugged.get(v.id, [])})
        abnormal, message = condition(copies)
        entries.append(VolumeEntry(handle, max(copies, key=lambda v: v.size), vms, abnormal, message))
    return entries


def _handles(vdi: Vdi, prefix: str, shared_srs: set[str], plugged: list[Vbd]) -> list[str]:
    volume_name = vid.volume_name_of_disk(prefix, vdi.name_label)
    info = vdi_metadata.parse(vdi.name_description)
    if volume_name is not None and info is not None:
        return vid.listed_handles(volume_name, vdi.id, migrating=info.migrating, shared_sr=vdi.sr_id in shared_srs,
                                  written=info.handle, class_recorded=bool(info.srs_with_tag or info.sr_uuid))
    if vdi.name_label.startswith(f"{prefix}temp-"):
        return []
    if any(not vbd.bootable and not vbd.is_cd_drive for vbd in plugged):
        return [str(vid.by_vdi(vdi.id))]  # a static volume in use
    return []


def condition(vdis: list[Vdi]) -> tuple[bool, str]:
    """(abnormal, message) of a volume from its VDIs."""
    if len(vdis) > 1:
        if copy_in_progress(vdis):
            return False, "a migration copy is in progress"
        return True, f"{len(vdis)} VDIs carry this volume's name; remove the stray copy in XO"
    if vdis[0].missing:
        return True, f"XO marks VDI {vdis[0].id} as missing from its SR"
    return False, "volume is healthy"
