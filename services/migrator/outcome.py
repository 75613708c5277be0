"""How a job this worker owns ends: success recorded and announced; handed back to the queue (retry, shutdown,
reaped) as attempt + 1; given back unstarted (same attempt); or failed: dead-lettered, recorded and announced. Used
by the consumer and the reaper.

Every publish is confirmed. A message that carries the job on (a hand-back, a dead letter) is published *before*
the record changes; a give-back's, which repeats the attempt, right after (see ``give_back``); a success's event,
which only wakes the waiters, at the same time. The record changes only while this worker's claim still owns it.
A BackendUnavailable leaves the record running under the claim with no more heartbeats, so the reaper finishes the
hand-back later: nothing is lost, at worst a step repeats.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from shared import broker, messages, metrics
from shared.errors import DomainError
from shared.jobs import JobRecord, JobStore
from shared.logging import get_logger
from shared.messages import FailureReason, MigrationFinished, utc_now

log = get_logger(__name__)


def failure_of(exc: DomainError) -> FailureReason:
    """The wire form of a domain error: its stable code (shared/errors.py), which the frontend maps back."""
    return FailureReason(code=exc.code, message=exc.message, retryable=exc.retryable)


class Outcomes:
    """The three ways out of ``running``. Each method raises BackendUnavailable when RabbitMQ or Redis did not
    take its step (see the module docstring for why that is safe)."""

    def __init__(self, publisher: broker.Publisher, jobs: JobStore, *, worker: str, max_attempts: int) -> None:
        self._publisher = publisher
        self._jobs = jobs
        self._worker = worker
        self._max_attempts = max_attempts

    async def succeeded(self, record: JobRecord, result: MigrationFinished) -> None:
        """Record the result (kept ``result_ttl_s``) and announce it to the waiters, both at once: a waiter takes
        the event's result as it is (the disk is where it says), and one that missed the event reads the record.
        When another claim took the job over meanwhile (reaped while it ended), the announced result is still
        true; the new owner finds the disk in place and announces it again."""
        recorded, _ = await asyncio.gather(self._jobs.finish(record, result), self._announce(record, result))
        if not recorded:
            log.warning("migration_finished", outcome="lost", reason="the job was taken over before it ended")
            return
        metrics.JOBS_FINISHED.labels("succeeded").inc()
        log.info("migration_finished", outcome="succeeded", sr_to=result.sr_id, vdi=result.vdi_id,
                 attempt=record.attempt, duration_ms=int(result.duration_s * 1000))

    async def hand_back(self, record: JobRecord, *, reason: str, error: FailureReason, bounded: bool = True) -> None:
        """Publish the job again as attempt + 1, then mark the record queued (unless that message was claimed
        already). Past ``max_attempts`` the job fails instead with ``error``, unless not ``bounded``; a record
        without its request (written by an older version) fails too, as it cannot be published again."""
        if record.request is None:
            missing = FailureReason(code=messages.JOB_RECORD_INCOMPLETE, retryable=False,
                                    message="the job record holds no request to publish again; retry the attach")
            await self.failed(record, missing, reason="failed")
            return
        attempt = record.attempt + 1
        if bounded and attempt > self._max_attempts:
            await self.failed(record, error, reason="attempts_exhausted")
            return
        await self._publisher.request(record.request.with_attempt(attempt))
        queued = await self._jobs.requeue(record, attempt)
        metrics.JOBS_FINISHED.labels("requeued").inc()
        log.info("migration_finished", outcome="requeued", reason=reason, attempt=attempt,
                 error=error.message, recorded=queued is not None)

    async def give_back(self, record: JobRecord, *, reason: str) -> None:
        """Put a job this worker claimed but never started back in the queue, same attempt (it was no try): the
        record goes ``queued`` first, then the request is published again (published first, a delivery claimed
        before the record changed would be dropped as a duplicate of the running job). A crash between the two
        leaves a queued record no message carries, which the reaper publishes again (``queued_stale_after_s``)."""
        assert record.request is not None, "a claimed record always holds its request"
        if await self._jobs.requeue(record, record.attempt) is None:
            log.warning("migration_finished", outcome="lost", reason="the job was taken over before it was given back")
            return
        await self._publisher.request(record.request.with_attempt(record.attempt))
        metrics.JOBS_FINISHED.labels("given_back").inc()
        log.info("migration_finished", outcome="given_back", reason=reason, attempt=record.attempt)

    async def republish(self, record: JobRecord) -> None:
        """Publish a ``queued`` job's request again, same attempt (the reaper, for a record no message carries:
        its frontend crashed before publishing). A second delivery of a job that was only slow is dropped by the
        claim as a duplicate."""
        assert record.request is not None, "the reaper re-publishes only records that hold their request"
        await self._publisher.request(record.request.with_attempt(record.attempt))
        metrics.JOBS_FINISHED.labels("republished").inc()

    async def failed(self, record: JobRecord, error: FailureReason, *, reason: messages.DeadReason) -> None:
        """Dead-letter the request (``reason`` and the error in its headers), record the failure, announce it."""
        if record.request is not None:
            request = record.request.with_attempt(record.attempt)
            await self._publisher.dead_letter(request, reason=reason, error=error, worker=self._worker)
            metrics.JOBS_FINISHED.labels("dead_lettered").inc()
        age = max(utc_now() - record.created_at, timedelta(0))
        result = MigrationFinished(job_id=record.job_id, disk_name=record.disk_name, outcome="failed", error=error,
                                   duration_s=round(age.total_seconds(), 3))
        if not await self._jobs.finish(record, result):
            log.warning("migration_finished", outcome="lost", reason="the job was taken over before it failed")
            return
        await self._announce(record, result)
        metrics.JOBS_FINISHED.labels("failed").inc()
        log.error("migration_finished", outcome="failed", reason=reason, error=error.message,
                  error_type=error.code, attempt=record.attempt)

    async def _announce(self, record: JobRecord, result: MigrationFinished) -> None:
        correlation_id = record.request.correlation_id if record.request is not None else None
        try:
            await self._publisher.finished(result, correlation_id=correlation_id)
        except DomainError as exc:
            # The record holds the result and waiters re-read it on a backoff: the event is only the wake-up.
            log.warning("event_not_published", error=exc.message)
