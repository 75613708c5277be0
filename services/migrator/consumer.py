"""The migrator's consume loop: claim each delivery in Redis, ack it at once, run the job in a task this worker
owns; ``stop(grace)`` for SIGTERM, ``drain()`` for tests. Outcomes live in outcome.py, the reaper in reaper.py.

Why ack-on-claim: a migration can outlast RabbitMQ's consumer_timeout (30 min by default), after which the
broker closes the channel and requeues every unacked delivery, and aiormq cancels the consumer callbacks of a
closed channel. So a message only carries a job to a worker; from the claim on, the Redis job record is the
truth (states and crash points: docs/migrations.md).

1. Unreadable body -> reject without requeue (the broker dead-letters it); the worker keeps running.
2. Take a slot (``concurrency`` + ``prepare_ahead``). Prefetch is 1 and taking the last slot pauses the consumer
   (basic.cancel) *before* the ack, so no delivery ever waits unacked for a slot (it would hit consumer_timeout).
   A slot goes back as soon as XO has finished the job's copy (``progress.copied``), while the job still waits
   for XO's cache to show the result and records it. The consumer's priority (``x-priority``) says whether a
   copy slot is free: RabbitMQ delivers to a worker whose copy slots are all taken (a job prepared ahead, which
   waits for this worker's next free copy slot: slots.py) only while no worker with a free one can take it.
3. Claim (shared/jobs.py, one Lua script): queued, stale, lower attempt or absent -> running under a new
   claim token; duplicate / finished / superseded (also a late copy of a request no newer than the disk's last
   finished job) -> ack and drop. Redis down -> backoff, nack(requeue):
   the quorum queue's delivery limit and dead-letter exchange are the safety net for that.
4. Ack (shielded). Then ``handle()`` runs in a task of ours while a heartbeat refreshes the record every
   ``job_heartbeat_s``; a heartbeat finding the job gone (reaped, taken over) cancels the handler, and so does a
   silence long enough that a reaper may have taken the job (no heartbeat through for ``stale_after_s`` minus one
   heartbeat: Redis unreachable from this worker, which cannot learn that the job is someone else's now).
5. Success -> record + event. Retryable error -> capped jittered backoff, hand back (publish attempt + 1,
   record -> queued). Permanent error or ``max_attempts`` reached -> dead-letter + failed record + event; but a
   move or clone stopped after its target took the disk's name (transfer.TransferUnfinished) is handed back
   whatever its attempt: failed, it would leave a volume no attach can use.

Job states (the Redis record; who moves them and every crash point: docs/migrations.md)::

    (none) --gate--> queued --claim--> running --success--> succeeded
                       ^                 |  |--permanent error / last attempt--> failed (+ dead letter)
                       +---hand back-----+  +--reaper / higher attempt: new claim, stays running
                      (retry, SIGTERM, reaper; attempt + 1 published first)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from services.migrator.dispatch import handle
from services.migrator.migrate import HandlerDeps
from services.migrator.outcome import Outcomes, failure_of
from services.migrator.reaper import Reaper
from services.migrator.settings import MigratorSettings
from services.migrator.slots import NotStarted
from services.migrator.transfer import TransferUnfinished
from shared import broker, locks, messages, metrics, progress
from shared.backoff import Backoff
from shared.errors import BackendUnavailable, DomainError
from shared.jobs import Claim, JobRecord, JobStore
from shared.logging import get_logger
from shared.messages import FailureReason, JobRequest

log = get_logger(__name__)

T = TypeVar("T")
TICK_S = 1.0  # the consume loop wakes at least this often (liveness)
HAND_BACK_TIMEOUT_S = 15.0  # stop(): bound on handing back the jobs still running after the grace period
RESUME_BACKOFF = Backoff(start_s=0.1, cap_s=5.0)  # between tries to (re)subscribe the jobs queue
RETRY_BACKOFF_START_S = 0.5  # before a retryable failure's hand-back (or a failed claim's requeue)
LOOP_STOP_RETRY_S = 1.0  # stop(): how long a cancelled loop gets before it is cancelled again
DRAIN_POLL = Backoff(start_s=0.01, cap_s=0.2, jitter=False)  # drain(): re-reading the queue depth
_AMQP_ERRORS = (TimeoutError, OSError, RuntimeError, aiormq.exceptions.AMQPError)
FREE_PRIORITY, PREPARE_PRIORITY = 10, 0  # x-priority of the consumer: a copy slot free / only jobs to prepare ahead


class JobLost(Exception):
    """The heartbeat found the record owned by another claim (reaped, or taken over by a newer attempt), or no
    heartbeat reached Redis for so long that a reaper may have taken the job over unseen."""


class Interrupted(Exception):
    """stop() cancelled the handler after the grace period: hand the job back."""


@dataclass
class ConsumerStats:
    """Counters for tests and logs (not a metrics API)."""

    delivered: int = 0
    claimed: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # by claim outcome: duplicate, finished, superseded
    channel_closed: int = 0  # closed under us (e.g. consumer_timeout), not by stop()


@dataclass
class _Job:
    record: JobRecord
    beat_at: float  # loop time the claim, or the last heartbeat that got through, was sent (Redis wrote it later)
    work: asyncio.Task[Any] | None = None  # what _owned() runs now: the handler, or a backoff
    stream: progress.ProgressBox = field(default_factory=progress.ProgressBox)  # how far the handler streamed
    slot_freed: bool = False  # its slot went back once XO finished its copy (the steps after need none)

    def interrupt(self) -> None:
        """stop(): cancel the handler (or backoff) so the job is handed back; an outcome step in progress ends."""
        if self.work is not None:
            self.work.cancel()


class Consumer:
    """Consumes ``xocsi.migrations``, at most ``concurrency`` jobs at once, and runs the reaper."""

    def __init__(
        self, connection: AbstractRobustConnection, publisher: broker.Publisher, jobs: JobStore,
        deps: HandlerDeps, settings: MigratorSettings,
    ) -> None:
        self._connection = connection
        self._jobs = jobs
        self._deps = deps
        self._settings = settings
        self._outcomes = Outcomes(publisher, jobs, worker=settings.worker_name, max_attempts=settings.max_attempts)
        self._reaper = Reaper(jobs, self._outcomes, settings)
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._priority: int | None = None  # the x-priority of the consumer ``_tag`` (None: not consuming)
        self._intake = asyncio.Lock()  # serialises consume/cancel of this object's consumer only
        self._capacity = settings.concurrency + settings.prepare_ahead
        self._free = self._capacity
        self._changed = asyncio.Event()
        self._stopping = False
        self._callbacks: set[asyncio.Task[Any]] = set()
        self._running: dict[asyncio.Task[None], _Job] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_tick_s = time.monotonic()
        self.stats = ConsumerStats()

    async def start(self) -> None:
        """Open the channel, declare the topology, start consuming and the reaper."""
        self._channel = await self._connection.channel()
        self._channel.close_callbacks.add(self._on_channel_closed)
        await self._channel.set_qos(prefetch_count=1)  # concurrency is enforced by slots, see the docstring
        await broker.declare(self._channel, delivery_limit=self._settings.delivery_limit)
        # The queue object broker.declare registered on this robust channel: a consumer started on it is
        # restored (same tag) when the channel reopens, e.g. after the broker closed it.
        self._queue = await self._channel.declare_queue(messages.JOBS_QUEUE, passive=True)
        await self._reconcile()
        self._loops = [asyncio.create_task(self._consume_loop(), name="migrator-consume-loop"),
                       asyncio.create_task(self._reaper.run(), name="migrator-reaper")]
        log.info("consumer_started", queue=messages.JOBS_QUEUE, concurrency=self._settings.concurrency,
                 prepare_ahead=self._settings.prepare_ahead,
                 stale_after_s=self._settings.stale_after_s, max_attempts=self._settings.max_attempts,
                 per_sr_limit=self._settings.per_sr_limit)

    def loop_age_s(self) -> float:
        """Seconds since the consume loop last ran (liveness)."""
        return time.monotonic() - self.last_tick_s

    @property
    def channel(self) -> AbstractChannel | None:
        """The consuming channel (robust: reopened, with its consumer, after the broker closes it)."""
        return self._channel

    async def drain(self, timeout_s: float) -> None:
        """Return once the jobs queue is empty and nothing is in flight (tests await completion with it)."""
        assert self._channel is not None, "start() first"
        async with asyncio.timeout(timeout_s):
            polls = DRAIN_POLL.delays()
            while True:
                await self._idle.wait()
                # On the underlying channel: the robust channel answers a passive declare from its cache.
                underlay = await self._channel.get_underlay_channel()
                declared = await underlay.queue_declare(messages.JOBS_QUEUE, passive=True)
                if declared.message_count == 0 and self._idle.is_set():
                    return
                # Messages are ready but not yet delivered to us: wait for a delivery (capped backoff).
                await asyncio.sleep(next(polls))

    async def stop(self, grace_s: float) -> None:
        """Stop consuming and reaping, let running jobs finish within ``grace_s``, hand the others back to the
        queue (their XO copies go on; the next owner waits for them), then close the channel."""
        self._stopping = True
        if self._deps.copies is not None:
            self._deps.copies.close()  # a job prepared ahead goes back now, with its attempt: it never started
        await self._stop_loops()
        with contextlib.suppress(BackendUnavailable):
            await self._reconcile()
        if self._callbacks:  # deliveries being claimed now: let them start their job (or give it back)
            await asyncio.wait(set(self._callbacks), timeout=self._settings.probe_timeout_s)
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=grace_s)
            if pending:
                log.warning("migrations_handed_back_at_shutdown", count=len(pending))
                for task in pending:
                    self._running[task].interrupt()
                _, stuck = await asyncio.wait(pending, timeout=HAND_BACK_TIMEOUT_S)
                for task in stuck:  # RabbitMQ or Redis down: the reaper of another worker hands them back
                    task.cancel()
                if stuck:
                    await asyncio.wait(stuck, timeout=5)
        await locks.released(self._settings.probe_timeout_s)  # disk locks the last jobs left going back
        await self._close_channel()

    async def abort(self) -> None:
        """Stop as a crash would: cancel everything without handing jobs back and close the channel. Running
        records keep their claim and go stale, for another worker's reaper. Used by tests."""
        self._stopping = True
        await self._stop_loops()
        tasks = [*self._running, *self._callbacks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._close_channel()

    # -- intake: consume while a slot is free ------------------------------------------------------

    async def _consume_loop(self) -> None:
        delays = RESUME_BACKOFF.delays()
        while True:
            self.last_tick_s = time.monotonic()
            self._changed.clear()  # before: a slot that goes back while this reconciles wakes the loop at once
            try:
                await self._reconcile()
                delays = RESUME_BACKOFF.delays()
            except BackendUnavailable as exc:
                delay_s = next(delays)
                log.warning("consumer_resume_failed", error=exc.message, retry_in_s=round(delay_s, 3))
                await asyncio.sleep(delay_s)  # capped jittered backoff
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._changed.wait()

    def _wanted(self) -> int | None:
        """The consumer's priority now: FREE_PRIORITY while a copy slot is free, PREPARE_PRIORITY while only a
        job to prepare ahead fits, None (no consumer) when full or stopping."""
        if self._free <= 0 or self._stopping:
            return None
        taken = self._capacity - self._free
        return FREE_PRIORITY if taken < self._settings.concurrency else PREPARE_PRIORITY

    async def _reconcile(self) -> None:
        """Consume at the priority ``_wanted()`` says (cancel and consume again when it changed), or cancel."""
        assert self._queue is not None
        async with self._intake:
            want = self._wanted()
            try:
                async with asyncio.timeout(self._settings.probe_timeout_s):
                    if self._tag is not None and self._priority != want:
                        tag, self._tag, self._priority = self._tag, None, None  # forgotten first: see below
                        await self._queue.cancel(tag)  # a dead channel has no consumer left to cancel
                    if want is not None and self._tag is None:
                        self._tag = await self._queue.consume(self._on_message, arguments={"x-priority": want})
                        self._priority = want
            except _AMQP_ERRORS as exc:
                raise BackendUnavailable(f"cannot (un)subscribe the jobs queue ({type(exc).__name__})") from exc

    def _release_slot(self) -> None:
        self._free += 1
        self._changed.set()

    def _free_slot(self, job: _Job) -> None:
        """``job``'s slot goes back (once): XO's copy is over, or the job ended."""
        if not job.slot_freed:
            job.slot_freed = True
            self._release_slot()

    # -- delivery: parse, slot, claim, ack ---------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._callbacks.add(task)
        self._idle.clear()
        self.stats.delivered += 1
        structlog.contextvars.bind_contextvars(message_id=message.message_id, redelivered=message.redelivered,
                                              delivery_count=_delivery_count(message))
        try:
            await self._receive(message)
        finally:
            self._callbacks.discard(task)
            self._update_idle()

    async def _receive(self, message: AbstractIncomingMessage) -> None:
        try:
            request = messages.parse_requested(message.body)
        except messages.MessageError as exc:
            log.error("message_rejected", reason=str(exc), outcome="dead_lettered")
            await _settle(message.reject(requeue=False))
            return
        structlog.contextvars.bind_contextvars(disk_name=request.disk_name, job_id=request.job_id,
                                              correlation_id=request.correlation_id, attempt=request.attempt)
        if self._free == 0 or self._stopping:
            # Only when a reconnect restored the consumer while we were full, or during stop(): give it back.
            await _settle(message.nack(requeue=True))
            return
        self._free -= 1
        spawned = False
        # The last slot pauses the consumer (basic.cancel), the last copy slot lowers its priority, while Redis
        # claims the job: the round trips at once, the change done before the ack (with prefetch 1 nothing else is
        # delivered to the consumer that delivered this until then). Full, it always reconciles before the ack,
        # even when the consumer looks paused already: this may have come through a consumer another reconcile is
        # subscribing right now, and acked before that one is cancelled, it would take a delivery we must nack.
        want = self._wanted()
        pausing = asyncio.create_task(self._pause()) if want is None or want != self._priority else None
        try:
            claimed_at = asyncio.get_running_loop().time()
            claim = await self._claim(request, message)
            if claim is not None:  # the job starts now, the consumer's change goes on meanwhile
                spawned = self._accept(claim, claimed_at)  # before the ack: a cancelled ack must not strand a job
            if pausing is not None:
                await asyncio.shield(pausing)  # cancelled meanwhile (the channel closed): the change still completes
            if claim is not None:
                await _settle(message.ack())
        finally:
            try:
                if pausing is not None and not pausing.done():
                    await asyncio.wait({pausing})  # never raises what ended the change: the slot goes back below
            finally:
                if not spawned:
                    self._release_slot()

    async def _pause(self) -> None:
        with contextlib.suppress(BackendUnavailable):  # channel gone: nothing is delivered anyway
            await self._reconcile()

    async def _claim(self, request: JobRequest, message: AbstractIncomingMessage) -> Claim | None:
        try:
            return await self._jobs.claim(request, self._settings.worker_name,
                                          stale_after_s=self._settings.stale_after_s)
        except DomainError as exc:
            delay_s = self._backoff_s(_delivery_count(message) + 1)
            log.warning("claim_failed", error=exc.message, delay_s=round(delay_s, 3), outcome="requeued")
            await asyncio.sleep(delay_s)  # capped jittered backoff before the requeue, not synchronisation
            await _settle(message.nack(requeue=True))
            return None

    def _accept(self, claim: Claim, claimed_at: float) -> bool:
        if claim.outcome != "claimed":
            self.stats.dropped[claim.outcome] = self.stats.dropped.get(claim.outcome, 0) + 1
            log.info("message_dropped", reason=claim.outcome, state=claim.record.state,
                     holder=claim.record.worker, holder_job_id=claim.record.job_id)
            return False
        self.stats.claimed += 1
        job = _Job(claim.record, beat_at=claimed_at)
        # Our own task, not aio-pika's callback task: closing the channel must not cancel a migration.
        task = asyncio.create_task(self._run(job), name=f"migration:{claim.record.disk_name}")
        self._running[task] = job
        task.add_done_callback(self._job_done)
        metrics.JOBS_STARTED.inc()
        metrics.JOBS_RUNNING.inc()
        log.info("job_claimed", worker=self._settings.worker_name, attempt=claim.record.attempt)
        return True

    def _job_done(self, task: asyncio.Task[None]) -> None:
        job = self._running.pop(task, None)
        if job is not None:
            metrics.JOBS_RUNNING.dec()
        if job is None or not job.slot_freed:
            self._release_slot()
        self._update_idle()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("migration_task_failed", error=repr(exc), exc_info=exc)  # a bug: the reaper recovers the job

    def _update_idle(self) -> None:
        if not self._running and not self._callbacks:
            self._idle.set()

    # -- one job: handle while heartbeating, then its outcome ----------------------------------------

    async def _run(self, job: _Job) -> None:
        try:
            await self._attempt(job)
        except JobLost as exc:
            log.warning("migration_finished", outcome="lost", reason=str(exc))
        except DomainError as exc:
            # An outcome step failed (RabbitMQ or Redis down): the record keeps our claim, goes stale, and the
            # reaper completes the job's way out.
            log.warning("outcome_deferred_to_reaper", error=exc.message)

    async def _attempt(self, job: _Job) -> None:
        request = job.record.request
        assert request is not None, "a claimed record always holds its request"
        job.stream.on_copied = lambda: self._free_slot(job)
        try:
            with progress.collecting(job.stream):  # the handler's task inherits it: see shared/progress.py
                result = await self._owned(job, handle(request, self._deps))
        except Interrupted:
            await self._outcomes.hand_back(job.record, reason="shutdown", error=FailureReason(
                code=messages.WORKER_STOPPED, retryable=True, message=f"worker {self._settings.worker_name} stopped"))
            return
        except NotStarted as exc:  # prepared ahead, and this worker's copies outlasted its wait: no attempt spent
            await self._outcomes.give_back(job.record, reason=exc.message)
            return
        except JobLost:
            raise
        except DomainError as exc:
            await self._after_failure(job, exc)
            return
        except Exception as exc:  # a bug or an untranslated error: retried (bounded), then dead-lettered
            log.exception("migration_crashed")
            await self._after_failure(job, BackendUnavailable(f"worker error: {exc!r}"))
            return
        # The migration is done (its slot went back earlier when XO's copy ended: progress.copied): the next job's
        # subscribe and claim overlap with recording and announcing the outcome (Redis, RabbitMQ: no XO work).
        self._free_slot(job)
        await self._outcomes.succeeded(job.record, result)

    async def _after_failure(self, job: _Job, exc: DomainError) -> None:
        error = failure_of(exc)
        if not exc.retryable:
            await self._outcomes.failed(job.record, error, reason="failed")
            return
        # A transfer whose target took the disk's name is the volume's only way back to a usable disk: not given up.
        bounded = not isinstance(exc, TransferUnfinished)
        if bounded and job.record.attempt >= self._settings.max_attempts:
            await self._outcomes.failed(job.record, error, reason="attempts_exhausted")
            return
        delay_s = self._backoff_s(job.record.attempt)
        log.warning("migration_retry", error=exc.message, error_type=type(exc).__name__,
                    delay_s=round(delay_s, 3))
        with contextlib.suppress(Interrupted):  # stop() during the backoff: hand it back at once
            await self._owned(job, asyncio.sleep(delay_s))  # capped jittered backoff; still heartbeating
        await self._outcomes.hand_back(job.record, reason="retry", error=error, bounded=bounded)

    async def _owned(self, job: _Job, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` while heartbeating the job record; JobLost (and ``coro`` cancelled) once the record
        belongs to another claim or may do so unseen (``_beat``), Interrupted when stop() cancelled it."""
        work = asyncio.create_task(coro)
        job.work = work
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=self._settings.job_heartbeat_s)
                if done:
                    if work.cancelled():
                        raise Interrupted()
                    return work.result()
                await self._beat(job)
        finally:
            job.work = None
            if not work.done():
                work.cancel()
                await asyncio.wait({work})  # waits for the handler's cleanup (lock release) without swallowing ours

    async def _beat(self, job: _Job) -> None:
        """Refresh the record; JobLost when another claim owns it, or when no heartbeat has got through for
        ``stale_after_s`` minus one heartbeat interval. A reaper takes the job over once Redis's copy of the heartbeat
        is ``stale_after_s`` old, and this worker, cut off from Redis, would never see it; its next look comes one
        interval later, maybe too late, so it gives the job up now. The handler is cancelled (XO's copy goes on, the
        next owner waits for it) and the record, still ours, is handed on by a reaper once Redis answers."""
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        try:
            owned = await self._jobs.beat(job.record, job.stream.latest)
        except DomainError as exc:
            silent_s = loop.time() - job.beat_at
            if silent_s >= self._settings.stale_after_s - self._settings.job_heartbeat_s:
                raise JobLost(f"no heartbeat reached Redis for {silent_s:.1f} s: a reaper may have handed the job "
                              f"to another worker ({exc.message})") from exc
            log.warning("job_heartbeat_failed", error=exc.message, silent_s=round(silent_s, 3))
            return
        if not owned:
            raise JobLost("another worker owns the job now")
        job.beat_at = sent_at

    def _backoff_s(self, attempt: int) -> float:
        """Before retry ``attempt`` (1 = the first): 0.5 s doubling, capped at ``retry_backoff_max_s``, jittered."""
        return Backoff(RETRY_BACKOFF_START_S, self._settings.retry_backoff_max_s).delay_s(attempt - 1)

    # -- shutdown ----------------------------------------------------------------------------------

    async def _stop_loops(self) -> None:
        """Cancel the consume loop and the reaper, again while they run: on Python 3.11 a cancellation that lands in
        redis-py's ``asyncio.wait_for`` can be swallowed (python/cpython#86296, see shared/locks.py), and the
        reaper would sleep on to its next sweep forever."""
        pending = set(self._loops)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=LOOP_STOP_RETRY_S)
        self._loops = []

    async def _close_channel(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*_AMQP_ERRORS):
                await asyncio.shield(self._channel.close())

    def _on_channel_closed(self, _channel: object, exc: BaseException | None) -> None:
        if self._stopping:
            return
        self.stats.channel_closed += 1
        log.warning("consumer_channel_closed", reason=str(exc) if exc else "closed")


async def _settle(step: Coroutine[Any, Any, object]) -> None:
    """Ack, nack or reject, shielded from cancellation; a closed channel only means the broker requeued the
    delivery already (a redelivery finds the claim and is dropped as a duplicate)."""
    try:
        await asyncio.shield(step)
    except _AMQP_ERRORS as exc:
        log.warning("settle_failed", error=type(exc).__name__)


def _delivery_count(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(messages.HEADER_DELIVERY_COUNT, 0)
    return value if isinstance(value, int) else 0
