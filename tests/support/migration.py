"""Helpers of the in-process migration tests (tests/integration/test_migration*.py, test_sr_limit.py): the
simulator topology with a disk to move, migrators started in the test's process (``start_worker``), and a
frontend's attacher + gate on real RabbitMQ and Redis (``open_env``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
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
from shared.jobs import JobRecord, JobStore
from shared.messages import MigrationRequested
from shared.xo.client import XoClient
from shared.xo.inventory import Inventory
from tests.support.brokers import RedisEndpoint

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


def two_hosts(*, a2_size: str = "100GiB", extra_vdis: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
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
    sim = await start_simulator(topology or two_hosts(), admin=True, **sim_options)
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


