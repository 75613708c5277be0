"""PURE placement rules: which SR a volume goes to, which SRs a VM can use, and volume topology.

No async, no I/O, no logging. The controller (CreateVolume, GetCapacity, publish checks) and the
migrator (target SR of a migration) both call these functions, so both decide the same way.
Topology segments: ``pool`` (pool UUID) and, with host topology, ``host`` (host UUID).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shared.errors import CapacityExhausted, PlacementImpossible
from shared.units import DISK_STEP, format_size
from shared.xo.models import Sr

POOL_KEY = "pool"
HOST_KEY = "host"


@dataclass(frozen=True)
class SrView:
    """What placement needs to know about an SR."""

    id: str
    name: str
    pool_id: str
    host_id: str | None  # None for a shared SR
    free_bytes: int

    @property
    def is_shared(self) -> bool:
        return self.host_id is None


THICK_SR_TYPE_PREFIX = "lvm"  # lvm, lvmoiscsi, lvmohba, lvmofcoe: LVM allocates a VDI's whole size up front


def is_thin(sr: Sr) -> bool:
    """Whether the SR allocates as data is written: every SR type but LVM's (ext, nfs, and the other file-based
    ones: xfs, zfs, smb, cephfs, ...). An SR whose type XO does not give counts as thin."""
    return not sr.sr_type.lower().startswith(THICK_SR_TYPE_PREFIX)


def free_bytes(sr: Sr) -> int:
    """Space a new volume can still take on the SR, never negative.

    XO's SR ``usage`` is the virtual allocation (the sum of its VDIs' sizes) and ``physical_usage`` the bytes
    allocated. A thin SR fills only as data is written and may be overcommitted, so its room is ``size -
    physical_usage``; a thick (LVM) SR allocates every VDI whole, so its room is ``size - usage``. Placement never
    puts a volume where its full size does not fit physically now, so a thin SR is overcommitted only by growth.
    """
    used = sr.physical_usage if is_thin(sr) else sr.usage
    return max(0, sr.size - used)


def view(sr: Sr) -> SrView:
    """SrView of an XO SR: ``$container`` is the host of a local SR and the pool of a shared one."""
    is_local = not sr.shared and sr.container != sr.pool_id
    return SrView(sr.id, sr.name_label, sr.pool_id, sr.container if is_local else None, free_bytes(sr))


def usable_from(sr: SrView, host_id: str, pool_id: str) -> bool:
    """Can a VM resident on ``host_id`` in ``pool_id`` attach a disk of this SR?"""
    return sr.pool_id == pool_id if sr.is_shared else sr.host_id == host_id


def segment(sr: SrView, host_topology: bool) -> dict[str, str]:
    """The topology segment from which the SR is reachable."""
    if sr.is_shared or not host_topology:
        return {POOL_KEY: sr.pool_id}
    return {POOL_KEY: sr.pool_id, HOST_KEY: sr.host_id or ""}


def node_segments(pool_id: str, host_id: str, host_topology: bool) -> dict[str, str]:
    """A node's topology segments (NodeGetInfo, or a term to place a volume near a node): its pool, and its host
    with host topology."""
    return {POOL_KEY: pool_id, HOST_KEY: host_id} if host_topology else {POOL_KEY: pool_id}


def matches(sr: SrView, term: Mapping[str, str]) -> bool:
    """Does a topology term (node segments) reach the SR? Unknown keys never match."""
    if any(key not in (POOL_KEY, HOST_KEY) for key in term):
        return False
    if POOL_KEY in term and term[POOL_KEY] != sr.pool_id:
        return False
    if HOST_KEY in term and not sr.is_shared:
        return term[HOST_KEY] == sr.host_id
    return True


def accessible_segments(srs: Iterable[SrView], host_topology: bool) -> list[dict[str, str]]:
    """Distinct segments of ``srs``, sorted, for Volume.accessible_topology."""
    unique = {tuple(sorted(segment(sr, host_topology).items())) for sr in srs}
    return [dict(items) for items in sorted(unique)]


def choose_for_create(
    srs: Sequence[SrView],
    size_bytes: int,
    requisite: Sequence[Mapping[str, str]] = (),
    preferred: Sequence[Mapping[str, str]] = (),
) -> SrView:
    """The SR a new volume goes to.

    Preferred terms are tried in order (the first is the selected node under WaitForFirstConsumer),
    then any requisite term, then, without requirements, every SR. Within a step the SR with the
    most free space wins. Raises PlacementImpossible when no SR is in the allowed topology and
    CapacityExhausted when none of those has ``size_bytes`` free.
    """
    allowed = [sr for sr in srs if not requisite or any(matches(sr, term) for term in requisite)]
    if not allowed:
        raise PlacementImpossible(
            f"no SR of the StorageClass is reachable from the requested topology {_terms(requisite)}"
        )
    for term in preferred:
        chosen = _roomiest([sr for sr in allowed if matches(sr, term)], size_bytes)
        if chosen is not None:
            return chosen
    chosen = _roomiest(allowed, size_bytes)
    if chosen is None:
        raise _no_room(allowed, size_bytes, "no SR in the accessible topology")
    return chosen


def choose_for_host(srs: Sequence[SrView], size_bytes: int, host_id: str, pool_id: str,
                    from_pool: str | None = None) -> SrView:
    """The SR a disk moves to with XO's vdi.migrate so that a VM on ``host_id`` can attach it (the roomiest
    usable one).

    ``from_pool``: the pool the disk is in now; vdi.migrate moves disks only within a pool, so another pool is
    refused (a move across pools streams the content instead: ``choose_across_pools``).
    """
    if from_pool is not None and from_pool != pool_id:
        raise PlacementImpossible(f"the disk is in pool {from_pool} and host {host_id} in pool {pool_id}: "
                                  "XO moves disks only within a pool")
    return choose_across_pools(srs, size_bytes, host_id, pool_id)


def choose_across_pools(srs: Sequence[SrView], size_bytes: int, host_id: str, pool_id: str) -> SrView:
    """The SR a disk's content is streamed to so that a VM on ``host_id`` (in ``pool_id``) can attach it, wherever
    the disk is now: the roomiest SR usable from the host, by the same rules as a move within a pool.

    PlacementImpossible when no SR of ``srs`` is usable from the host, CapacityExhausted when none has room.
    """
    usable = [sr for sr in srs if usable_from(sr, host_id, pool_id)]
    if not usable:
        raise PlacementImpossible(f"no SR of the tag is usable from host {host_id} in pool {pool_id}")
    chosen = _roomiest(usable, size_bytes)
    if chosen is None:
        raise _no_room(usable, size_bytes, f"no SR usable from host {host_id}")
    return chosen


def capacity(srs: Iterable[SrView], term: Mapping[str, str]) -> tuple[int, int]:
    """(total free bytes, largest volume that fits) over the SRs that ``term`` reaches: the largest single free
    space in whole DISK_STEPs, as a CreateVolume of that size is rounded up to them."""
    free = [sr.free_bytes for sr in srs if matches(sr, term)]
    return sum(free), max(free, default=0) // DISK_STEP * DISK_STEP


def _no_room(srs: Sequence[SrView], size_bytes: int, which: str) -> CapacityExhausted:
    best = max(srs, key=lambda sr: sr.free_bytes)
    return CapacityExhausted(f"{which} has {format_size(size_bytes)} free "
                             f"(most free: {best.name} with {format_size(best.free_bytes)})")


def _roomiest(srs: Sequence[SrView], size_bytes: int) -> SrView | None:
    fitting = [sr for sr in srs if sr.free_bytes >= size_bytes]
    return max(fitting, key=lambda sr: (sr.free_bytes, sr.id)) if fitting else None


def _terms(terms: Sequence[Mapping[str, str]]) -> str:
    return "; ".join(",".join(f"{k}={v}" for k, v in sorted(t.items())) for t in terms) or "(any)"
