"""RabbitMQ plumbing shared by the frontend and the migrator: the topology declared in one place
(``declare``), robust named connections, and the confirmed publisher. Names come from ``shared/messages.py``.

The only place aio-pika/aiormq exceptions are translated (to ``BackendUnavailable``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection, HeadersType

from shared import amqp_failover, messages
from shared.errors import BackendUnavailable

APP_ID = "xo-csi"


async def connect(urls: str | Sequence[str], *, name: str, timeout_s: float) -> AbstractRobustConnection:
    """A robust connection named ``name`` (shows in the management UI) to the first of ``urls`` (an AMQP_URL: one
    URL or several, comma-separated; or the list) that answers; later drops fail over along the list
    (shared/amqp_failover.py). BackendUnavailable when no address answers, each within ``timeout_s``."""
    addresses = amqp_failover.broker_addresses(urls) if isinstance(urls, str) else tuple(urls)
    try:
        async with asyncio.timeout(timeout_s * len(addresses)):
            return await amqp_failover.connect_failover(addresses, timeout_s=timeout_s,
                                                        client_properties={"connection_name": name})
    except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
        where = "RabbitMQ is" if len(addresses) == 1 else f"none of the {len(addresses)} RabbitMQ nodes is"
        raise BackendUnavailable(f"{where} reachable ({type(exc).__name__}); check AMQP_URL") from exc


async def declare(channel: AbstractChannel, *, delivery_limit: int = messages.DELIVERY_LIMIT) -> AbstractExchange:
    """Declare (idempotently) the jobs exchange and quorum queue with their dead-letter route, and the
    events exchange. Returns the jobs exchange."""
    dlx = await channel.declare_exchange(messages.DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(
        messages.DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dlx)
    jobs = await channel.declare_exchange(messages.JOBS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    arguments: dict[str, Any] = messages.jobs_queue_arguments(delivery_limit)
    queue = await channel.declare_queue(messages.JOBS_QUEUE, durable=True, arguments=arguments)
    await queue.bind(jobs, routing_key=messages.JOBS_ROUTING_KEY)
    await channel.declare_exchange(messages.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    return jobs


class Publisher:
    """Publishes with publisher confirms on a dedicated channel. Every publish is bounded by ``timeout_s``;
    a nack, a return (unroutable, when mandatory), a timeout or a closed connection raises BackendUnavailable."""

    def __init__(self, connection: AbstractRobustConnection, *, timeout_s: float, app_id: str = APP_ID) -> None:
        self._connection = connection
        self._timeout_s = timeout_s
        self._app_id = app_id
        self._channel: AbstractChannel | None = None
        self._opening = asyncio.Lock()  # in-process: only serialises opening this object's channel

    async def _open(self) -> AbstractChannel:
        async with self._opening:
            if self._channel is None or self._channel.is_closed:
                async with asyncio.timeout(self._timeout_s):
                    self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                    await declare(self._channel)
            return self._channel

    async def request(self, request: messages.MigrationRequested) -> None:
        """Publish a migration request to the jobs queue (persistent, mandatory, confirmed); the ``attempt``
        header repeats ``request.attempt``."""
        await self._publish(
            messages.JOBS_EXCHANGE, messages.JOBS_ROUTING_KEY, request.to_body(),
            message_id=request.job_id, correlation_id=request.correlation_id, headers=_request_headers(request),
            mandatory=True,
        )

    async def dead_letter(
        self, request: messages.MigrationRequested, *, reason: messages.DeadReason, error: messages.FailureReason,
        worker: str
    ) -> None:
        """Publish a failed job's request to the dead-letter exchange (so it lands in the dead-letter queue,
        where ``xocsi jobs requeue`` can send it back), with why in the ``x-xocsi-*`` headers. Mandatory and
        confirmed: BackendUnavailable when it is not safely there."""
        headers = _request_headers(request)
        headers.update({
            messages.HEADER_REASON: reason,
            messages.HEADER_ERROR_CODE: error.code,
            messages.HEADER_ERROR: error.message[:1000],
            messages.HEADER_WORKER: worker,
        })
        await self._publish(
            messages.DEAD_LETTER_EXCHANGE, messages.JOBS_ROUTING_KEY, request.to_body(),
            message_id=request.job_id, correlation_id=request.correlation_id, headers=headers, mandatory=True,
        )

    async def finished(self, event: messages.MigrationFinished, *, correlation_id: str | None = None) -> None:
        """Publish a migration outcome to the events exchange (routing key = disk name).

        Not mandatory: no waiter may be listening, and that is fine (the Redis job record holds the result;
        events are only the wake-up). Still confirmed and bounded."""
        await self._publish(
            messages.EVENTS_EXCHANGE, messages.events_routing_key(event.disk_name), event.to_body(),
            message_id=event.job_id, correlation_id=correlation_id,
            headers={messages.HEADER_DISK_NAME: event.disk_name}, mandatory=False,
        )

    async def _publish(
        self, exchange_name: str, routing_key: str, body: bytes, *, message_id: str, correlation_id: str | None,
        headers: HeadersType, mandatory: bool,
    ) -> None:
        message = aio_pika.Message(
            body, content_type=messages.CONTENT_TYPE, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id, correlation_id=correlation_id, app_id=self._app_id, headers=headers,
        )
        try:
            channel = await self._open()
            exchange = await channel.get_exchange(exchange_name, ensure=False)
            confirmation = await exchange.publish(
                message, routing_key=routing_key, mandatory=mandatory, timeout=self._timeout_s
            )
        except (TimeoutError, OSError, aio_pika.exceptions.DeliveryError, aiormq.exceptions.AMQPError,
                RuntimeError) as exc:
            raise BackendUnavailable(
                f"RabbitMQ did not confirm the message {message_id} to {exchange_name} "
                f"({type(exc).__name__}); retry later"
            ) from exc
        if isinstance(confirmation, aiormq.spec.Basic.Nack):
            raise BackendUnavailable(f"RabbitMQ refused (nack) message {message_id} to {exchange_name}; retry later")

    @property
    def is_connected(self) -> bool:
        """Whether the (robust) connection is up now (readiness); the channel reopens on the next publish."""
        return self._connection.connected.is_set() and not self._connection.is_closed

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await asyncio.shield(self._channel.close())


def _request_headers(request: messages.MigrationRequested) -> dict[str, Any]:
    return {
        messages.HEADER_DISK_NAME: request.disk_name,
        messages.HEADER_TARGET_HOST: request.host_id,
        messages.HEADER_ATTEMPT: request.attempt,
    }
