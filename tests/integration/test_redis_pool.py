"""The services' Redis client (shared/backends.py) under more concurrent commands than its pool holds connections:
they wait for a free connection instead of failing (redis-py's default pool raises MaxConnectionsError past 100,
which answered UNAVAILABLE to a herd of 200 attaches waiting at once)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from shared.backends import redis_client
from shared.config import RedisSettings
from tests.support.brokers import RedisEndpoint

pytestmark = pytest.mark.integration

POOL = 3
COMMANDS = 12
HOLD_S = 0.1  # each command holds its connection this long (a BLPOP that times out)


async def test_commands_beyond_the_pool_wait_for_a_connection_and_all_succeed(redis_server: RedisEndpoint,
                                                                               redis_prefix: str) -> None:
    settings = RedisSettings(redis_url=SecretStr(redis_server.url), max_connections=POOL, socket_timeout_s=5)
    async with AsyncExitStack() as stack:
        client = redis_client(stack, settings)
        observer = aioredis.Redis.from_url(redis_server.url)
        stack.push_async_callback(observer.aclose)
        name = f"{redis_prefix}pool-test"
        await client.client_setname(name)
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                clients = await observer.client_list()
                most = max(most, sum(1 for c in clients if c["name"] == name or c["cmd"] == "blpop"))
                await asyncio.sleep(0.01)  # sampling the server's client list, not synchronisation

        watcher = asyncio.create_task(watch())
        replies = await asyncio.gather(*(client.blpop([f"{redis_prefix}never-{n}"], timeout=HOLD_S)
                                         for n in range(COMMANDS)))
        watcher.cancel()
        assert replies == [None] * COMMANDS
        assert 1 <= most <= POOL, f"{most} connections at once, pool of {POOL}"
