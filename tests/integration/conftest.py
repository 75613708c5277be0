"""Fixtures of the in-process migration tests (helpers in tests/support/migration.py): ``env``, a simulator and a
frontend on this test's vhost and key prefix, whose disk copies in ``copy_s`` seconds (a module overrides
``copy_s``, or ``env_vhost`` to use another broker); ``xenv``, the same on two pools in real data mode for
cross-pool moves and clones (tests/support/cross_pool.py), with the simulator options ``stream_options``; ``ctl``, a
controller against the simulator alone (tests/support/controller.py); ``host``, a sandbox for the node tests on real
loop devices (tests/support/node_host.py; skips, saying why, where those cannot run)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from shared.units import GiB
from tests.support.brokers import RedisEndpoint
from tests.support.controller import Controller, controller
from tests.support.cross_pool import cross_pool_env
from tests.support.migration import Env, open_env
from tests.support.node_host import Host, skip_reason


@pytest.fixture
async def redis(redis_server: RedisEndpoint) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's Redis (use the ``redis_prefix`` fixture's prefix for this test's keys)."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
def copy_s() -> float:
    return 3.0


@pytest.fixture
def sim_options(copy_s: float) -> dict[str, Any]:
    return {"migration_rate_bps": int(2 * GiB / copy_s)}  # the 2 GiB disk copies in copy_s seconds


@pytest.fixture
def env_vhost(amqp_vhost: str) -> str:
    return amqp_vhost


@pytest.fixture
async def env(sim_options: dict[str, Any], env_vhost: str, redis_server: RedisEndpoint,
              redis_prefix: str) -> AsyncIterator[Env]:
    async with open_env(env_vhost, redis_server, redis_prefix, **sim_options) as env:
        yield env


@pytest.fixture
def stream_options() -> dict[str, Any]:
    return {}


@pytest.fixture
async def xenv(tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str,
               stream_options: dict[str, Any]) -> AsyncIterator[Env]:
    async with cross_pool_env(tmp_path, amqp_vhost, redis_server, redis_prefix, **stream_options) as env:
        yield env


@pytest.fixture
async def ctl() -> AsyncIterator[Controller]:
    async with controller() as running:
        yield running


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    reason = skip_reason()
    if reason:
        print(f"skipping node integration tests: {reason}")
        pytest.skip(reason)
    sandbox = Host(tmp_path)
    try:
        yield sandbox
    finally:
        await sandbox.cleanup()
