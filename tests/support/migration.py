"""Helpers of the in-process migration tests (tests/integration/test_migration*.py, test_sr_limit.py): the
simulator topology with a disk to move, migrators started in the test's process (``start_worker``), and a
frontend's attacher + gate on real RabbitMQ and Redis (``open_env``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import redis.asyncio as aioredis
from pydantic import SecretStr

from services.csi_frontend.app import Frontend, build_frontend
from services.csi_frontend.attach import Attacher
from services.csi_frontend.settings import FrontendSettings
from services.migrator.app import Migrator, build_migrator
from services.migrator.consumer import Consumer
from services.migrator.settings import MigratorSettings
from services.xo_simulator.server import SimulatorHandle, start_simulator
from services.xo_simulator.topology import derived_id
from shared import broker, messages
from shared.config import RabbitSettings, RedisSettings, XoSettings
from shared.jobs import JobRecord, JobStore
from shared.messages import MigrationRequested
from tests.support.brokers import RedisEndpoint

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
    "job_active_ttl_s": 60, "job_result_ttl_s": 2, "retry_backoff_max_s": 0.2, "migrate_timeout_s": 60,
}
# Settings of the test frontend: controller only, 1 s of margin before the caller's deadline.
FRONTEND_SETTINGS: dict[str, Any] = {
    "mode": "controller", "node_id": "test-frontend", "publish_margin_s": 1, "device_wait_s": 10,
    "job_active_ttl_s": 60, "job_result_ttl_s": 30,
}


def sim_settings(sim: SimulatorHandle) -> XoSettings:
    return XoSettings(url=sim.http_url, token=SecretStr("sim-token"), timeout_s=10)


def messaging(amqp_url: str, redis_url: str, prefix: str) -> tuple[RabbitSettings, RedisSettings]:
    return (RabbitSettings(amqp_url=SecretStr(amqp_url), connect_timeout_s=10, publish_timeout_s=10),
            RedisSettings(redis_url=SecretStr(redis_url), key_prefix=prefix))


@dataclass
class Worker:
    """A migrator built by ``build_migrator`` in the test's process, with its own clients, as a separate process
    would have them."""

    migrator: Migrator
    closed: bool = field(default=False)

    @property
    def consumer(self) -> Consumer:
        return self.migrator.consumer

    @property
    def settings(self) -> MigratorSettings:
        return self.migrator.settings

    async def stop(self, grace_s: float = 5) -> None:
        """SIGTERM: finish or hand back, then close. Idempotent."""
        if not self.closed:
            self.closed = True
            await self.migrator.stop(grace_s)
            await self.migrator.stack.aclose()

    async def crash(self) -> None:
        """As a killed process: nothing handed back, running records go stale. Idempotent."""
        if not self.closed:
            self.closed = True
            await self.migrator.crash()
            await self.migrator.stack.aclose()


async def start_worker(amqp_url: str, redis_url: str, prefix: str, sim: SimulatorHandle, name: str,
                       **overrides: Any) -> Worker:
    settings = MigratorSettings(**{**WORKER_SETTINGS, "worker_name": name, **overrides})
    rabbit, redis = messaging(amqp_url, redis_url, prefix)
    stack = AsyncExitStack()
    try:
        migrator = await build_migrator(stack, settings, rabbit=rabbit, redis=redis, xo=sim_settings(sim))
        await migrator.start()
    except BaseException:
        await stack.aclose()
        raise
    return Worker(migrator)


def vdis_named(sim: SimulatorHandle, name: str = DISK) -> list[dict[str, Any]]:
    return [o for o in sim.state.of_type("VDI") if o["name_label"] == name]


def copying(sim: SimulatorHandle) -> bool:
    """XO is copying the disk (its source VDI has a current operation)."""
    return any(o.get("current_operations") for o in vdis_named(sim))


async def ready_messages(amqp_url: str, queue_name: str) -> int:
    """The messages ready in ``queue_name`` now (a passive declare: no statistics lag)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def dead_letters(amqp_url: str) -> int:
    return await ready_messages(amqp_url, messages.DEAD_LETTER_QUEUE)


async def ready_jobs(amqp_url: str) -> int:
    return await ready_messages(amqp_url, messages.JOBS_QUEUE)


@dataclass
class Env:
    sim: SimulatorHandle
    redis: aioredis.Redis
    redis_url: str
    prefix: str
    amqp_url: str
    frontend: Frontend
    workers: list[Worker] = field(default_factory=list)

    @property
    def attacher(self) -> Attacher:
        assert self.frontend.attacher is not None, "a controller frontend has an attacher"
        return self.frontend.attacher

    @property
    def publisher(self) -> broker.Publisher:
        assert self.frontend.publisher is not None
        return self.frontend.publisher

    @property
    def jobs(self) -> JobStore:
        assert self.frontend.jobs is not None
        return self.frontend.jobs

    async def worker(self, name: str, **overrides: Any) -> Worker:
        worker = await start_worker(self.amqp_url, self.redis_url, self.prefix, self.sim, name, **overrides)
        self.workers.append(worker)
        return worker

    async def submit(self, disk_name: str = DISK, *, vm_id: str = VM_A2, host_id: str = HOST_A2,
                     pool_id: str = POOL_A) -> MigrationRequested:
        """What the frontend's gate does, without waiting: job record, then the confirmed request (for node-a2 by
        default)."""
        [vdi] = vdis_named(self.sim, disk_name)
        request = MigrationRequested(
            job_id=messages.new_job_id(), disk_name=disk_name, volume_id="name:x", vdi_id_seen=vdi["id"], tag=TAG,
            vm_id=vm_id, host_id=host_id, pool_id=pool_id, requested_at=messages.utc_now(), correlation_id="c-1",
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
                   topology: dict[str, Any] | None = None, frontend: dict[str, Any] | None = None,
                   **sim_options: Any) -> AsyncIterator[Env]:
    """The simulator, a frontend built by ``build_frontend`` (controller, migrations on) and a Redis client of the
    test's own; workers are started with ``env.worker()``."""
    sim = await start_simulator(topology or two_hosts(), admin=True, **sim_options)
    redis = aioredis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    rabbit, redis_settings = messaging(amqp_url, redis_server.url, prefix)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(sim.stop)
        stack.push_async_callback(redis.aclose)
        built = await build_frontend(stack, FrontendSettings(**{**FRONTEND_SETTINGS, **(frontend or {})}),
                                     sim_settings(sim), rabbit=rabbit, redis=redis_settings)
        env = Env(sim, redis, redis_server.url, prefix, amqp_url, built)
        try:
            yield env
        finally:
            for worker in env.workers:
                await worker.stop(5)
