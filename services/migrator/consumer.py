"""The migrator's consume loop and its ack policy; ``drain()`` for tests, ``stop(grace)`` for SIGTERM.

Policy (stated once, here): success -> record + event, *then* ack. Retryable domain error -> jittered
capped backoff, then requeue while ``x-delivery-count`` is below the delivery limit. Permanent error (or the
last allowed delivery) -> failed record + event, then reject without requeue -> dead-letter queue.
Unreadable message -> reject without requeue (dead-lettered), the worker keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from services.migrator.migrate import HandlerDeps, handle, heartbeat_every
from services.migrator.settings import MigratorSettings
from shared import broker, messages
from shared.errors import BackendUnavailable, DomainError
from shared.jobs import JobRecord, JobStore
from shared.logging import get_logger
from shared.messages import FailureReason, MigrationFinished, MigrationRequested

log = get_logger(__name__)


class Consumer:
    """Consumes ``xocsi.migrations`` with prefetch = concurrency and runs ``handle`` per message."""

    def __init__(
        self, connection: AbstractRobustConnection, publisher: broker.Publisher, jobs: JobStore,
        deps: HandlerDeps, settings: MigratorSettings,
    ) -> None:
        self._connection = connection
        self._publisher = publisher
        self._jobs = jobs
        self._deps = deps
        self._settings = settings
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._in_flight: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        """Open the channel, declare the topology, set QoS and start consuming."""
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self._settings.concurrency)
        await broker.declare(self._channel, delivery_limit=self._settings.delivery_limit)
        self._queue = await self._channel.get_queue(messages.JOBS_QUEUE, ensure=False)
        self._tag = await self._queue.consume(self._on_message)
        log.info("consumer_started", queue=messages.JOBS_QUEUE, concurrency=self._settings.concurrency)

    async def drain(self, timeout_s: float) -> None:
        """Return once the jobs queue is empty and no message is in flight (tests await completion with it)."""
        assert self._channel is not None, "start() first"
        async with asyncio.timeout(timeout_s):
            interval_s = 0.01
            while True:
                await self._idle.wait()
                declared = await self._channel.declare_queue(messages.JOBS_QUEUE, passive=True)
                if declared.declaration_result.message_count == 0 and self._idle.is_set():
                    return
                # Messages are ready but not yet delivered to us: wait for a delivery (capped backoff).
                await asyncio.sleep(interval_s)
                interval_s = min(interval_s * 2, 0.2)

    async def stop(self, grace_s: float) -> None:
        """Stop consuming, let in-flight messages finish within ``grace_s``, then cancel the rest (their
        unacked messages are requeued by the broker when the channel closes)."""
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(TimeoutError, RuntimeError, aiormq.exceptions.AMQPError):  # channel gone
                await asyncio.wait_for(self._queue.cancel(self._tag), timeout=5)
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("migrations_cancelled_at_shutdown", count=len(pending))
                await asyncio.wait(pending, timeout=5)
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        try:
            await self._process(message)
        finally:
            self._in_flight.discard(task)
            if not self._in_flight:
                self._idle.set()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.bind_contextvars(message_id=message.message_id, redelivered=message.redelivered,
                                              delivery_count=_delivery_count(message))
        try:
            request = messages.parse_requested(message.body)
        except messages.MessageError as exc:
            log.error("message_rejected", reason=str(exc), outcome="dead_lettered")
            await asyncio.shield(message.reject(requeue=False))
            return
        structlog.contextvars.bind_contextvars(disk_name=request.disk_name, correlation_id=request.correlation_id,
                                              job_id=request.job_id)
        try:
            await self._run(request, message)
        finally:
            structlog.contextvars.unbind_contextvars("message_id", "redelivered", "delivery_count", "disk_name",
                                                     "correlation_id", "job_id")

    async def _run(self, request: MigrationRequested, message: AbstractIncomingMessage) -> None:
        started = time.monotonic()
        record = await self._job_of(request)
        try:
            result = await self._handle_with_heartbeat(request, record)
        except DomainError as exc:
            await self._failed(request, message, record, exc, started)
            return
        except Exception as exc:  # a bug or an untranslated error: retried (bounded), then dead-lettered
            log.exception("migration_crashed")
            await self._failed(request, message, record, BackendUnavailable(f"worker error: {exc!r}"), started)
            return
        try:
            await self._publish_outcome(record, result)
        except BackendUnavailable:
            # Not acked: the redelivery finds the disk in place (XO is the fence) and announces it again.
            log.warning("outcome_not_published", outcome="requeued")
            await asyncio.shield(message.nack(requeue=True))
            return
        await asyncio.shield(message.ack())
        log.info("migration_finished", outcome="succeeded", sr_to=result.sr_id, vdi=result.vdi_id,
                 duration_ms=int((time.monotonic() - started) * 1000))

    async def _handle_with_heartbeat(self, request: MigrationRequested, record: JobRecord | None) -> MigrationFinished:
        if record is None:
            return await handle(request, self._deps)
        worker = self._settings.worker_name

        async def beat() -> None:
            await self._jobs.running(record, worker)

        # Not a TaskGroup: it would wrap the handler's domain error in an ExceptionGroup. The task is kept
        # and awaited here, so it never outlives the message.
        heartbeat = asyncio.create_task(heartbeat_every(self._settings.job_heartbeat_s, beat))
        try:
            return await handle(request, self._deps, on_progress=beat)
        finally:
            heartbeat.cancel()
            await asyncio.wait([heartbeat])  # waits for the cancellation without swallowing ours

    async def _failed(self, request: MigrationRequested, message: AbstractIncomingMessage,
                      record: JobRecord | None, exc: DomainError, started: float) -> None:
        count = _delivery_count(message)
        if exc.retryable and count < self._settings.delivery_limit:
            delay_s = min(self._settings.retry_backoff_max_s, 0.5 * 2**count) * random.uniform(0.5, 1.0)
            log.warning("migration_retry", error=exc.message, error_type=type(exc).__name__, delay_s=delay_s,
                        outcome="requeued")
            await asyncio.sleep(delay_s)  # capped jittered backoff before the requeue, not synchronisation
            await asyncio.shield(message.nack(requeue=True))
            return
        result = MigrationFinished(
            job_id=request.job_id, disk_name=request.disk_name, outcome="failed",
            error=FailureReason(code=type(exc).__name__, message=exc.message, retryable=exc.retryable),
            duration_s=round(time.monotonic() - started, 3),
        )
        try:
            await self._publish_outcome(record, result)
        except BackendUnavailable:
            log.warning("outcome_not_published", outcome="dead_lettered")
        log.error("migration_finished", outcome="failed", error=exc.message, error_type=type(exc).__name__)
        await asyncio.shield(message.reject(requeue=False))

    async def _publish_outcome(self, record: JobRecord | None, result: MigrationFinished) -> None:
        if record is not None:
            await self._jobs.finish(record, result)
        await self._publisher.finished(result)

    async def _job_of(self, request: MigrationRequested) -> JobRecord | None:
        """The Redis record of this request's job (None when expired or replaced by a newer job)."""
        try:
            record = await self._jobs.get(request.disk_name)
        except DomainError as exc:
            log.warning("job_record_unreadable", error=exc.message)
            return None
        return record if record is not None and record.job_id == request.job_id else None


def _delivery_count(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(messages.HEADER_DELIVERY_COUNT, 0)
    return value if isinstance(value, int) else 0
