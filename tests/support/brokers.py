"""Real RabbitMQ and Redis for tests, never mocks: containers (testcontainers) when a Docker engine answers,
else private servers (dev/brokers.py) started on free ports picked at runtime.

Both kinds give the same endpoints. Only local servers can be stopped and restarted (fault tests).
XOCSI_TEST_BROKERS=local|docker|auto (default auto) forces a kind.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis

from dev.brokers import (
    LOG_TAIL_LINES,
    BrokerStartError,
    LocalRabbit,
    LocalRedis,
    RabbitEndpoint,
    RedisEndpoint,
    amqp_ready,
    management_client,
    management_ready,
    pick_free_port,
    redis_ready,
    unique_name,
    wait_ready,
)
from shared import keys

RABBITMQ_IMAGE = "rabbitmq:3-management"
REDIS_IMAGE = "redis:7"

__all__ = ["BrokerStartError", "LocalRabbit", "LocalRedis", "RabbitEndpoint", "RedisEndpoint", "pick_free_port",
           "unique_name"]


# ---------------------------------------------------------------------------------------------- discovery


@functools.cache
def docker_available() -> bool:
    """True when a Docker engine answers a ping (~1 ms when there is none)."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False  # where docker.from_env() would look; skips importing docker (~0.3 s)
    with warnings.catch_warnings():
        # A failed docker.from_env() leaves its socket to the garbage collector: a ResourceWarning, which
        # filterwarnings=error would turn into an error in whichever test runs next.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return _ping_docker()
        finally:
            gc.collect()


def _ping_docker() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
    except Exception:  # DockerException (no engine), ImportError...: all mean "no usable engine"
        return False
    try:
        return bool(client.ping())
    except Exception:  # same as above
        return False
    finally:
        client.close()


def use_containers() -> bool:
    mode = os.environ.get("XOCSI_TEST_BROKERS", "auto")
    if mode not in ("auto", "local", "docker"):
        raise ValueError(f"XOCSI_TEST_BROKERS={mode!r}: expected auto, local or docker")
    return mode == "docker" or (mode == "auto" and docker_available())


# ---------------------------------------------------------------------------------------------- containers


class _Container:
    """A started testcontainers DockerContainer with exposed ports; removed by stop()."""

    def __init__(self, image: str, *ports: int) -> None:
        from testcontainers.core.container import DockerContainer

        self._container = DockerContainer(image).with_exposed_ports(*ports)
        self._container.start()
        self.host: str = self._container.get_container_host_ip()

    def port(self, port: int) -> int:
        return int(self._container.get_exposed_port(port))

    def stop(self, *, keep_state: bool = False) -> None:
        self._container.stop()

    def logs(self) -> str:
        stdout, stderr = self._container.get_logs()
        text = (stdout + stderr).decode(errors="replace").splitlines()
        return "\n".join(text[-LOG_TAIL_LINES:])


class ContainerRabbit(_Container):
    def __init__(self) -> None:
        super().__init__(RABBITMQ_IMAGE, 5672, 15672)
        self.endpoint = RabbitEndpoint(
            amqp_url=f"amqp://guest:guest@{self.host}:{self.port(5672)}/",
            management_url=f"http://{self.host}:{self.port(15672)}",
            user="guest",
            password="guest",
            host=self.host,
            port=self.port(5672),
            mgmt_port=self.port(15672),
            base_dir=None,
        )

    def wait_ready(self) -> None:
        ep = self.endpoint
        wait_ready(lambda: amqp_ready(ep.host, ep.port), "RabbitMQ container AMQP", self.logs)
        wait_ready(lambda: management_ready(ep), "RabbitMQ container management", self.logs)


class ContainerRedis(_Container):
    def __init__(self) -> None:
        super().__init__(REDIS_IMAGE, 6379)
        port = self.port(6379)
        self.endpoint = RedisEndpoint(url=f"redis://{self.host}:{port}/0", host=self.host, port=port)

    def wait_ready(self) -> None:
        ep = self.endpoint
        wait_ready(lambda: redis_ready(ep.host, ep.port), "Redis container", self.logs)


# ---------------------------------------------------------------------------------------------- lifecycles


@contextlib.contextmanager
def _running(container: Callable[[], ContainerRabbit | ContainerRedis], local: LocalRabbit | LocalRedis,
             stop_local: Callable[[], None]) -> Iterator[Any]:
    """A container when a Docker engine is to be used, else the local server; always stopped on exit."""
    if use_containers():
        started = container()
        try:
            started.wait_ready()
            yield started
        finally:
            started.stop()
        return
    try:
        local.start()
        yield local
    finally:
        stop_local()


@contextlib.contextmanager
def running_rabbitmq() -> Iterator[LocalRabbit | ContainerRabbit]:
    """A started RabbitMQ (container or local node), always stopped and removed on exit."""
    node = LocalRabbit()
    with _running(ContainerRabbit, node, node.stop) as server:
        yield server


@contextlib.contextmanager
def running_redis() -> Iterator[LocalRedis | ContainerRedis]:
    """A started Redis (container or local server), always stopped and removed on exit."""
    server = LocalRedis()
    with _running(ContainerRedis, server, lambda: server.stop(crash=True)) as started:
        yield started


@contextlib.contextmanager
def temporary_vhost(rabbit: RabbitEndpoint, vhost: str) -> Iterator[str]:
    """Create `vhost` through the management API, grant the endpoint's user all permissions on it, yield its
    AMQP URL, and delete it (with everything in it) on exit."""
    path = quote(vhost, safe="")
    with management_client(rabbit) as http:
        http.put(f"/api/vhosts/{path}").raise_for_status()
        try:
            permissions = {"configure": ".*", "write": ".*", "read": ".*"}
            http.put(f"/api/permissions/{path}/{quote(rabbit.user, safe='')}", json=permissions).raise_for_status()
            yield rabbit.vhost_url(vhost)
        finally:
            response = http.delete(f"/api/vhosts/{path}")
            if response.status_code != 404:
                response.raise_for_status()


async def delete_keys(redis_endpoint: RedisEndpoint, prefix: str) -> int:
    """Delete every key starting with `prefix` (SCAN + DEL, so never a blocking KEYS); returns how many."""
    client = aioredis.Redis.from_url(redis_endpoint.url, socket_timeout=10, socket_connect_timeout=10)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=keys.all_keys_pattern(prefix), count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await client.delete(*batch)
                batch.clear()
        if batch:
            deleted += await client.delete(*batch)
    finally:
        await client.aclose()
    return deleted


async def cut_off(client: aioredis.Redis) -> None:
    """Cut ``client`` off from Redis, as a partition would, while other clients still reach it: its pool and the
    connections it keeps are pointed at a port nobody listens on, then dropped, so every later command fails with a
    real ConnectionError (connection refused) instead of a mock's."""
    pool = client.connection_pool
    nowhere = {"host": "127.0.0.1", "port": pick_free_port()}
    pool.connection_kwargs.update(nowhere)
    for connection in [*pool._available_connections, *pool._in_use_connections]:
        connection.host, connection.port = nowhere["host"], nowhere["port"]
    await pool.disconnect()
