"""The broker fixtures themselves, against the real RabbitMQ and Redis: quorum-queue redelivery counting,
publisher confirms, Redis with a key prefix, and broker restarts (local mode only)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from tests.support.brokers import RedisEndpoint
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

QUORUM_ARGS: dict[str, Any] = {"x-queue-type": "quorum", "x-delivery-limit": 5}
TIMEOUT_S = 10.0


async def _get(queue: AbstractQueue) -> AbstractIncomingMessage:
    """The next message (basic.get), waiting for it to become available."""

    async def poll() -> AbstractIncomingMessage | None:
        return await queue.get(no_ack=False, fail=False, timeout=TIMEOUT_S)

    message = await eventually(poll, TIMEOUT_S, description=f"a message on {queue.name}")
    assert message is not None
    return message


async def _publish_confirmed(url: str, queue_name: str, body: bytes) -> None:
    connection = await aio_pika.connect(url, timeout=TIMEOUT_S)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.declare_queue(queue_name, durable=True, arguments=QUORUM_ARGS)
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(message, routing_key=queue_name, mandatory=True, timeout=TIMEOUT_S)


async def test_quorum_queue_counts_redeliveries(amqp_vhost: str) -> None:
    await _publish_confirmed(amqp_vhost, "jobs", b"job-1")
    connection = await aio_pika.connect(amqp_vhost, timeout=TIMEOUT_S)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("jobs", durable=True, arguments=QUORUM_ARGS)

        first = await _get(queue)
        assert (first.body, first.redelivered) == (b"job-1", False)
        assert not (first.headers or {}).get("x-delivery-count")
        await first.reject(requeue=True)

        again = await _get(queue)
        assert (again.body, again.redelivered) == (b"job-1", True)
        assert again.headers["x-delivery-count"] == 1
        await again.ack()

        async def drained() -> bool:
            declared = await channel.declare_queue("jobs", durable=True, arguments=QUORUM_ARGS)
            return declared.declaration_result.message_count == 0

        await eventually(drained, TIMEOUT_S)


async def test_unroutable_mandatory_publish_raises(amqp_vhost: str) -> None:
    connection = await aio_pika.connect(amqp_vhost, timeout=TIMEOUT_S)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await channel.default_exchange.publish(
                aio_pika.Message(b"lost"), routing_key="no-such-queue", mandatory=True, timeout=TIMEOUT_S
            )


async def test_redis_set_get_with_prefix(redis_server: RedisEndpoint, redis_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        await client.set(f"{redis_prefix}lock", "owner-1", ex=30)
        assert await client.get(f"{redis_prefix}lock") == b"owner-1"
        assert 0 < await client.ttl(f"{redis_prefix}lock") <= 30
    finally:
        await client.aclose()


async def test_redis_restart_keeps_or_loses_data(
    redis_server: RedisEndpoint, redis_prefix: str, restart_redis: Callable[..., Awaitable[None]]
) -> None:
    key = f"{redis_prefix}k"

    def connect() -> aioredis.Redis:
        """A new client each time: a restart breaks the old connections."""
        return aioredis.Redis.from_url(redis_server.url, socket_timeout=5)

    async with connect() as client:
        await client.set(key, "v")
    await restart_redis(keep_data=True)
    async with connect() as client:
        assert await client.get(key) == b"v"
    await restart_redis(keep_data=False)
    async with connect() as client:
        assert await client.get(key) is None


async def test_broker_restart_keeps_durable_quorum_message(
    amqp_vhost: str, restart_rabbitmq: Callable[..., Awaitable[None]]
) -> None:
    await _publish_confirmed(amqp_vhost, "durable-jobs", b"survivor")

    await restart_rabbitmq()

    connection = await aio_pika.connect(amqp_vhost, timeout=TIMEOUT_S)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("durable-jobs", durable=True, arguments=QUORUM_ARGS)
        message = await _get(queue)
        assert message.body == b"survivor"
        await message.ack()
