"""Shared fixtures: real RabbitMQ and Redis (session-scoped, started lazily on first use, stopped at session end),
per-test isolation (a vhost, a key prefix), broker restarts for fault tests, and services as separate processes.
See tests/support/ for the machinery.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from dev import process as procs
from tests.support import brokers
from tests.support.brokers import (
    ContainerRabbit,
    ContainerRedis,
    LocalRabbit,
    LocalRedis,
    RabbitEndpoint,
    RedisEndpoint,
)


def pytest_configure(config: pytest.Config) -> None:
    # CPython 3.11.0-3.11.7 can raise "SystemError: AST constructor recursion depth mismatch" while pytest parses a
    # failing test's source for its long traceback (python/cpython#106905, fixed in 3.11.8): the INTERNALERROR ends
    # the session and hides which test failed. Python's own traceback format needs no such parse.
    if (3, 11) <= sys.version_info < (3, 11, 8) and config.option.tbstyle == "auto":
        config.option.tbstyle = "native"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    procs.kill_leftover_processes()


@pytest.fixture(scope="session")
def _rabbitmq_server() -> Iterator[LocalRabbit | ContainerRabbit]:
    with brokers.running_rabbitmq() as server:
        yield server


@pytest.fixture(scope="session")
def _redis_server() -> Iterator[LocalRedis | ContainerRedis]:
    with brokers.running_redis() as server:
        yield server


@pytest.fixture(scope="session")
def rabbitmq(_rabbitmq_server: LocalRabbit | ContainerRabbit) -> RabbitEndpoint:
    """The session's RabbitMQ (management plugin on, user guest). Prefer `amqp_vhost` for isolation."""
    return _rabbitmq_server.endpoint


@pytest.fixture(scope="session")
def redis_server(_redis_server: LocalRedis | ContainerRedis) -> RedisEndpoint:
    """The session's Redis. Prefer `redis_prefix` for isolation."""
    return _redis_server.endpoint


@pytest.fixture
def amqp_vhost(rabbitmq: RabbitEndpoint, request: pytest.FixtureRequest) -> Iterator[str]:
    """The AMQP URL of a fresh vhost for this test, deleted (with its queues) afterwards."""
    with brokers.temporary_vhost(rabbitmq, "t-" + brokers.unique_name(request.node.name)) as url:
        yield url


@pytest.fixture
async def redis_prefix(redis_server: RedisEndpoint, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A key prefix unique to this test ("t:<test>-<hex>:"); its keys are deleted afterwards."""
    prefix = f"t:{brokers.unique_name(request.node.name)}:"
    yield prefix
    await brokers.delete_keys(redis_server, prefix)


@pytest.fixture
def local_rabbitmq(_rabbitmq_server: LocalRabbit | ContainerRabbit) -> LocalRabbit:
    """The session's RabbitMQ node for fault tests (stop/start/restart; blocking: use asyncio.to_thread).
    Local servers only: skips under testcontainers. Leave it running: later tests share it."""
    if not isinstance(_rabbitmq_server, LocalRabbit):
        pytest.skip("broker faults need a local RabbitMQ (XOCSI_TEST_BROKERS=local), not a container")
    return _rabbitmq_server


@pytest.fixture
def local_redis(_redis_server: LocalRedis | ContainerRedis) -> LocalRedis:
    """The session's redis-server for fault tests; see `local_rabbitmq`."""
    if not isinstance(_redis_server, LocalRedis):
        pytest.skip("Redis faults need a local redis-server (XOCSI_TEST_BROKERS=local), not a container")
    return _redis_server


@pytest.fixture
def restart_rabbitmq(local_rabbitmq: LocalRabbit) -> Callable[..., Awaitable[None]]:
    """`await restart_rabbitmq(crash=False)`: stop the broker (SIGTERM, ~8 s; SIGKILL with crash=True) and start
    it again on the same ports with its state (durable queues, vhosts) kept; returns once AMQP and management
    answer. See LocalRabbit.restart for what a crash loses. Local mode only."""

    async def restart(*, crash: bool = False) -> None:
        await asyncio.to_thread(local_rabbitmq.restart, crash=crash)

    return restart


@pytest.fixture
def restart_redis(local_redis: LocalRedis) -> Callable[..., Awaitable[None]]:
    """`await restart_redis(keep_data=True)`: restart Redis on the same port; keep_data=False simulates a
    crash (SIGKILL, comes back empty). Local mode only."""

    async def restart(*, keep_data: bool = True) -> None:
        await asyncio.to_thread(local_redis.restart, keep_data=keep_data)

    return restart


@pytest.fixture
def service_process(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[procs.ServiceProcess]]:
    """`async with service_process(argv, env=..., ready_line_regex=..., timeout_s=...) as proc:` runs a
    service as a separate process with its log in this test's tmp dir (see dev/process.py)."""
    return functools.partial(procs.service_process, log_dir=tmp_path)
