"""SR and VDI space accounting, thin or thick by SR type, and the space checks XAPI's SM drivers make.

XO shows (XO-API §4): SR ``size`` = physical_size, ``usage`` = virtual_allocation (sum of VDI sizes),
``physical_usage`` = physical_utilisation; VDI ``size`` = virtual_size, ``usage`` = physical_utilisation.
Thin SRs (file based: ext, nfs, ...) allocate as data is written and may be overcommitted: VDI.create does
not check virtual free space. Thick SRs (LVM) allocate the whole VDI and refuse what does not fit.
"""

from __future__ import annotations

from typing import Any

from shared.logging import get_logger

from .errors import backend_failure
from .model import ObjectStore
from .realdata import RealData
from .shapes import XoObject

log = get_logger(__name__)
THICK_SR_TYPES = frozenset({"lvm", "lvmoiscsi", "lvmohba", "lvmofcoe"})
VHD_BLOCK_BYTES = 2 * 1024**2
SECTOR_BYTES = 512


def is_thin(sr: XoObject) -> bool:
    """Whether the SR allocates on write (anything but LVM)."""
    return sr["SR_type"] not in THICK_SR_TYPES


def vhd_metadata_bytes(size_bytes: int) -> int:
    """What a new, empty VHD occupies: footer copy, header, BAT (4 bytes per 2 MiB block), footer."""
    blocks = -(-size_bytes // VHD_BLOCK_BYTES)
    bat = -(-(4 * blocks) // SECTOR_BYTES) * SECTOR_BYTES
    return 4 * SECTOR_BYTES + bat  # footer copy 512 + header 1024 + footer 512


class Accounting:
    """Keeps SR usages and VDI usages current; plain mode models allocation, real data mode measures it."""

    def __init__(self, store: ObjectStore, data: RealData | None) -> None:
        self.store = store
        self.data = data

    def initial_usage(self, sr: XoObject, size_bytes: int) -> int:
        """The ``usage`` (physical utilisation) of a new empty VDI on ``sr``."""
        if not is_thin(sr):
            return size_bytes
        return 0 if self.data is not None else vhd_metadata_bytes(size_bytes)

    def ensure_space(self, sr: XoObject, size_bytes: int, allocated_bytes: int) -> None:
        """Raise SR_BACKEND_FAILURE_44 when a VDI of ``size_bytes`` (``allocated_bytes`` on a thin SR) does
        not fit: thick SRs check virtual space, thin SRs only physical space."""
        if is_thin(sr):
            needed, used = allocated_bytes, sr["physical_usage"]
        else:
            needed, used = size_bytes, sr["usage"]
        if needed > 0 and used + needed > sr["size"]:
            raise backend_failure(44, "There is insufficient space")

    def usage_after_resize(self, vdi: XoObject, sr: XoObject, size_bytes: int) -> int:
        """A VDI's ``usage`` once grown to ``size_bytes`` (thick: the new size; thin: the BAT grows a little)."""
        if not is_thin(sr):
            return size_bytes
        if self.data is not None:
            return int(vdi["usage"])
        return max(int(vdi["usage"]), vhd_metadata_bytes(size_bytes))

    def measure(self, vdi_id: str) -> None:
        """Real data mode: set a thin VDI's ``usage`` to its backing file's allocated bytes (an SM scan)."""
        vdi = self.store.find(vdi_id)
        if self.data is None or vdi is None:
            return
        sr = self.store.find(vdi["$SR"])
        if sr is None or not is_thin(sr):
            return
        allocated = self.data.allocated_bytes(sr["id"], vdi_id)
        if allocated != vdi["usage"]:
            with self.store.batch():
                self.store.update(vdi_id, {"usage": allocated, "chainPhysicalUsage": allocated})
                self.refresh_sr(sr["id"])

    def refresh_sr(self, sr_id: str, vdi_ids: list[str] | None = None) -> None:
        """Recompute an SR's ``usage`` and ``physical_usage`` from its VDIs (and set ``VDIs`` when given)."""
        sr = self.store.find(sr_id)
        if sr is None:
            return
        ids = sr["VDIs"] if vdi_ids is None else vdi_ids
        vdis = [vdi for vdi_id in ids if (vdi := self.store.find(vdi_id)) is not None]
        virtual = sum(vdi["size"] for vdi in vdis)
        physical = sum(vdi["usage"] for vdi in vdis) if is_thin(sr) else virtual
        changes: dict[str, Any] = {"usage": virtual, "physical_usage": physical}
        if vdi_ids is not None:
            changes["VDIs"] = list(vdi_ids)
        if any(sr[key] != value for key, value in changes.items()):
            self.store.update(sr_id, changes)

    def copy_usage(self, source: XoObject, target_sr: XoObject) -> int:
        """What a copy of ``source`` occupies on ``target_sr`` (thick: its size; thin: the source's data)."""
        if not is_thin(target_sr):
            return int(source["size"])
        if self.data is not None:
            return self.data.allocated_bytes(source["$SR"], source["id"])
        source_sr = self.store.find(source["$SR"])
        if source_sr is not None and is_thin(source_sr):
            return int(source["usage"])
        return vhd_metadata_bytes(source["size"])  # plain mode does not know what a thick VDI holds
