"""QueueMigrationGate: the Attacher's MigrationGate over RabbitMQ + Redis (the work runs in xo-csi-migrator).

Register as a waiter for the disk's events (services/csi_frontend/events.py: one consumer per frontend) *before*
reading the job state (no lost wake-up), create-or-join the disk's job in Redis, publish the request only when
this call created the job, then wait until the RPC deadline minus a margin. The migration never runs on the gRPC
call's task, so a timeout does not disturb it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

from services.csi_frontend.attach import NodePlace
from services.csi_frontend.disks import Disk, DiskLocator
from services.csi_frontend.events import MigrationEvents
from services.csi_frontend.sightings import Obj, VdiSightings, disk_after
from shared import broker, messages, metrics, placement
from shared.backoff import Backoff
from shared.errors import (
    AlreadyExistsIncompatible,
    BackendUnavailable,
    CapacityExhausted,
    DomainError,
    OperationPending,
    PlacementImpossible,
    PreconditionFailed,
    VolumeNotFound,
    error_class,
)
from shared.jobs import JobRecord, JobStore
from shared.logging import get_logger
from shared.messages import FailureReason, JobRequest, MigrationFinished, MigrationRequested
from shared.xo.inventory import Inventory

log = get_logger(__name__)

# What a job that failed for good answers the attach, by the family of its error (looked up by code); any other
# cause is FAILED_PRECONDITION (PreconditionFailed) naming it.
_REPORTED_AS_IS: tuple[type[DomainError], ...] = (CapacityExhausted, PlacementImpossible, VolumeNotFound,
                                                   AlreadyExistsIncompatible)


class QueueMigrationGate:
    """Implements ``attach.MigrationGate``.

    Returns the Disk as XO shows it after the migration, on an SR usable from the node. Raises
    OperationPending when ``deadline_s - margin_s`` passes first (the attacher retries and joins the same
    job), the error of a failed job (``failed_job_error``), BackendUnavailable when the
    broker or Redis cannot be used.
    """

    def __init__(
        self, events: MigrationEvents, publisher: broker.Publisher, jobs: JobStore, disks: DiskLocator,
        inventory: Inventory, *, sightings: VdiSightings | None = None, margin_s: float = 2.0, poll_max_s: float = 2.0,
    ) -> None:
        self._events = events
        self._publisher = publisher
        self._jobs = jobs
        self._disks = disks
        self._inventory = inventory
        self._sightings = sightings
        self._margin_s = margin_s
        self._poll_max_s = poll_max_s

    async def prepare(self) -> None:
        """Subscribe to the migration events now (at start), so that the first migrating attach does not wait for
        it; when RabbitMQ cannot be used yet, the first attach tries again."""
        await self._events.prepare()

    async def migrate_for(self, disk: Disk, place: NodePlace, deadline_s: float) -> Disk:
        name = disk.vdi.name_label
        if disk.tag is None:
            raise PreconditionFailed(f"disk {name} has no srsWithTag in its description; it cannot migrate")
        # Watched from before the job: the copy's notifications, the source's exit.
        with self._seeing(name, disk.vdi.id) as seen:
            result = await self.run_job(_request(disk, place), deadline_s,
                                        f"disk {name} is migrating to host {place.host_id}")
            return await self._outcome(disk, place, result, seen)

    async def finish_move(self, disk: Disk, place: NodePlace, deadline_s: float) -> Disk:
        """A move across pools got past its rename (``disks.unfinished_move``; ``disk``: its source while it exists,
        else its target): only a migration job finishes it (its ``transfer.settle``). OperationPending while a job of
        the disk is active: that job finishes it (a job that keeps failing there is handed back, never failed). With
        none (it failed for good, or its record expired while no migrator ran), a job for ``place`` is enqueued
        and waited for as by ``migrate_for``: it finishes the move, then brings the disk to the node if it must."""
        name = disk.vdi.name_label
        record = await self._jobs.get(name)
        if record is not None and record.is_active:
            raise OperationPending(f"volume {disk.volume_id} is being migrated: job {record.job_id} ({record.state}) "
                                   "is finishing its move; retry shortly")
        log.warning("unfinished_move_resumed", disk_name=name, vdi=disk.vdi.id, node_id=place.vm.id,
                    last_job_id=record.job_id if record is not None else None)
        return await self.migrate_for(disk, place, deadline_s)

    @contextlib.contextmanager
    def _seeing(self, name: str, vdi_id: str) -> Iterator[dict[str, Obj | None]]:
        if self._sightings is None:
            yield {}
            return
        with self._sightings.watching(name, present=(vdi_id,)) as seen:
            yield seen

    async def run_job(self, request: JobRequest, deadline_s: float, doing: str) -> MigrationFinished:
        """Create-or-join the job of ``request.disk_name`` (a migration, or a clone: services/csi_frontend/cloning.py)
        and wait for its outcome until ``deadline_s`` minus the margin; OperationPending "<doing> (job ...): still
        running" when the deadline comes first (the caller's retry joins the same job)."""
        result = await self._waited(request.disk_name, lambda: self._enqueue(request), deadline_s, doing,
                                    kind=request.kind)
        assert result is not None  # _enqueue always gives a job
        return result

    async def join_job(self, disk_name: str, deadline_s: float, doing: str) -> MigrationFinished | None:
        """Wait as ``run_job`` for the disk's job when one is active (queued or running); None at once when none
        is. A retried CreateVolume of a clone joins its job this way before anything it would check or place to
        create one (the job's own target, or its export of the source, would change what it finds)."""
        async def active() -> tuple[JobRecord, bool] | None:
            record = await self._jobs.get(disk_name)
            return (record, False) if record is not None and record.is_active else None

        return await self._waited(disk_name, active, deadline_s, doing, kind="join")

    async def _waited(self, name: str, start: Callable[[], Awaitable[tuple[JobRecord, bool] | None]],
                      deadline_s: float, doing: str, *, kind: str) -> MigrationFinished | None:
        """Subscribed to the disk's events, ``start()`` the job (create or join; None: no job to wait for), then
        wait for its outcome until ``deadline_s`` minus the margin (OperationPending naming ``doing`` then)."""
        job_id = "(not created)"
        timer = asyncio.timeout(max(deadline_s - self._margin_s, 0.001))
        started, outcome = time.monotonic(), "error"
        try:
            async with timer, self._events.waiting(name) as events:
                begun = await start()
                if begun is None:
                    outcome = "none"
                    return None
                record, created = begun
                job_id = record.job_id
                (metrics.JOBS_ENQUEUED if created else metrics.JOBS_JOINED).inc()
                log.info("migration_waiting", disk_name=name, job_id=job_id, joined=not created, kind=kind)
                result = await self._wait(name, record, events)
                outcome = result.outcome
        except TimeoutError as exc:
            if not timer.expired():
                raise
            outcome = "deadline"
            raise OperationPending(f"{doing} (job {job_id}): still running; the caller's retry will pick it "
                                   "up") from exc
        finally:
            if outcome != "none":
                metrics.PUBLISH_WAIT.labels(outcome).observe(time.monotonic() - started)
        return result

    async def _enqueue(self, request: JobRequest) -> tuple[JobRecord, bool]:
        """Create-or-join the disk's job, and publish ``request`` when it created the job. Interrupted anywhere
        (the deadline, a cancellation, RabbitMQ or Redis failing), it drops the record it may have created
        unpublished, so the next try (ours or another replica's) publishes again instead of joining a job no
        worker will ever see; a record of another job is left alone."""
        try:
            record, created = await self._jobs.create_or_join(request)
            if created:
                await self._publisher.request(request)
        except BaseException:
            await self._abandon(request)
            raise
        return record, created

    async def _abandon(self, request: JobRequest) -> None:
        # What stopped the enqueue (a cancellation above all) is what propagates, not a failure of this cleanup.
        try:
            await asyncio.shield(self._jobs.abandon(request.disk_name, request.job_id))
        except DomainError as exc:
            log.warning("migration_job_not_abandoned", disk_name=request.disk_name, job_id=request.job_id,
                        error=exc.message, note="the queued record expires after its TTL")

    async def _wait(self, name: str, record: JobRecord, events: asyncio.Queue[MigrationFinished]) -> MigrationFinished:
        """The outcome of the disk's job. A newer job that replaced ours (another attach asked for the disk once ours
        had ended) is followed: its success is read as ours (``_outcome`` checks where the disk is), but its failure
        is not ours to answer (its target may be another host): OperationPending, and the retry reads anew."""
        job_id = record.job_id
        polls = Backoff(start_s=0.05, cap_s=self._poll_max_s, jitter=False).delays()
        interval_s = next(polls)
        while True:
            current = await self._jobs.get(name)
            if current is None:
                raise OperationPending(f"the job record of disk {name} (job {job_id}) vanished; retry")
            if current.job_id != job_id:
                log.info("migration_job_replaced", disk_name=name, job_id=job_id, new_job_id=current.job_id)
                job_id = current.job_id  # a newer job for this disk: follow it
            if not current.is_active and current.result is not None:
                return _own(current.result, record.job_id)
            try:
                # Events are the wake-up; the Redis record is the truth, re-read on a capped backoff too.
                async with asyncio.timeout(interval_s):
                    event = await events.get()
                if event.job_id == job_id:
                    return _own(event, record.job_id)
            except TimeoutError:
                interval_s = next(polls)

    async def _outcome(self, disk: Disk, place: NodePlace, result: MigrationFinished, seen: dict[str, Obj | None]
                       ) -> Disk:
        name = disk.vdi.name_label
        where = f"migration of disk {name} to host {place.host_id} (job {result.job_id})"
        if result.outcome == "failed":
            raise failed_job_error(where, result.error)
        # The disk as XO's notifications showed it when conclusive (the migrator waited for XO's cache to show its
        # last write before it announced the job), else as read now.
        moved = disk_after(disk, result, seen) or await self._disks.get(disk.volume_id)
        sr = await self._inventory.sr(moved.vdi.sr_id, usage=False)
        if sr is None or not placement.usable_from(placement.view(sr), place.host_id, place.pool_id):
            raise OperationPending(f"{where} finished, but the disk is on SR {moved.vdi.sr_id}, not usable from "
                                   "that host (another node asked for it meanwhile); retry")
        return moved


def _own(result: MigrationFinished, job_id: str) -> MigrationFinished:
    """``result`` as the outcome of job ``job_id`` (see ``_wait``): another job's failure raises OperationPending."""
    if result.job_id != job_id and result.outcome == "failed":
        raise OperationPending(f"job {job_id} of disk {result.disk_name} was replaced by job {result.job_id} (another "
                               "attach asked for the disk), which failed; retry")
    return result


def failed_job_error(where: str, error: FailureReason | None) -> DomainError:
    """The error an attach answers for a failed migration job: BackendUnavailable (retry) for a retryable cause;
    for a permanent one, the family of its error (``error_class`` of its code, old class names too) when it is
    one of ``_REPORTED_AS_IS``, else PreconditionFailed."""
    reason = error.message if error else "no reason given"
    if error is not None and error.retryable:
        return BackendUnavailable(f"{where} failed after retries: {reason}")
    cls = error_class(error.code) if error is not None else None
    family = next((kind for kind in _REPORTED_AS_IS if cls is not None and issubclass(cls, kind)), PreconditionFailed)
    return family(f"{where} failed: {reason}")


def _request(disk: Disk, place: NodePlace) -> MigrationRequested:
    """A new job's request (stored in the job record too, so a worker or the reaper can publish it again)."""
    assert disk.tag is not None
    return MigrationRequested(
        job_id=messages.new_job_id(), disk_name=disk.vdi.name_label, volume_id=str(disk.volume_id),
        vdi_id_seen=disk.vdi.id, tag=disk.tag, vm_id=place.vm.id, host_id=place.host_id, pool_id=place.pool_id,
        requested_at=messages.utc_now(), correlation_id=uuid.uuid4().hex,
    )
