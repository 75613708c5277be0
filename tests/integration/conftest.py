"""Fixtures of the in-process migration tests (helpers in tests/support/migration.py): ``env``, a simulator and a
frontend on this test's vhost and key prefix, whose disk copies in ``copy_s`` seconds (a module overrides
``copy_s``, or ``env_vhost`` to use another broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.brokers import RedisEndpoint
from tests.support.migration import Env, GiB, open_env


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
