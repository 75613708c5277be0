"""m4rCsi's reading of a volume handle, from the compatibility sheet (M4RCSI-COMPAT.md, m4rCsi at d0d47de9,
pkg/csi/volume_id.go ParseVolumeID and controller.go findDisk): what a user who rolls back to m4rCsi gets.

- a handle starting with ``name:`` names the disk ``<prefix><rest>``;
- anything else is taken as a VDI UUID, whole: ``uuid:<X>`` is looked up as the UUID "uuid:<X>" and found nowhere;
- DeleteVolume of a handle whose disk is not found reports success (the disk, if any, is leaked).
"""

from __future__ import annotations

from shared.xo.client import XoClient
from shared.xo.models import Vdi

PREFIX = "csi-"


def parse_volume_id(handle: str) -> tuple[str, str]:
    """("name", disk volume name) or ("uuid", the handle as a VDI UUID)."""
    if handle.startswith("name:"):
        return "name", handle[len("name:"):]
    return "uuid", handle


async def find_disk(xo: XoClient, handle: str) -> list[Vdi]:
    kind, value = parse_volume_id(handle)
    if kind == "name":
        return await xo.find_vdis(name_label=PREFIX + value)
    found = await xo.get_vdi(value)
    return [found] if found is not None else []


async def delete_volume(xo: XoClient, handle: str) -> bool:
    """m4rCsi's DeleteVolume; True when it deleted a disk, False when it reported success finding none."""
    disks = await find_disk(xo, handle)
    for vdi in disks:
        await xo.delete_vdi(vdi.id)
    return bool(disks)
