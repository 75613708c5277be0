"""A disk's content streamed into a new VDI through XO's REST export and import: moves across pools (XO's
vdi.migrate stays within a pool) and clones (clone.py). Runs under the Redis lock of the disk being filled.

The target is created as ``<disk>~incoming`` with a transfer mark (shared/transfer_marks.py) and only becomes the
volume's disk once the stream completed:

    1. (move) mark the source "being migrated" to the target SR (m4rCsi's inProgressToSRUUID): attaches answer
       ABORTED from now on, as during an intra-pool copy
    2. create ``<disk>~incoming`` on the target SR, mark "copying from <source>"     (REST POST /vdis)
    3. stream the source into it: vhd, exact Content-Length, never buffered         (REST GET -> PUT)
    4. (clone) grow it to the requested size, offline                               (vdi.set size)
    5. mark it "complete"
    6. rename it to ``<disk>``: two VDIs carry the name, the source still marked    (vdi.set name_label)
    7. (move) delete the source, re-read first
    8. give it the volume's ``csi:info``: from now on it is the volume's disk        (vdi.set name_description)

A VDI with a transfer mark is never used as a volume, a marked source is never attached, so at no point do two
usable disks claim the volume. A failed step before 6 deletes the target (then unmarks the source of a move); one
after 6 is retried until the job finishes (``TransferUnfinished``), and a controller that finds a renamed target
with no job active enqueues one (services/csi_frontend/migration_gate.py ``finish_move``). A crash anywhere is
settled by the next attempt, under the lock, before it does anything else (``settle``): a target not marked
complete, or complete but not yet renamed, is deleted; a renamed complete one is carried through 7 and 8, unless
its source was used meanwhile (its mark gone, or plugged): then the source, newer, stays the disk and the copy is
deleted. XO is re-read before every destructive call, and nothing is concluded from an empty lookup while XO
misses a pool. States and crash points: docs/migrations.md.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from shared import metrics, progress, transfer_marks, vdi_metadata
from shared.errors import (
    AlreadyExistsIncompatible,
    DomainError,
    OperationPending,
    PreconditionFailed,
    VolumeNotFound,
)
from shared.locks import DiskLock
from shared.logging import get_logger
from shared.progress import StreamProgress
from shared.transfer_marks import TransferMark
from shared.vdi_metadata import StorageInfo
from shared.xo.client import XoClient
from shared.xo.control_domains import Plugged
from shared.xo.errors import XoNotFound, XoUnavailable, XoVdiInUse
from shared.xo.models import Vdi
from shared.xo.rest import XoRest
from shared.xo.streaming import Progress, stream_copy

if TYPE_CHECKING:
    from services.migrator.migrate import HandlerDeps

log = get_logger(__name__)


async def move_across_pools(deps: HandlerDeps, disk_name: str, job_id: str, source: Vdi, sr_id: str,
                            info: StorageInfo, lock: DiskLock) -> Vdi:
    """Move disk ``disk_name`` (VDI ``source``, whose description says ``info``) onto SR ``sr_id`` of another
    pool; returns the disk's new VDI. On a failure before the target took the disk's name, the target is
    deleted and the source unmarked (best effort: the next attempt settles what is left)."""
    lock.ensure_held()
    if info.in_progress_to_sr != sr_id:
        marked = vdi_metadata.remarked(source.name_description, sr_id, info)
        await deps.xo.set_vdi(source.id, name_description=marked)
    log.info("transfer_started", disk_name=disk_name, sr_from=source.sr_id, sr_to=sr_id, vdi=source.id)
    # The target gets the source's csi:info as written (every field kept), without the mark.
    final = vdi_metadata.remarked(source.name_description, None, info)
    mark = TransferMark("copying", "move", source.id, job_id, final)
    try:
        target_id = await fill(deps, disk_name, source, sr_id, mark, lock)
    except DomainError:
        await _unmark(deps.xo, source, lock)
        raise
    return await finish(deps.xo, disk_name, target_id, mark.completed(), lock)


async def fill(deps: HandlerDeps, disk_name: str, source: Vdi, sr_id: str, mark: TransferMark, lock: DiskLock, *,
               grow_to: int = 0) -> str:
    """Steps 2-5: a new VDI ``<disk_name>~incoming`` on ``sr_id`` holding the content of ``source``, grown to
    ``grow_to`` when larger, marked complete; returns its id. On a domain error it is deleted (best effort)
    before the error propagates; a cancellation leaves it for the next attempt's ``settle``."""
    rest = _rest(deps)
    lock.ensure_held()
    target_id = await rest.create_vdi(sr_id, source.size, transfer_marks.incoming_name(disk_name),
                                      mark.to_description())
    log.info("transfer_target_created", disk_name=disk_name, vdi=target_id, sr=sr_id, source=source.id)
    try:
        await _stream(deps, disk_name, source, target_id)
        if grow_to > source.size:
            lock.ensure_held()
            await deps.xo.set_vdi(target_id, size_bytes=grow_to)
        lock.ensure_held()
        await deps.xo.set_vdi(target_id, name_description=mark.completed().to_description())
    except DomainError as exc:
        await _discard_quietly(deps.xo, target_id, lock, exc)
        raise
    return target_id


class TransferUnfinished(OperationPending, code="transfer_unfinished"):
    """A step after the rename (7, 8) failed: the target carries the disk's name with only its transfer mark,
    which no attach uses, and only a job carries it through. Retryable, and the consumer hands the job back
    whatever its attempt (services/migrator/consumer.py): given up, it would leave the volume unattachable."""


async def finish(xo: XoClient, disk_name: str, target_id: str, mark: TransferMark, lock: DiskLock) -> Vdi:
    """Steps 6-8 for a target marked complete: it takes the disk's name, the source of a move is deleted, it gets
    the volume's ``csi:info``. Each step is skipped when already done, so a retry resumes where a crash stopped.
    Once the target took the name, a failure is TransferUnfinished (a failed rename is not: should XO have done
    it unanswered, a controller finding the renamed target with no job active enqueues one).

    A move whose source was used since the copy was made (``_delete_source``) is not finished: the source holds
    the newer content, so the copy is deleted instead and OperationPending sends the job round again, from the
    source."""
    target = await _present(xo, target_id)
    if target.name_label != disk_name:
        if mark.kind == "clone":
            await _name_still_free(xo, disk_name, target_id, lock)
        lock.ensure_held()
        await xo.set_vdi(target_id, name_label=disk_name)
    try:
        finished = await _swap(xo, disk_name, target, mark, lock)
    except DomainError as exc:
        raise TransferUnfinished(f"the {mark.kind} into disk {disk_name} (VDI {target_id}) stopped after its target "
                                 f"took the disk's name: {exc.message}; the job goes on until it is finished") from exc
    if finished is None:
        raise OperationPending(f"the source VDI {mark.source} of disk {disk_name} was used while its move was "
                               f"unfinished: its older copy {target_id} is deleted and the job runs again from it")
    return finished


async def _swap(xo: XoClient, disk_name: str, target: Vdi, mark: TransferMark, lock: DiskLock) -> Vdi | None:
    """Steps 7 and 8 of ``finish``; None when the source of a move was kept and the copy deleted."""
    if mark.kind == "move" and not await _delete_source(xo, mark.source, target.sr_id, lock):
        await _discard(xo, target, lock, reason=f"its source {mark.source} was used since the copy was made")
        return None
    lock.ensure_held()
    await xo.set_vdi(target.id, name_description=mark.info)
    log.info("transfer_finished", disk_name=disk_name, vdi=target.id, kind=mark.kind, source=mark.source)
    return await _present(xo, target.id)


def unsettled(named: list[Vdi]) -> bool:
    """Whether an interrupted attempt may have left something ``settle`` must handle, from the VDIs named after the
    disk: one renamed target (a transfer mark), or a source marked "being migrated" (a stream marks it before it
    creates ``<disk>~incoming``, and unmarks it only once that is gone). No mark: nothing to settle, no lookup of
    ``~incoming`` (a cross-pool move still settles before it streams)."""
    return any(transfer_marks.is_marked(v.name_description)
               or ((info := vdi_metadata.parse(v.name_description)) is not None and info.in_progress_to_sr)
               for v in named)


async def settle(xo: XoClient, disk_name: str, lock: DiskLock) -> list[Vdi]:
    """Before an attempt on ``disk_name`` does anything: delete the targets an interrupted attempt left that are
    not proven complete and carry a renamed complete one through ``finish``. Returns the VDIs named after the disk
    once settled, for the caller to go on from without a lookup of its own: as read when there was nothing to do
    (one lookup pair in all), else read again. Like any lookup, an empty answer is not proof of absence while XO
    may miss a pool (``XoClient.confirm_absent``)."""
    incoming_name = transfer_marks.incoming_name(disk_name)
    incoming = await xo.find_vdis(name_label=incoming_name)
    named = await xo.find_vdis(name_label=disk_name)
    renamed = [v for v in named if transfer_marks.is_marked(v.name_description)]
    if not incoming and not renamed and unsettled(named):  # a source still marked: its target may sit in a pool
        # XO has lost, or whose objects it is still loading: absent only once XO shows every pool, looked up again
        incoming = await xo.confirm_absent(f"VDI {incoming_name}", lambda: xo.find_vdis(name_label=incoming_name))
    if not incoming and not renamed:
        return named
    await xo.check_view_complete(f"the VDIs of disk {disk_name}")  # a source in a lost pool is not a deleted one
    for vdi in incoming:  # never renamed: at best complete but unused; a new stream is cheaper than a doubt
        await _discard(xo, vdi, lock, reason="left by an interrupted attempt before it took the disk's name")
    for vdi in renamed:
        mark = transfer_marks.parse(vdi.name_description)
        if mark is None:
            raise PreconditionFailed(f"VDI {vdi.id} named {disk_name} carries an unreadable transfer mark "
                                     f"({vdi.name_description[:120]!r}); check it and delete or fix it in XO")
        if not mark.complete:
            await _discard(xo, vdi, lock, reason="named after the disk but not marked complete")
            continue
        log.warning("transfer_resumed", disk_name=disk_name, vdi=vdi.id, kind=mark.kind, source=mark.source)
        await finish(xo, disk_name, vdi.id, mark, lock)
    return await xo.find_vdis(name_label=disk_name)


# -- the stream ----------------------------------------------------------------------------------------------


async def _stream(deps: HandlerDeps, disk_name: str, source: Vdi, target_id: str) -> None:
    """Step 3, with progress for the job record and the metrics; XO's answers mapped to what the job reports."""
    meter = _Meter(disk_name)
    started = time.monotonic()
    metrics.STREAMS_RUNNING.inc()
    try:
        async with asyncio.timeout(deps.migrate_timeout_s):
            result = await stream_copy(_rest(deps), source.id, target_id, "vhd", progress=meter.update)
    except TimeoutError as exc:
        raise XoUnavailable(f"streaming disk {disk_name} took longer than {deps.migrate_timeout_s:g} s; retry",
                            method="stream_copy") from exc
    except XoVdiInUse as exc:
        raise PreconditionFailed(f"VDI {source.id} of disk {source.name_label} is attached to a VM and XO cannot "
                                 f"export it: {transfer_marks.DETACH_TO_CLONE}") from exc
    except XoNotFound:
        if await deps.xo.get_vdi(source.id) is None:
            await deps.xo.check_view_complete(f"VDI {source.id}")  # XoPoolDisconnected: absent is not deleted
            raise VolumeNotFound(f"the source VDI {source.id} of disk {disk_name} vanished from XO while it was "
                                 "streamed") from None
        raise
    finally:
        metrics.STREAMS_RUNNING.dec()
        meter.close()
    metrics.STREAM_DURATION.observe(time.monotonic() - started)
    log.info("transfer_streamed", disk_name=disk_name, bytes=result.bytes_sent, duration_s=round(result.duration_s, 3),
             rate_mib_s=round(result.rate_bps / 2**20, 1))


class _Meter:
    """Progress of one stream into the job record (shared/progress.py) and the metrics."""

    def __init__(self, disk_name: str) -> None:
        self._disk = disk_name
        self._counted = 0

    async def update(self, step: Progress) -> None:
        progress.report(StreamProgress(done_bytes=step.done_bytes, total_bytes=step.total_bytes,
                                       rate_bps=round(step.rate_bps, 1)))
        metrics.STREAM_BYTES.inc(max(step.done_bytes - self._counted, 0))
        self._counted = max(self._counted, step.done_bytes)
        metrics.STREAM_PROGRESS.labels(self._disk).set(step.done_bytes / step.total_bytes if step.total_bytes else 1)

    def close(self) -> None:
        try:
            metrics.STREAM_PROGRESS.remove(self._disk)
        except KeyError:
            pass  # no progress was reported


# -- destructive steps, each after a re-read ---------------------------------------------------------------


async def _delete_source(xo: XoClient, source_id: str, target_sr: str, lock: DiskLock) -> bool:
    """Step 7: delete the source of a move into SR ``target_sr``; True once it is gone (gone already counts only
    once XO sees every pool). False, the source kept, when it may have been written since the copy was made: its
    "being migrated" mark toward ``target_sr``, which every attach of ours refuses (step 1 sets it before the
    copy starts), is gone (cleared by an operator or an older controller's stale-mark rule), or a VM has it
    plugged. An unplugged VBD proves no use: the move leaves those a disk already had (``_not_plugged``); nor does
    a read-only VBD of XAPI's control domain: XO exporting it, the move's own export included while XO's cache
    still shows it (XO retries the destroy while XAPI unplugs it)."""
    source = await xo.get_vdi(source_id)
    if source is None:
        await xo.check_view_complete(f"the source VDI {source_id} of a finished move")
        return True
    info = vdi_metadata.parse(source.name_description)
    plugged = await xo.plugged(source_id) if source.vbd_ids else Plugged([], [])
    if info is None or info.in_progress_to_sr != target_sr or plugged.by_vms or plugged.xo_writes:
        log.warning("transfer_source_kept", vdi=source_id, disk_name=source.name_label, sr_to=target_sr,
                    plugged_in=[vbd.vm_id for vbd in plugged.by_vms] + [vbd.vm_id for vbd, _ in plugged.by_xo],
                    reason="used since the copy was made")
        return False
    lock.ensure_held()
    await xo.delete_vdi(source_id)
    log.info("transfer_source_deleted", vdi=source_id)
    return True


async def _name_still_free(xo: XoClient, disk_name: str, target_id: str, lock: DiskLock) -> None:
    """Before a clone's target takes the new volume's name: a disk given that name meanwhile (a blank CreateVolume
    of the same name while the clone streamed) keeps it; the target is deleted and the job fails with
    AlreadyExistsIncompatible, rather than leave two disks of one name."""
    taken = await xo.find_vdis(name_label=disk_name)
    if not taken:
        return
    await _discard(xo, await _present(xo, target_id), lock, reason=f"disk {disk_name} was made meanwhile")
    raise AlreadyExistsIncompatible(f"disk {disk_name} was made by another CreateVolume while it was being cloned "
                                    f"(VDI {taken[0].id}); the clone needs another name")


async def _discard(xo: XoClient, vdi: Vdi, lock: DiskLock, *, reason: str) -> None:
    """Delete a target that is not (proven) complete; it was never a volume, so it cannot be attached."""
    log.warning("transfer_target_removed", vdi=vdi.id, disk_name=vdi.name_label, reason=reason)
    lock.ensure_held()
    await xo.delete_vdi(vdi.id)


async def _discard_quietly(xo: XoClient, target_id: str, lock: DiskLock, cause: DomainError) -> None:
    """After a failed fill: delete the target; when that fails too, the next attempt's ``settle`` does."""
    try:  # not found while XO has lost a pool (the target's, as when that cut the stream) is not gone: kept
        target = await xo.lookup_confirmed(f"the target VDI {target_id}", lambda: xo.get_vdi(target_id))
        if target is not None:
            await _discard(xo, target, lock, reason=f"the transfer failed: {cause.message}")
    except DomainError as exc:
        log.warning("transfer_target_kept", vdi=target_id, error=exc.message, note="the next attempt deletes it")


async def _unmark(xo: XoClient, source: Vdi, lock: DiskLock) -> None:
    """After a failed move: drop the source's "being migrated" mark so that it is usable again where it is, unless
    the failed fill could not delete its target, or XO, having lost a pool, cannot show whether it did (the mark
    then keeps the source unused until a retry settles; a cleared one would leave the target to no one)."""
    incoming = transfer_marks.incoming_name(source.name_label)
    try:
        if await xo.lookup_confirmed(f"VDI {incoming}", lambda: xo.find_vdis(name_label=incoming)):
            return
        current = await xo.get_vdi(source.id)
        if current is not None:
            await clear_mark(xo, current, lock)
    except DomainError as exc:
        log.warning("transfer_mark_kept", disk_name=source.name_label, vdi=source.id, error=exc.message)


async def clear_mark(xo: XoClient, vdi: Vdi, lock: DiskLock) -> Vdi:
    """Drop ``vdi``'s "being migrated" mark (under the disk's lock), every other field of its csi:info kept; the
    VDI as given (unchanged when it carries no mark)."""
    current = vdi_metadata.parse(vdi.name_description)
    if current is None or current.in_progress_to_sr is None:
        return vdi
    lock.ensure_held()
    cleared = vdi_metadata.remarked(vdi.name_description, None, current)
    await xo.set_vdi(vdi.id, name_description=cleared)
    return vdi


async def _present(xo: XoClient, vdi_id: str) -> Vdi:
    vdi = await xo.get_vdi(vdi_id)
    if vdi is None:
        raise XoUnavailable(f"XO's cache does not show VDI {vdi_id} that this transfer filled; retry",
                            method="transfer")
    return vdi


def _rest(deps: HandlerDeps) -> XoRest:
    if deps.rest is None:
        raise PreconditionFailed("this migrator has no XO REST client: it cannot stream a disk's content")
    return deps.rest
