"""Attach-time migration end to end in one process: the frontend's Attacher + QueueMigrationGate, an in-process
migrator Consumer, real RabbitMQ and Redis (per-test vhost and key prefix), and the XO simulator.

``Worker``/``start_worker`` (a migrator with its own connection and XO client, as a separate process would
have) are shared with test_migration_long.py and test_migration_ops.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from services.csi_frontend.attach import Attacher
from services.csi_frontend.disks import DiskLocator
from services.csi_frontend.migration_gate import QueueMigrationGate
from services.migrator.consumer import Consumer
from services.migrator.migrate import HandlerDeps
from services.migrator.settings import MigratorSettings
from services.xo_simulator.server import SimulatorHandle, start_simulator
from services.xo_simulator.topology import derived_id
from shared import broker, messages
from shared.config import XoSettings
from shared.errors import CapacityExhausted
from shared.jobs import JobRecord, JobStore
from shared.locks import disk_job_key, disk_lock_key
from shared.messages import MigrationRequested
from shared.volume_id import by_name
from shared.xo.client import XoClient
from shared.xo.inventory import Inventory
from tests.support.brokers import RedisEndpoint
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

GiB = 1024**3
TAG = "k8s-migrating"
DISK = "csi-vol1"
DESCRIPTION = 'csi:info: {"migrating":{},"srsWithTag":"k8s-migrating"}'
SR_A1 = derived_id("sr", "Pool A", "host-a1", "Local A1")
SR_A2 = derived_id("sr", "Pool A", "host-a2", "Local A2")
VM_A2 = derived_id("vm", "Pool A", "host-a2", "node-a2")
TIMEOUT_S = 30.0
HOST_A2 = derived_id("host", "Pool A", "host-a2")
POOL_A = derived_id("pool", "Pool A")


def _topology(*, a2_size: str = "100GiB", extra_vdis: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    return {
        "tokens": ["sim-token"],
        "pools": [{
            "name_label": "Pool A",
            "hosts": [
                {"name_label": "host-a1", "srs": [{"name_label": "Local A1", "size": "100GiB", "tags": [TAG]}],
                 "vms": [{"name_label": "node-a1"}]},
                {"name_label": "host-a2", "srs": [{"name_label": "Local A2", "size": a2_size, "tags": [TAG]}],
                 "vms": [{"name_label": "node-a2"}]},
            ],
        }],
        "vdis": [{"name_label": DISK, "name_description": DESCRIPTION, "size": "2GiB", "sr": "Local A1"},
                 *extra_vdis],
    }


# Settings of test workers: short lock and heartbeat periods so that crashes are noticed within seconds.
WORKER_SETTINGS: dict[str, Any] = {
    "lock_ttl_s": 3, "lock_wait_s": 1, "job_heartbeat_s": 0.5, "stale_after_s": 2.0, "reaper_interval_s": 0.5,
    "job_result_ttl_s": 2, "retry_backoff_max_s": 0.2,
}


@dataclass
class Worker:
    """An in-process migrator with its own connection, publisher and XO client."""

    consumer: Consumer
    connection: aio_pika.abc.AbstractRobustConnection
    publisher: broker.Publisher
    xo: XoClient
    settings: MigratorSettings
    closed: bool = field(default=False)

    async def stop(self, grace_s: float = 5) -> None:
        """SIGTERM: finish or hand back, then close. Idempotent."""
        if not self.closed:
            await self.consumer.stop(grace_s)
            await self._close()

    async def crash(self) -> None:
        """As a killed process: nothing handed back, running records go stale. Idempotent."""
        if not self.closed:
            await self.consumer.abort()
            await self._close()

    async def _close(self) -> None:
        self.closed = True
        await self.publisher.close()
        await self.connection.close()
        await self.xo.close()


async def start_worker(amqp_url: str, redis: aioredis.Redis, prefix: str, sim: SimulatorHandle, name: str,
                       **overrides: Any) -> Worker:
    settings = MigratorSettings(**{**WORKER_SETTINGS, "worker_name": name, **overrides})
    xo = XoClient.from_settings(XoSettings(url=sim.http_url, token=SecretStr("sim-token"), timeout_s=10))
    connection = await broker.connect(amqp_url, name=name, timeout_s=10)
    publisher = broker.Publisher(connection, timeout_s=10)
    jobs = JobStore(redis, prefix, active_ttl_s=60, result_ttl_s=settings.job_result_ttl_s)
    deps = HandlerDeps(xo=xo, redis=redis, key_prefix=prefix, lock_ttl_s=settings.lock_ttl_s,
                       lock_wait_s=settings.lock_wait_s, migrate_timeout_s=60)
    consumer = Consumer(connection, publisher, jobs, deps, settings)
    await consumer.start()
    return Worker(consumer, connection, publisher, xo, settings)


def vdis_named(sim: SimulatorHandle, name: str = DISK) -> list[dict[str, Any]]:
    return [o for o in sim.state.of_type("VDI") if o["name_label"] == name]


def copying(sim: SimulatorHandle) -> bool:
    """XO is copying the disk (its source VDI has a current operation)."""
    return any(o.get("current_operations") for o in vdis_named(sim))


async def dead_letters(amqp_url: str) -> int:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(messages.DEAD_LETTER_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def ready_jobs(amqp_url: str) -> int:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(messages.JOBS_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)


@dataclass
class Env:
    sim: SimulatorHandle
    redis: aioredis.Redis
    redis_url: str
    prefix: str
    amqp_url: str
    jobs: JobStore
    publisher: broker.Publisher
    attacher: Attacher
    workers: list[Worker] = field(default_factory=list)

    async def worker(self, name: str, **overrides: Any) -> Worker:
        worker = await start_worker(self.amqp_url, self.redis, self.prefix, self.sim, name, **overrides)
        self.workers.append(worker)
        return worker

    async def submit(self, disk_name: str = DISK) -> MigrationRequested:
        """What the frontend's gate does, without waiting: job record, then the confirmed request."""
        [vdi] = vdis_named(self.sim, disk_name)
        request = MigrationRequested(
            job_id=messages.new_job_id(), disk_name=disk_name, volume_id="name:x", vdi_id_seen=vdi["id"], tag=TAG,
            vm_id=VM_A2, host_id=HOST_A2, pool_id=POOL_A, requested_at=messages.utc_now(), correlation_id="c-1",
        )
        _, created = await self.jobs.create_or_join(request)
        assert created
        await self.publisher.request(request)
        return request

    async def finished(self, disk_name: str = DISK) -> JobRecord | None:
        record = await self.jobs.get(disk_name)
        return record if record is not None and not record.is_active else None


@contextlib.asynccontextmanager
async def open_env(amqp_url: str, redis_server: RedisEndpoint, prefix: str, *,
                   topology: dict[str, Any] | None = None, **sim_options: Any) -> AsyncIterator[Env]:
    """The simulator, a frontend (attacher + gate) and Redis; workers are started with ``env.worker()``."""
    sim = await start_simulator(topology or _topology(), admin=True, **sim_options)
    xo = XoClient.from_settings(XoSettings(url=sim.http_url, token=SecretStr("sim-token"), timeout_s=10))
    redis = aioredis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    connection = await broker.connect(amqp_url, name="test-frontend", timeout_s=10)
    publisher = broker.Publisher(connection, timeout_s=10)
    jobs = JobStore(redis, prefix, active_ttl_s=60, result_ttl_s=30)
    disks = DiskLocator(xo, "csi-")
    gate = QueueMigrationGate(connection, publisher, jobs, disks, xo, margin_s=1)
    attacher = Attacher(xo, Inventory(xo), disks, device_wait_s=10, migrations=gate)
    env = Env(sim, redis, redis_server.url, prefix, amqp_url, jobs, publisher, attacher)
    try:
        yield env
    finally:
        for worker in env.workers:
            await worker.stop(5)
        await gate.close()
        await publisher.close()
        await connection.close()
        await redis.aclose()
        await xo.close()
        await sim.stop()


@dataclass
class Stack:
    sim: SimulatorHandle
    xo: XoClient
    redis: aioredis.Redis
    prefix: str
    attacher: Attacher
    consumer: Consumer
    amqp_url: str


@pytest.fixture
def topology() -> dict[str, Any]:
    return _topology()


@pytest.fixture
async def stack(
    topology: dict[str, Any], amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str
) -> AsyncIterator[Stack]:
    sim = await start_simulator(topology, admin=True, migration_rate_bps=4 * GiB)  # a 2 GiB disk copies in ~0.5 s
    xo = XoClient.from_settings(XoSettings(url=sim.http_url, token=SecretStr("sim-token"), timeout_s=10))
    redis = aioredis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    connection = await broker.connect(amqp_vhost, name="test-frontend", timeout_s=10)
    publisher = broker.Publisher(connection, timeout_s=10)
    worker = await start_worker(amqp_vhost, redis, redis_prefix, sim, "test-worker")
    jobs = JobStore(redis, redis_prefix, active_ttl_s=60, result_ttl_s=worker.settings.job_result_ttl_s)
    disks = DiskLocator(xo, "csi-")
    gate = QueueMigrationGate(connection, publisher, jobs, disks, xo, margin_s=1)
    attacher = Attacher(xo, Inventory(xo), disks, device_wait_s=10, migrations=gate)
    try:
        yield Stack(sim, xo, redis, redis_prefix, attacher, worker.consumer, amqp_vhost)
    finally:
        await worker.stop(5)
        await gate.close()
        await publisher.close()
        await connection.close()
        await redis.aclose()
        await xo.close()
        await sim.stop()


def _vdis(stack: Stack) -> list[dict[str, Any]]:
    return vdis_named(stack.sim)


def _migrations(stack: Stack) -> int:
    return int(stack.sim.simulator.stats.migrations[DISK])


async def _dead_letters(stack: Stack) -> int:
    return await dead_letters(stack.amqp_url)


async def _keys_gone(stack: Stack) -> bool:
    return not await stack.redis.exists(disk_lock_key(stack.prefix, DISK), disk_job_key(stack.prefix, DISK))


async def test_publish_migrates_the_disk_once_then_attaches(stack: Stack) -> None:
    context = await stack.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S)

    [vdi] = _vdis(stack)
    assert vdi["$SR"] == SR_A2
    assert '"inProgressToSRUUID"' not in vdi["name_description"]
    assert context["vbd"] in vdi["$VBDs"]
    assert _migrations(stack) == 1
    assert not await stack.redis.exists(disk_lock_key(stack.prefix, DISK))
    await eventually(lambda: _keys_gone(stack), TIMEOUT_S, description="job record expired")


async def test_concurrent_publishes_share_one_job_and_one_migration(stack: Stack) -> None:
    results = await asyncio.gather(
        *(stack.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S) for _ in range(5)),
        return_exceptions=True,
    )
    # Every gate joined the one job; after it, the first attach wins and the others find the VBD (idempotent)
    # or race on it; what matters here is the single migration.
    assert any(isinstance(r, dict) for r in results), results
    await stack.consumer.drain(TIMEOUT_S)
    assert _migrations(stack) == 1
    [vdi] = _vdis(stack)
    assert vdi["$SR"] == SR_A2
    await eventually(lambda: _keys_gone(stack), TIMEOUT_S, description="lock and job records gone")


async def test_malformed_message_is_dead_lettered_and_the_worker_keeps_running(stack: Stack) -> None:
    connection = await aio_pika.connect(stack.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(messages.JOBS_EXCHANGE)
        for body in (b"not json", b'{"schema_version": 99, "job_id": "x"}'):
            await exchange.publish(aio_pika.Message(body), routing_key=messages.JOBS_ROUTING_KEY,
                                   mandatory=True, timeout=10)
    await eventually(lambda: _dead_letters(stack), TIMEOUT_S, description="malformed messages dead-lettered")
    assert await _dead_letters(stack) == 2

    await stack.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S)
    assert _migrations(stack) == 1


@pytest.mark.parametrize("topology", [_topology(a2_size="1GiB")])
async def test_no_room_on_target_fails_the_publish_and_dead_letters_the_job(stack: Stack) -> None:
    with pytest.raises(CapacityExhausted, match=r"migration of disk csi-vol1 to host .* failed: no SR usable"):
        await stack.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S)

    await eventually(lambda: _dead_letters(stack), TIMEOUT_S, description="failed job dead-lettered")
    [vdi] = _vdis(stack)
    assert vdi["$SR"] == SR_A1
    assert _migrations(stack) == 0
    await eventually(lambda: _keys_gone(stack), TIMEOUT_S, description="lock and job records gone")
