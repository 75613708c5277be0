"""Migration marks left behind (issue 10 item 5): a disk whose ``csi:info`` says ``inProgressToSRUUID`` while no
migration runs for it.

m4rCsi leaves its mark when ``vdi.migrate`` fails, and a worker of ours that crashed between marking and clearing
leaves one too. An attach of a marked disk answers ABORTED ("being migrated") so that it does not race the copy;
with nobody left to clear the mark, that would last for ever. ``MarkPolicy.settle`` decides:

- the disk sits on the mark's target SR: the migration finished (m4rCsi's self-healing rule): clear it now;
- a migration is live (an active job record in Redis for the disk, or XO runs an operation on the VDI): respect
  the mark (OperationPending);
- neither: the mark is stale once it has stayed so for ``clear_after_s`` (first seen by this controller, kept in
  memory; default 2 x the migrators' default stale-after, so a worker's job is reaped and retried before its mark
  is called stale); then it is cleared and the attach goes on.

A stale mark is cleared under the disk's Redis lock (the one the migrators hold), after the disk is read again
there. A move across pools that gave up leaves its mark on purpose while it cannot show that its
``<disk>~incoming`` is gone (services/migrator/transfer.py), for the next job's ``settle``; clearing a mark toward
an SR of another pool does that job's part first: a ``~incoming`` XO shows is deleted (never renamed, it never was
the volume), and none is proven only once XO sees every pool; else nobody would ever delete it once the disk stays
where it is. A mark within a pool (m4rCsi's, or a ``vdi.migrate`` of ours) has no ``~incoming`` to look for. A
mark whose move got past its rename (a VDI of the disk's name carries a transfer mark from this one) is never
cleared: the copy is the disk's future, and a migration job finishes the move.

DeleteVolume of a marked disk (``MarkPolicy.delete``) goes the same way: under the disk lock (ABORTED while a
migrator holds it), from a new read, taking a ``~incoming`` along when the mark points to another pool.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from services.csi_frontend.disks import Disk, DiskLocator, unfinished_move
from shared import transfer_marks, vdi_metadata
from shared.errors import OperationPending
from shared.jobs import JobStore
from shared.logging import get_logger
from shared.volume_id import VolumeId
from shared.xo.client import XoClient
from shared.xo.inventory import Inventory
from shared.xo.models import Vdi

log = get_logger(__name__)
DEFAULT_CLEAR_AFTER_S = 70.0  # 2 x the migrator's default stale_after_s (3 x 10 s heartbeat + 5 s)
STALE_MARK_LOCK_TTL_S = 30.0  # the disk lock while a stale mark is cleared: a few XO calls, heartbeated
STALE_MARK_LOCK_WAIT_S = 1.0  # a migrator holding it is working on the disk: the attach is retried (ABORTED)


class MarkPolicy:
    """Clears marks no live migration backs, after ``clear_after_s``; ``jobs`` is None without migrations (no job
    of ours can exist then: only XO's own operations count as live). ``disk_lock(disk_name)``: the migrators'
    per-disk lock, held while a stale mark and what it guards are cleared (None without migrations). ``inventory``
    tells a mark within a pool (no ``~incoming`` to look for) from one across pools (without it: every mark)."""

    def __init__(self, xo: XoClient, jobs: JobStore | None, *, clear_after_s: float = DEFAULT_CLEAR_AFTER_S,
                 clock: Callable[[], float] = time.monotonic,
                 disk_lock: Callable[[str], AbstractAsyncContextManager[object]] | None = None,
                 inventory: Inventory | None = None) -> None:
        self._xo = xo
        self._jobs = jobs
        self._disk_lock = disk_lock
        self._inventory = inventory
        self._clear_after_s = clear_after_s
        self._clock = clock
        self._first_seen: dict[tuple[str, str], float] = {}  # (VDI id, marked SR) -> when first seen without a job

    async def settle(self, disk: Disk) -> Disk:
        """The disk with a finished or stale mark cleared; OperationPending while the mark must be respected."""
        info = disk.info
        if info is None or not info.in_progress_to_sr:
            return disk
        target = info.in_progress_to_sr
        if target == disk.vdi.sr_id:
            return await self._clear(disk, reason="on its target SR")
        key = (disk.vdi.id, target)
        live = await self._live(disk)
        if live is not None:
            self._first_seen.pop(key, None)
            raise OperationPending(f"volume {disk.volume_id} is being migrated to SR {target} ({live}); retry")
        now = self._clock()
        waited_s = now - self._first_seen.setdefault(key, now)
        if waited_s < self._clear_after_s:
            raise OperationPending(
                f"volume {disk.volume_id} is marked as migrating to SR {target}, but no migration job runs for it "
                f"and XO copies nothing; the mark is cleared if it stays so for {self._clear_after_s:g} s "
                f"({self._clear_after_s - waited_s:.0f} s left); retry"
            )
        async with self._locked(disk.vdi.name_label):  # OperationPending while a migrator holds the disk
            await self._still_stale(disk)
            if await self._across_pools(disk.vdi.sr_id, target):
                # none found proves XO sees every pool: then no renamed copy hides
                await self._discard_incoming(disk.vdi.name_label, reason="left by a move across pools whose mark "
                                             "went stale")
                await self._not_moved_on(disk)
            cleared = await self._clear(disk, reason=f"no live migration for {waited_s:.0f} s")
        self._first_seen.pop(key, None)  # only once cleared: a failed try keeps the time already waited
        return cleared

    async def delete(self, disk: Disk) -> None:
        """DeleteVolume's destroy of the disk. A disk marked as migrating goes under the migrators' disk lock
        (OperationPending while a migrator holds it: the move is running), read again there: a job that ran since
        the caller's read changed it (OperationPending: the retry reads it anew), and XO running an operation on it
        is a copy in flight. A mark toward another pool takes its ``<disk>~incoming`` along (``_discard_incoming``),
        else a job retried later, finding its complete copy and no source, would finish the copy into a volume
        nobody has any more (and nothing else ever deletes a ``~incoming`` once the disk is gone)."""
        info = disk.info
        if info is None or not info.in_progress_to_sr:
            await self._xo.delete_vdi(disk.vdi.id)
            return
        async with self._locked(disk.vdi.name_label):
            current = await self._reread(disk, "it was being deleted (a migration moved it)")
            if current.current_operations:
                raise OperationPending(f"volume {disk.volume_id} is being migrated (XO copies it); retry")
            if await self._across_pools(disk.vdi.sr_id, info.in_progress_to_sr):
                await self._discard_incoming(disk.vdi.name_label, reason="its volume is deleted")
            await self._xo.delete_vdi(disk.vdi.id)

    async def delete_unfinished(self, volume_id: VolumeId, disks: DiskLocator) -> None:
        """DeleteVolume of a volume whose move across pools stopped past its rename (``unfinished_move``: the copy
        under the disk's name, with or without its source). A publish would have a job finish the move; a deleted
        volume needs none, so every VDI of the name and the ``~incoming`` go, under the migrators' disk lock, from a
        new read, once no job of the disk is active (OperationPending while one is: it finishes first, and the retry
        deletes the finished disk)."""
        name = disks.disk_name(volume_id)
        async with self._locked(name):
            vdis = await self._xo.lookup_confirmed(f"volume {volume_id}", lambda: disks.candidates(volume_id))
            if unfinished_move(volume_id, vdis) is None or any(v.current_operations for v in vdis):
                raise OperationPending(f"volume {volume_id} changed while it was being deleted; retry")
            if (live := await self._live_job(name)) is not None:
                raise OperationPending(f"volume {volume_id} is being migrated ({live}); retry once it has finished")
            await self._discard_incoming(name, reason="its volume is deleted")
            for vdi in vdis:
                log.warning("unfinished_move_deleted", vdi=vdi.id, disk_name=name, sr=vdi.sr_id)
                await self._xo.delete_vdi(vdi.id)

    def _locked(self, disk_name: str) -> AbstractAsyncContextManager[object]:
        """The migrators' lock of the disk (OperationPending while a migrator holds it); nothing without migrations."""
        return self._disk_lock(disk_name) if self._disk_lock is not None else contextlib.nullcontext()

    async def _reread(self, disk: Disk, while_doing: str) -> Vdi:
        """Under the disk's lock: the disk as XO shows it now, still as it was decided on (a job may have run
        between that read and the lock: its SR or description changed); OperationPending naming ``while_doing``
        otherwise."""
        current = await self._xo.get_vdi(disk.vdi.id)
        if current is None or (current.sr_id, current.name_description) != (disk.vdi.sr_id, disk.vdi.name_description):
            raise OperationPending(f"volume {disk.volume_id} changed while {while_doing}; retry")
        return current

    async def _still_stale(self, disk: Disk) -> None:
        """Under the disk's lock: the disk as it was decided on, with no live migration; OperationPending otherwise."""
        current = await self._reread(disk, "its stale migration mark was being cleared")
        live = await self._live(Disk(disk.volume_id, current, disk.info))
        if live is not None:
            raise OperationPending(f"volume {disk.volume_id} is being migrated ({live}); retry")

    async def _across_pools(self, sr_id: str, target_id: str) -> bool:
        """Whether a mark toward ``target_id`` may come from a move across pools (the only kind that streams into a
        ``<disk>~incoming``): the two SRs in different pools, or either unknown."""
        if self._inventory is None:
            return True
        here, there = await self._inventory.sr(sr_id, usage=False), await self._inventory.sr(target_id, usage=False)
        return here is None or there is None or here.pool_id != there.pool_id

    async def _discard_incoming(self, disk_name: str, *, reason: str) -> None:
        """Delete the ``<disk>~incoming`` a move across pools that gave up left (proven absent only once XO sees
        every pool: XoPoolDisconnected otherwise), as the next job's ``settle`` would."""
        name = transfer_marks.incoming_name(disk_name)
        for vdi in await self._xo.lookup_confirmed(f"VDI {name}", lambda: self._xo.find_vdis(name_label=name)):
            log.warning("transfer_target_removed", vdi=vdi.id, disk_name=name, reason=reason)
            await self._xo.delete_vdi(vdi.id)

    async def _not_moved_on(self, disk: Disk) -> None:
        """OperationPending when a move across pools from this VDI got past its rename: a VDI of the disk's name
        carries a transfer mark from it (or one too damaged to say where from). That copy is the disk's future,
        and only a job finishes the move (services/migrator/transfer.py ``settle``); clearing the source's mark
        would let the source be attached and written, then deleted by that job, the older copy promoted."""
        for vdi in await self._xo.find_vdis(name_label=disk.vdi.name_label):
            if not transfer_marks.is_marked(vdi.name_description):
                continue
            mark = transfer_marks.parse(vdi.name_description)
            if mark is None or mark.source == disk.vdi.id:
                raise OperationPending(
                    f"volume {disk.volume_id} is being migrated: its copy {vdi.id} took the disk's name and a "
                    "migration job must finish the move; retry")

    async def _live(self, disk: Disk) -> str | None:
        """Why a migration of the disk may be running now, or None."""
        if disk.vdi.current_operations:
            return f"XO runs {', '.join(sorted(map(str, disk.vdi.current_operations.values())))} on it"
        return await self._live_job(disk.vdi.name_label)

    async def _live_job(self, disk_name: str) -> str | None:
        """Which job of the disk is active ("job J is queued|running"), or None (also without migrations)."""
        if self._jobs is not None:
            record = await self._jobs.get(disk_name)
            if record is not None and record.is_active:
                return f"job {record.job_id} is {record.state}"
        return None

    async def _clear(self, disk: Disk, *, reason: str) -> Disk:
        assert disk.info is not None
        cleared = vdi_metadata.remarked(disk.vdi.name_description, None, disk.info)
        log.warning("migration_mark_cleared", vdi=disk.vdi.id, disk_name=disk.vdi.name_label,
                    sr_to=disk.info.in_progress_to_sr, reason=reason)
        await self._xo.set_vdi(disk.vdi.id, name_description=cleared)
        return Disk(disk.volume_id, disk.vdi, vdi_metadata.parse(cleared))
