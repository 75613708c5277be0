"""Opening the messaging backends both services use: a Redis client (socket timeouts always set) and a
robust RabbitMQ connection with a confirming publisher, all closed by the caller's exit stack."""

from __future__ import annotations

from contextlib import AsyncExitStack

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection

from shared import broker
from shared.config import RabbitSettings, RedisSettings


async def open_messaging(stack: AsyncExitStack, rabbit: RabbitSettings, redis_settings: RedisSettings, *,
                         name: str) -> tuple[aioredis.Redis, AbstractRobustConnection, broker.Publisher]:
    """(redis client, RabbitMQ connection named ``name``, publisher); each is closed when ``stack`` closes."""
    redis = redis_client(stack, redis_settings)
    connection = await broker.connect(rabbit.amqp_url.get_secret_value(), name=name,
                                      timeout_s=rabbit.connect_timeout_s)
    stack.push_async_callback(connection.close)
    publisher = broker.Publisher(connection, timeout_s=rabbit.publish_timeout_s)
    stack.push_async_callback(publisher.close)
    return redis, connection, publisher


def redis_client(stack: AsyncExitStack, redis_settings: RedisSettings) -> aioredis.Redis:
    """A Redis client (no I/O yet), closed when ``stack`` closes."""
    redis = aioredis.Redis.from_url(redis_settings.redis_url.get_secret_value(),
                                    socket_timeout=redis_settings.socket_timeout_s,
                                    socket_connect_timeout=redis_settings.socket_timeout_s)
    stack.push_async_callback(redis.aclose)
    return redis
