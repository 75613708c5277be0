"""MigrationEvents: the frontend's one consumer of migration-finished events, and the waiters it wakes.

One channel, opened once (under a lock, so concurrent first publishes share it), and one exclusive auto-delete
queue bound to the events exchange with ``#`` (every disk: events are few, one per job), consumed once; each
waiting ControllerPublishVolume registers a local waiter for its disk name. A publish costs no broker round trip
here. The channel, queue, binding and consumer are robust: aio-pika restores them after a reconnect; an event
missed meanwhile is only a late wake-up, as the gate re-reads the job record in Redis on a backoff too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from shared import broker, messages
from shared.errors import BackendUnavailable
from shared.logging import get_logger
from shared.messages import MigrationFinished

log = get_logger(__name__)

EVERY_DISK = "#"  # topic binding of the frontend's queue: events are routed by disk name


class MigrationEvents:
    """``async with events.waiting(disk_name) as queue``: every MigrationFinished of that disk lands in ``queue``
    from the moment the block is entered. BackendUnavailable when the consumer cannot be set up within
    ``setup_timeout_s`` (the next call tries again)."""

    def __init__(self, connection: AbstractRobustConnection, *, setup_timeout_s: float = 10.0) -> None:
        self._connection = connection
        self._setup_timeout_s = setup_timeout_s
        self._channel: AbstractRobustChannel | None = None
        self._opening = asyncio.Lock()  # in-process: only serialises opening this object's one channel
        self._waiters: dict[str, set[asyncio.Queue[MigrationFinished]]] = {}

    @contextlib.asynccontextmanager
    async def waiting(self, disk_name: str) -> AsyncIterator[asyncio.Queue[MigrationFinished]]:
        await self._consuming()
        queue: asyncio.Queue[MigrationFinished] = asyncio.Queue()
        waiters = self._waiters.setdefault(disk_name, set())
        waiters.add(queue)
        try:
            yield queue
        finally:
            waiters.discard(queue)
            if not waiters:
                self._waiters.pop(disk_name, None)

    async def prepare(self) -> None:
        """Set the consumer up now (at start); logs and returns when RabbitMQ cannot be used yet (``waiting`` tries
        again)."""
        try:
            await self._consuming()
        except BackendUnavailable as exc:
            log.warning("migration_events_not_consumed", error=exc.message, note="the first migrating attach retries")

    async def _consuming(self) -> None:
        if self._channel is not None:
            return
        async with self._opening:
            if self._channel is not None:
                return
            try:
                async with asyncio.timeout(self._setup_timeout_s):
                    channel = await self._connection.channel()
                    try:
                        await broker.declare(channel)
                        exchange = await channel.get_exchange(messages.EVENTS_EXCHANGE, ensure=False)
                        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
                        await queue.bind(exchange, routing_key=EVERY_DISK)
                        await queue.consume(self._on_event, no_ack=True)
                    except BaseException:
                        await asyncio.shield(_close_quietly(channel))
                        raise
            except (TimeoutError, OSError, RuntimeError, aiormq.exceptions.AMQPError) as exc:
                raise BackendUnavailable(f"cannot subscribe to migration events ({type(exc).__name__}); "
                                         "retry later") from exc
            self._channel = channel
            log.info("migration_events_consumed", queue=queue.name)

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        try:
            event = messages.parse_finished(message.body)
        except messages.MessageError as exc:
            log.warning("migration_event_unreadable", reason=str(exc))
            return
        for queue in self._waiters.get(event.disk_name, ()):
            queue.put_nowait(event)

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await asyncio.shield(_close_quietly(channel))


async def _close_quietly(channel: AbstractRobustChannel) -> None:
    if not channel.is_closed:
        with contextlib.suppress(TimeoutError, RuntimeError, aiormq.exceptions.AMQPError):
            await channel.close()
