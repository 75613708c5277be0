"""--temp-cleanup: delete ``<prefix>temp-*`` disks that a crashed or timed-out CreateVolume left behind, as m4rCsi
does it (pkg/csi/temp_cleanup.go), and safe against a CreateVolume running at the same moment.

Rules, each checked on every pass (every ``interval_s``, 2 min by default):

1. A temporary disk is **seen** first: its first-seen time (in memory), name and description are noted. It is
   considered only once it has been seen, unchanged and unattached, for ``min_age_s`` (10 min): a disk being
   created or just left is never touched at first sight. A change of name or description restarts the clock.
2. Before **marking** it (``csi:deletion-candidate: {"unusedSince": ...}`` in the description) and before
   **deleting** it, the cleanup takes the volume's lock (``VolumeLocks``, the one CreateVolume holds for that
   name), re-reads the VDI and acts only if it still has the name and the description it was seen with and no
   VBD. So a disk CreateVolume has just renamed (or reused: that rewrites the description) is left alone, and a
   description that is not the temporary disk's own (empty, csi:info, or our mark) is never overwritten.
3. A marked disk is deleted ``delete_after_s`` (30 min) after its mark.
4. One VDI XO sends that cannot be read is logged and skipped; any error of a pass is logged and the schedule
   goes on.
5. Only one controller replica runs it: with Redis (REDIS_URL) a lease (shared/locks.py ``Lease``) renewed every
   pass names the active one; without Redis the cleanup assumes a single controller replica (the deployment's
   controller runs with Redis; enable --temp-cleanup on one replica only otherwise). A replica that takes the
   lease over starts its first-seen clocks afresh, so it waits ``min_age_s`` again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import ValidationError

from services.csi_frontend.volume_locks import VolumeLocks
from shared import vdi_metadata
from shared import volume_id as vid
from shared.errors import DomainError
from shared.locks import Lease
from shared.logging import get_logger
from shared.xo.client import XoClient
from shared.xo.models import Vdi

log = get_logger(__name__)
MARK_PREFIX = "csi:deletion-candidate: "


def _marked_since(description: str) -> datetime | None:
    if not description.startswith(MARK_PREFIX):
        return None
    try:
        since = json.loads(description[len(MARK_PREFIX):]).get("unusedSince")
        return datetime.fromisoformat(since.replace("Z", "+00:00"))
    except (ValueError, AttributeError, TypeError):
        return None


def _own_description(description: str) -> bool:
    """What CreateVolume or this cleanup writes on a temporary disk (XO's disk.create leaves it empty)."""
    return description == "" or description.startswith(MARK_PREFIX) or vdi_metadata.parse(description) is not None


@dataclass(frozen=True)
class _Seen:
    since: float  # monotonic time of the first sight in this state
    name_label: str
    description: str


class TempCleanup:
    """The cleanup's memory (first-seen times) and its passes. ``clock`` (monotonic) and ``wall`` (UTC now) are
    injectable for tests."""

    def __init__(self, xo: XoClient, prefix: str, locks: VolumeLocks, *, min_age_s: float = 600.0,
                 delete_after_s: float = 1800.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._xo = xo
        self._prefix = prefix
        self._temp_prefix = vid.temp_disk_name(prefix, "")
        self._locks = locks
        self._min_age_s = min_age_s
        self._delete_after_s = delete_after_s
        self._clock = clock
        self._wall = wall
        self._seen: dict[str, _Seen] = {}

    async def sweep(self) -> list[str]:
        """One pass; returns the ids of the disks deleted."""
        deleted = []
        for vdi in await self.scan():
            try:
                if await self.consider(vdi):
                    deleted.append(vdi.id)
            except DomainError as exc:
                log.warning("temp_disk_skipped", vdi=vdi.id, disk_name=vdi.name_label, error=exc.message)
        return deleted

    async def scan(self) -> list[Vdi]:
        """The temporary disks XO shows now (unreadable ones logged and skipped); forgets the ones that are gone."""
        found = []
        for obj in await self._xo.get_objects({"type": "VDI"}):
            name = obj.get("name_label")
            if not isinstance(name, str) or not name.startswith(self._temp_prefix):
                continue
            try:
                found.append(Vdi.model_validate(obj))
            except ValidationError as exc:
                log.warning("temp_disk_unreadable", vdi=obj.get("id"), disk_name=name,
                            fields=", ".join(".".join(map(str, e["loc"])) for e in exc.errors()[:3]))
        ids = {vdi.id for vdi in found}
        self._seen = {vdi_id: seen for vdi_id, seen in self._seen.items() if vdi_id in ids}
        return found

    async def consider(self, vdi: Vdi) -> bool:
        """Note, mark or delete one temporary disk as listed by ``scan``; True when it was deleted."""
        now = self._clock()
        seen = self._seen.get(vdi.id)
        if seen is None or (seen.name_label, seen.description) != (vdi.name_label, vdi.name_description):
            self._seen[vdi.id] = _Seen(now, vdi.name_label, vdi.name_description)
            return False
        if vdi.vbd_ids or not _own_description(vdi.name_description) or now - seen.since < self._min_age_s:
            return False
        key = vid.disk_name(self._prefix, vdi.name_label[len(self._temp_prefix):])
        if self._locks.busy(key):
            return False  # CreateVolume of that name runs now: it owns the disk
        async with self._locks.hold(key, deadline_s=None):
            fresh = await self._xo.get_vdi(vdi.id)
            if fresh is None or fresh.vbd_ids or (fresh.name_label, fresh.name_description) != (
                    seen.name_label, seen.description):
                self._seen.pop(vdi.id, None)  # renamed, reused, attached or gone: not ours to touch
                log.info("temp_disk_changed", vdi=vdi.id, disk_name=vdi.name_label)
                return False
            return await self._mark_or_delete(fresh, seen)

    async def _mark_or_delete(self, vdi: Vdi, seen: _Seen) -> bool:
        since = _marked_since(vdi.name_description)
        if since is None:
            stamp = self._wall().isoformat().replace("+00:00", "Z")
            mark = MARK_PREFIX + json.dumps({"unusedSince": stamp})
            await self._xo.set_vdi(vdi.id, name_description=mark)
            self._seen[vdi.id] = _Seen(seen.since, vdi.name_label, mark)
            log.info("temp_disk_marked", vdi=vdi.id, disk_name=vdi.name_label)
            return False
        if (self._wall() - since).total_seconds() < self._delete_after_s:
            return False
        await self._xo.delete_vdi(vdi.id)
        self._seen.pop(vdi.id, None)
        log.info("temp_disk_deleted", vdi=vdi.id, disk_name=vdi.name_label)
        return True


async def run_forever(cleanup: TempCleanup, *, interval_s: float, lease: Lease | None) -> None:
    """A pass every ``interval_s`` (counted from each pass's start) until cancelled, while this replica holds
    ``lease`` (every pass when None). Any error of a pass is logged; the schedule goes on."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            started = loop.time()
            try:
                if lease is None or await lease.renew():
                    await cleanup.sweep()
            except Exception as exc:  # the task must outlive any XO or Redis failure
                log.warning("temp_cleanup_failed", error=exc.message if isinstance(exc, DomainError) else repr(exc))
            await asyncio.sleep(max(interval_s - (loop.time() - started), 0.0))
    finally:
        if lease is not None:
            await asyncio.shield(lease.release())
