"""Opening the messaging backends both services use: a Redis client (socket timeouts always set, a bounded pool of
connections that commands wait for; one server, or the primary Redis Sentinel names) and a robust RabbitMQ
connection (failing over along AMQP_URL's nodes) with a confirming publisher, all closed by the caller's exit stack."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection
from pydantic import SecretStr
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from shared import broker
from shared.config import RabbitSettings, RedisSettings


def redis_client(stack: AsyncExitStack, settings: RedisSettings, *, timeout_s: float | None = None) -> aioredis.Redis:
    """A Redis client for ``settings`` (no I/O yet), closed when ``stack`` closes; every socket bounded by
    ``timeout_s`` (default the settings' ``socket_timeout_s``).

    With REDIS_SENTINELS, the client asks the sentinels for the primary of REDIS_SENTINEL_MASTER at each new
    connection, and drops its connections when the sentinels name another primary or the server it reaches
    answers as a replica (redis-py's SentinelConnectionPool): after a failover, commands go to the promoted
    replica. Writes the old primary had not replicated yet are lost with it (docs/migrations.md, "Broker
    failover")."""
    timeout = settings.socket_timeout_s if timeout_s is None else timeout_s
    sockets: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    # At most max_connections; a command finding them all busy waits for one (up to the socket timeout) instead of
    # failing at once (redis-py's default pool raises MaxConnectionsError past 100: 200 attaches waiting at once).
    pooled: dict[str, Any] = {"max_connections": settings.max_connections, "timeout": timeout}
    if not settings.uses_sentinel:
        client = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            settings.redis_url.get_secret_value(), **pooled, **sockets))
        stack.push_async_callback(client.aclose)
        return client
    sentinel_kwargs = {**sockets, "password": _secret(settings.sentinel_password)}
    sentinel = Sentinel(settings.sentinel_addresses(), sentinel_kwargs=sentinel_kwargs,  # type: ignore[no-untyped-call]
                        **sockets)
    stack.push_async_callback(sentinel.aclose)
    primary: aioredis.Redis = sentinel.master_for(settings.sentinel_master, password=_secret(settings.password),
                                                  db=settings.db, connection_pool_class=_BlockingSentinelPool,
                                                  **pooled)
    stack.push_async_callback(primary.aclose)  # closed first (last in, first out), then the sentinels' clients
    return primary


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's SentinelConnectionPool (connections to the primary the sentinels name) with its
    BlockingConnectionPool's bound: past ``max_connections`` a command waits ``timeout`` for a free connection."""


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


async def open_messaging(stack: AsyncExitStack, rabbit: RabbitSettings, redis_settings: RedisSettings, *,
                         name: str) -> tuple[aioredis.Redis, AbstractRobustConnection, broker.Publisher]:
    """(redis client, RabbitMQ connection named ``name``, publisher); each is closed when ``stack`` closes."""
    redis = redis_client(stack, redis_settings)
    connection = await broker.connect(rabbit.amqp_urls, name=name, timeout_s=rabbit.connect_timeout_s)
    stack.push_async_callback(connection.close)
    publisher = broker.Publisher(connection, timeout_s=rabbit.publish_timeout_s)
    stack.push_async_callback(publisher.close)
    return redis, connection, publisher
