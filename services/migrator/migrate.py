"""handle(MigrationRequested, deps): one disk migration, idempotent, under the disk's Redis lock. The copy holds one of
this worker's copy slots (slots.py) and, with a per-SR limit, a slot on its source and its target SR
(shared/locks.py SrSlots).

XO is the fence: every step re-reads XO first, so a redelivered, re-published or reaped request finds the
work done (or XO's copy still running, which it waits for). Raises domain errors only (the consumer retries
retryable ones, dead-letters the others).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from services.migrator import transfer
from services.migrator.slots import CopySlots
from shared import metrics, placement, progress, vdi_metadata
from shared.errors import (
    BackendFailure,
    CapacityExhausted,
    DomainError,
    OperationPending,
    PlacementImpossible,
    PreconditionFailed,
    VolumeNotFound,
)
from shared.locks import DiskLock, SrSlots
from shared.logging import get_logger
from shared.messages import MigrationFinished, MigrationRequested
from shared.vdi_metadata import StorageInfo
from shared.xo.cache import DiskChanges
from shared.xo.client import XoClient
from shared.xo.errors import XoNotFound
from shared.xo.inventory import Inventory
from shared.xo.models import Sr, Vdi
from shared.xo.rest import XoRest

log = get_logger(__name__)


@dataclass(frozen=True)
class HandlerDeps:
    xo: XoClient
    redis: aioredis.Redis
    key_prefix: str
    lock_ttl_s: float
    lock_wait_s: float
    migrate_timeout_s: float
    per_sr_limit: int = 0  # most migrations at once touching one SR (source or target), all replicas; 0 = off
    sr_slot_wait_s: float = 60.0
    duplicate_grace_s: float = 30.0  # how long XO may take to destroy a copied disk's source (_source_destroyed)
    rest: XoRest | None = None  # XO's REST API: content streams of cross-pool moves and clones (transfer.py)
    inventory: Inventory | None = None  # SRs kept current by XO's notifications (else read from XO per job)
    copies: CopySlots | None = None  # this worker's copy slots (--concurrency); None: no limit here


async def handle(request: MigrationRequested, deps: HandlerDeps) -> MigrationFinished:
    """Bring disk ``request.disk_name`` onto an SR usable from ``request.host_id`` and say where it is.

    Already there -> succeeded without migrating (a stale migration mark is cleared). A copy XO still runs
    for the disk (started by a worker that died or was stopped) is waited for, up to ``migrate_timeout_s``.
    Raises OperationPending (lock held elsewhere, XO still copying after that, no free slot on the source or
    target SR within ``sr_slot_wait_s`` when ``per_sr_limit`` is set), LockLost, VolumeNotFound,
    CapacityExhausted, PlacementImpossible, PreconditionFailed (ambiguous duplicates; a disk a VM has
    plugged since the job was queued) and the XoError tree.
    """
    started = time.monotonic()
    # The outcome is recorded and announced while the lock goes back (the consumer's stop waits for the release):
    # the attach waiting for it need not wait for that round trip too.
    async with DiskLock(deps.redis, deps.key_prefix, request.disk_name, ttl_s=deps.lock_ttl_s,
                        wait_s=deps.lock_wait_s, release_after_exit=True) as lock:
        metrics.LOCK_WAIT.observe(time.monotonic() - started)
        try:
            with deps.xo.noting_changes(request.disk_name) as changes:  # until the copy: see _as_read
                named = await deps.xo.find_vdis(name_label=request.disk_name)
                changes.track(v.id for v in named)
                settled = transfer.unsettled(named)
                if settled:  # what an interrupted move or clone left: settled (settle returns the VDIs named after)
                    named = await transfer.settle(deps.xo, request.disk_name, lock)
                vdi = await _source_vdi(deps, request, lock, named)
                changes.track([vdi.id])
                vdi, sr_id = await _move(deps, request, vdi, lock, changes, settled=settled)
        except XoNotFound:  # a write on what the job had just read: its pool lost meanwhile (retryable) or gone
            await deps.xo.check_view_complete(f"an object of disk {request.disk_name}")
            raise
    return MigrationFinished(job_id=request.job_id, disk_name=request.disk_name, outcome="succeeded",
                             vdi_id=vdi.id, sr_id=sr_id, duration_s=round(time.monotonic() - started, 3))


async def _move(deps: HandlerDeps, request: MigrationRequested, vdi: Vdi, lock: DiskLock, changes: DiskChanges, *,
                settled: bool = False) -> tuple[Vdi, str]:
    xo = deps.xo
    views = {sr.id: placement.view(sr) for sr in await _tagged_srs(deps, request.tag)}
    info = vdi_metadata.parse(vdi.name_description) or StorageInfo(srs_with_tag=request.tag, migrating=True)
    current = views.get(vdi.sr_id)
    if current is None:
        sr = await xo.get_sr(vdi.sr_id)
        current = placement.view(sr) if sr is not None else None
    if current is not None and placement.usable_from(current, request.host_id, request.pool_id):
        log.info("migration_not_needed", disk_name=request.disk_name, sr_to=vdi.sr_id)
        return await transfer.clear_mark(xo, vdi, lock), vdi.sr_id
    await _not_plugged(xo, vdi, request.host_id)
    changes.track(vdi.vbd_ids)  # a VBD plugged where it is while the job waits for its slots: see _as_read
    srs = list(views.values())
    if current is not None and current.pool_id != request.pool_id:  # vdi.migrate stays in a pool: stream it
        target = await _placed(xo, request, lambda: placement.choose_across_pools(srs, vdi.size, request.host_id,
                                                                                  request.pool_id))
        if not settled:  # a target an interrupted stream left (its source's mark cleared since) goes first
            await transfer.settle(xo, request.disk_name, lock)
        async with copy_slots(deps, request.disk_name, vdi.sr_id, target.id):
            vdi = await _as_read(xo, vdi, changes, request.host_id)
            return await transfer.move_across_pools(deps, request.disk_name, request.job_id, vdi, target.id, info,
                                                    lock), target.id
    from_pool = current.pool_id if current is not None else None
    target = await _placed(xo, request, lambda: placement.choose_for_host(srs, vdi.size, request.host_id,
                                                                          request.pool_id, from_pool=from_pool))
    moved = await _copy(deps, request, vdi, target.id, info, lock, changes)
    if moved is None or moved.sr_id != target.id:
        where = "is gone" if moved is None else f"is on SR {moved.sr_id}"
        raise BackendFailure(f"XO migrated disk {request.disk_name}, but its new VDI {where}, not on target SR "
                             f"{target.id}")
    return moved, target.id


async def _placed(xo: XoClient, request: MigrationRequested,
                  choose: Callable[[], placement.SrView]) -> placement.SrView:
    """``choose()``'s target SR. Its PlacementImpossible or CapacityExhausted (both final: the job is dead-lettered)
    only once XO sees every pool: a pool XO has lost (a moment's disconnection, a reconnect still loading) is missing
    from the SRs it chose from, and absent is not deleted, so that is XoPoolDisconnected, retried."""
    try:
        return choose()
    except (PlacementImpossible, CapacityExhausted):
        await xo.check_view_complete(f"an SR of tag {request.tag} usable from host {request.host_id}")
        raise


async def _tagged_srs(deps: HandlerDeps, tag: str) -> list[Sr]:
    if deps.inventory is not None:
        return await deps.inventory.srs(tag=tag)
    return await deps.xo.find_srs(tag=tag)


async def _copy(deps: HandlerDeps, request: MigrationRequested, vdi: Vdi, target_id: str, info: StorageInfo,
                lock: DiskLock, changes: DiskChanges) -> Vdi | None:
    """Mark the disk, then vdi.migrate it to ``target_id`` and clear the mark the copy carries; the new VDI as
    XO's cache shows it then (None once it is gone).

    The mark goes on as soon as the job, holding the disk's lock, has read the disk and chosen the target: the job
    is committed to the move, and attaches of the disk elsewhere answer ABORTED ("being migrated") from then on.
    The job then waits for its copy slots (``copy_slots``: its worker's, prepared ahead; an SR's, with a per-SR
    limit) marked, so a slot passes from one copy to the next with no XO write in between. The mark counts as the
    job's own write: the disk is read again after the wait only when something else changed it (``_as_read``). A
    job that does not start its copy (a wait given up, the worker stopping, a change) takes its mark back
    (``_unmark_unmoved``). The slots go back as soon as the copy is over: XO's cache shows the source's VDI.copy
    operation ended, or XO answered (XoClient.migrate_vdi_described)."""
    xo = deps.xo
    marked = vdi_metadata.remarked(vdi.name_description, target_id, info)
    as_marked = vdi.model_copy(update={"name_description": marked})
    changes.expect(vdi.id, _shows_as(as_marked))
    await xo.set_vdi(vdi.id, name_description=marked)
    cleared = vdi_metadata.remarked(marked, None, info)
    async with contextlib.AsyncExitStack() as held:
        try:
            await held.enter_async_context(copy_slots(deps, request.disk_name, vdi.sr_id, target_id))
            lock.ensure_held()  # the wait may have outlived the disk lock
            vdi = await _as_read(xo, as_marked, changes, request.host_id)
            log.info("migration_started", disk_name=request.disk_name, sr_from=vdi.sr_id, sr_to=target_id,
                     vdi=vdi.id)
            copy_started = time.monotonic()

            async def answered() -> None:
                progress.copied()  # the worker's slot takes its next job
                await held.aclose()

            try:  # the slots go back once the copy is over (before XO's answer), not after the waits for its cache
                moved: Vdi | None = await xo.migrate_vdi_described(vdi, target_id, cleared, answered=answered,
                                                                  timeout_s=deps.migrate_timeout_s)
            except XoNotFound:  # the copy XO returned left the cache: gone, or its pool was lost
                moved = await xo.confirm_absent(f"the copy of disk {request.disk_name}",
                                                lambda: _copy_on(xo, request.disk_name, target_id))
        except DomainError:
            await _unmark_unmoved(xo, vdi, lock)
            raise
    metrics.MIGRATION_DURATION.observe(time.monotonic() - copy_started)
    metrics.MIGRATION_BYTES.inc(vdi.size)
    return moved


async def _not_plugged(xo: XoClient, vdi: Vdi, host_id: str) -> None:
    """PreconditionFailed when a VM has the disk plugged: a node uses it where it is (the CO published the volume
    there after this job was queued), and XO would move it under that VM (a live storage migration) or refuse.
    OperationPending (the job is retried) when XAPI's control domain has it: XO exports or copies it now.
    Read only when the disk has VBDs at all (``$VBDs``): a detached disk, the usual case, costs no call."""
    if not vdi.vbd_ids:
        return
    plugged = await xo.plugged(vdi.id)
    if plugged.by_vms:
        raise PreconditionFailed(f"disk {vdi.name_label} is plugged into VM {plugged.by_vms[0].vm_id}, which uses it "
                                 f"where it is; it does not move to host {host_id} under it: unpublish it from that "
                                 "node first")
    if plugged.by_xo:  # XO refuses to move a disk it streams (OTHER_OPERATION_IN_PROGRESS): not a VM using it
        raise OperationPending(plugged.xo_at_work(f"disk {vdi.name_label}"))


async def _as_read(xo: XoClient, vdi: Vdi, changes: DiskChanges, host_id: str) -> Vdi:
    """``vdi`` as XO shows it now, before the job writes to it after waiting for its slots (a job prepared ahead waits
    up to MIGRATOR_PREPARED_WAIT_S, a per-SR limit up to its slot wait): read again only when XO's notifications
    showed a change to the disk or its VBDs meanwhile (or may have been missed), other than the job's own mark
    (``DiskChanges.expect``). Changed in what the copy decides from (``_unchanged``) -> OperationPending: the job
    runs again from a new read. A VBD it had, plugged meanwhile (its VM started) -> PreconditionFailed, as before
    the wait (_not_plugged)."""
    if not changes.changed:
        return vdi
    now = await xo.get_vdi(vdi.id)
    if now is None or not _unchanged(vdi, now):
        raise OperationPending(f"disk {vdi.name_label} changed in XO while its job waited for a copy slot "
                               f"(VDI {vdi.id}); the job runs again from a new read")
    await _not_plugged(xo, now, host_id)
    return now


def _unchanged(read: Vdi, now: Vdi) -> bool:
    """Whether ``now`` shows the disk as ``read`` did in what the copy decides from: its SR, its description, no
    operation on it, no VBD it did not have (e.g. a node attached it where it is). A VBD gone meanwhile changes
    nothing of that (the node it served detached: XO often shows that only after the job's read)."""
    return (now.sr_id == read.sr_id and now.name_description == read.name_description and not now.current_operations
            and set(now.vbd_ids) <= set(read.vbd_ids))


def _shows_as(read: Vdi) -> Callable[[dict[str, Any]], bool]:
    """A notification's test for DiskChanges.expect: the VDI object shows the disk as ``read`` (``_unchanged``)."""
    def unchanged(obj: dict[str, Any]) -> bool:
        try:
            return _unchanged(read, Vdi.model_validate(obj))
        except ValidationError:
            return False
    return unchanged


async def _copy_on(xo: XoClient, disk_name: str, sr_id: str) -> Vdi | None:
    copies = await xo.find_vdis(name_label=disk_name, sr_id=sr_id)
    return copies[0] if len(copies) == 1 else None


@contextlib.asynccontextmanager
async def copy_slots(deps: HandlerDeps, disk_name: str, sr_from: str, sr_to: str) -> AsyncIterator[None]:
    """What a copy holds: one of this worker's copy slots (NotStarted when none frees within its wait), then, when
    ``per_sr_limit`` is set, a slot on both SRs (lease = the disk lock's TTL)."""
    async with contextlib.AsyncExitStack() as held:
        if deps.copies is not None:
            await held.enter_async_context(deps.copies.hold(disk_name))
        if deps.per_sr_limit > 0:
            slots = await held.enter_async_context(SrSlots(
                deps.redis, deps.key_prefix, (sr_from, sr_to), limit=deps.per_sr_limit, lease_s=deps.lock_ttl_s,
                wait_s=deps.sr_slot_wait_s, owner=disk_name))
            metrics.SR_SLOT_WAIT.observe(slots.waited_s)
        yield


async def _unmark_unmoved(xo: XoClient, vdi: Vdi, lock: DiskLock) -> None:
    """vdi.migrate failed: when XO left the disk on its SR and runs no copy of it, drop the mark set just before.
    A kept mark makes every later attach where the disk is answer ABORTED "being migrated" (attach.py), for good
    once the job has failed for good (e.g. a target SR in another pool: HANDLE_INVALID). A retry marks it again.
    Best effort: a failure here is logged and the caller re-raises the migration's own error."""
    try:
        current = await xo.get_vdi(vdi.id)
        if current is not None and current.sr_id == vdi.sr_id and not current.current_operations:
            await transfer.clear_mark(xo, current, lock)
    except DomainError as exc:
        log.warning("migration_mark_kept", disk_name=vdi.name_label, vdi=vdi.id, error=exc.message)


async def _source_vdi(deps: HandlerDeps, request: MigrationRequested, lock: DiskLock, vdis: list[Vdi]) -> Vdi:
    """The disk's one VDI (``vdis``: the VDIs named after it, just read), after XO finished a copy in flight and
    an interrupted copy was settled (see ``settle_duplicates``)."""
    xo = deps.xo
    if any(v.current_operations for v in vdis):
        vdis = await _settled(xo, request.disk_name, deps.migrate_timeout_s)
    if len(vdis) > 1:
        vdis = await _source_destroyed(xo, request.disk_name, vdis, deps.duplicate_grace_s)
    if not vdis:  # VolumeNotFound fails the job for good: only once XO is known to see every pool
        vdis = await xo.confirm_absent(f"disk {request.disk_name}",
                                       lambda: xo.find_vdis(name_label=request.disk_name))
    if not vdis:
        raise VolumeNotFound(f"disk {request.disk_name} does not exist in XO (no VDI with that name)")
    if len(vdis) == 1:
        return vdis[0]
    keep, stray = settle_duplicates(request.disk_name, vdis, request.vdi_id_seen)
    lock.ensure_held()
    log.warning("interrupted_copy_removed", disk_name=request.disk_name, vdi=stray.id, kept=keep.id,
                sr_from=keep.sr_id, sr_to=stray.sr_id)
    await xo.delete_vdi(stray.id)
    return keep


async def _settled(xo: XoClient, disk_name: str, timeout_s: float) -> list[Vdi]:
    """The disk's VDIs once XO runs no operation on them. XO keeps copying when the worker that asked for
    the copy dies or is stopped; its successor (holding the disk lock now) waits for that copy instead of
    failing or starting another one. OperationPending when XO is still busy after ``timeout_s``."""
    log.info("migration_in_flight_awaited", disk_name=disk_name, timeout_s=timeout_s)

    def idle(vdis: list[Vdi]) -> list[Vdi] | None:
        return None if any(v.current_operations for v in vdis) else vdis

    vdis = await _named_until(xo, disk_name, idle, seen=(), timeout_s=timeout_s, max_interval_s=2.0)
    if vdis is None:
        raise OperationPending(f"disk {disk_name}: XO is still copying it after {timeout_s:g} s")
    return vdis


async def _source_destroyed(xo: XoClient, disk_name: str, vdis: list[Vdi], grace_s: float) -> list[Vdi]:
    """Two idle VDIs carry the disk's name: after a copy, XO swaps the VBDs over and destroys the source only
    after its cache showed the copy (``Xapi#moveVdi``), so for a moment both exist and both are complete. Deleting
    the "stray" copy then would lose the disk once XO destroys the source: wait (``grace_s``) until one of them
    leaves the cache; only two VDIs still there afterwards are an interrupted copy for ``settle_duplicates``."""
    def one_left(current: list[Vdi]) -> list[Vdi] | None:
        return current if len(current) < 2 or any(v.current_operations for v in current) else None

    left = await _named_until(xo, disk_name, one_left, seen=vdis, timeout_s=grace_s, max_interval_s=1.0)
    if left is not None and any(v.current_operations for v in left):
        raise OperationPending(f"disk {disk_name}: XO copies it again ({', '.join(v.id for v in left)})")
    return left if left is not None else await xo.find_vdis(name_label=disk_name)


def settle_duplicates(disk_name: str, vdis: list[Vdi], vdi_id_seen: str) -> tuple[Vdi, Vdi]:
    """(source to keep, interrupted copy to delete) for two VDIs carrying one disk name.

    Rule: XO copies to the target SR and destroys the source only *after* the copy completed, so while two
    VDIs exist the **source** is always complete and the other may be partial. The source is the VDI the
    requester saw (``vdi_id_seen``), else the one *not* on the SR named by the migration mark. We only ever
    delete the non-source copy, and only when XO runs no operation on either VDI (a running copy raises
    OperationPending: retry later) and it has no VBD. Anything else is ambiguous: PreconditionFailed for an
    operator, never a guess.
    """
    if any(v.current_operations for v in vdis):
        raise OperationPending(f"disk {disk_name}: XO is still copying it ({', '.join(v.id for v in vdis)})")
    if len(vdis) != 2:
        raise PreconditionFailed(f"{len(vdis)} VDIs are named {disk_name}; remove the strays in XO")
    source = next((v for v in vdis if v.id == vdi_id_seen), None)
    if source is None:
        marks = {info.in_progress_to_sr for v in vdis if (info := vdi_metadata.parse(v.name_description))}
        marks.discard(None)
        off_target = [v for v in vdis if v.sr_id not in marks]
        source = off_target[0] if len(marks) == 1 and len(off_target) == 1 else None
    stray = next((v for v in vdis if source is not None and v.id != source.id), None)
    if source is None or stray is None or stray.vbd_ids:
        ids = ", ".join(f"{v.id} on SR {v.sr_id}" for v in vdis)
        raise PreconditionFailed(f"two VDIs are named {disk_name} ({ids}) and which one is the complete source "
                                 "cannot be told safely; remove the stray copy in XO")
    return source, stray


async def _named_until(xo: XoClient, disk_name: str, pick: Callable[[list[Vdi]], list[Vdi] | None], *,
                       seen: Iterable[Vdi], timeout_s: float, max_interval_s: float) -> list[Vdi] | None:
    """Re-read the VDIs named ``disk_name`` until ``pick`` returns something other than None (then that), woken by
    notifications about a VDI of that name or one seen before (``seen`` and every read); None after ``timeout_s``."""
    known = {v.id for v in seen}

    async def check() -> list[Vdi] | None:
        vdis = await xo.find_vdis(name_label=disk_name)
        known.update(v.id for v in vdis)
        return pick(vdis)

    def relevant(obj_id: str, obj: dict[str, object] | None) -> bool:
        return obj_id in known or (obj is not None and obj.get("type") == "VDI" and obj.get("name_label") == disk_name)

    return await xo.wait_until(check, timeout_s=timeout_s, max_interval_s=max_interval_s, relevant=relevant)
