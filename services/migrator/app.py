"""build_migrator(...): the one place the migration worker is wired (XO client, Redis, the RabbitMQ connection and
publisher, the job store, the handler's dependencies, the consumer, and on start its health and metrics servers).
__main__, the tests, the demo and the benchmarks all run what it builds; settings come in built.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.migrator.consumer import Consumer
from services.migrator.health import HealthServer
from services.migrator.migrate import HandlerDeps
from services.migrator.settings import MigratorSettings
from services.migrator.slots import CopySlots
from shared import broker, metrics
from shared.backends import open_messaging
from shared.config import RabbitSettings, RedisSettings, XoSettings
from shared.health import connected
from shared.jobs import JobStore
from shared.logging import get_logger
from shared.xo.client import XoClient
from shared.xo.inventory import Inventory
from shared.xo.rest import XoRest

log = get_logger(__name__)


@dataclass
class Migrator:
    """A wired worker: ``start()``, then ``stop(grace_s)`` (SIGTERM) or ``crash()`` (as a killed process would)."""

    settings: MigratorSettings
    stack: AsyncExitStack
    xo: XoClient
    redis: aioredis.Redis
    publisher: broker.Publisher
    jobs: JobStore
    consumer: Consumer
    health: HealthServer | None = None
    inventory: Inventory | None = None

    async def start(self) -> None:
        """Consume and reap; serve /livez and /readyz on ``health_port`` and /metrics on ``metrics_port`` (0: off).
        XO's SRs (placement) are loaded meanwhile, so that the first job does not wait for them."""
        settings = self.settings
        if self.inventory is not None:  # logs and returns when XO cannot be read yet (the first job loads them)
            warming = asyncio.create_task(self.inventory.warm("SR"), name="inventory-warm")
            self.stack.push_async_callback(_cancel, warming)
        await self.consumer.start()
        if settings.health_port:
            self.health = HealthServer(
                loop_age_s=self.consumer.loop_age_s, liveness_timeout_s=settings.liveness_timeout_s,
                probe_timeout_s=settings.probe_timeout_s,
                checks={"rabbitmq": lambda: connected(self.publisher), "redis": self.redis.ping, "xo": self.xo.ping},
            )
            await self.health.start(settings.health_host, settings.health_port)
            self.stack.push_async_callback(self.health.close)
        await self.stack.enter_async_context(metrics.serving(settings.metrics_port))
        log.info("migrator_ready", worker=settings.worker_name)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM: stop consuming, let running jobs finish within ``grace_s``, hand the others back."""
        log.info("migrator_stopping", grace_s=grace_s)
        await self.consumer.stop(grace_s)

    async def crash(self) -> None:
        """Stop as a crash would: nothing handed back; running records go stale for another worker's reaper."""
        await self.consumer.abort()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def handler_deps(settings: MigratorSettings, xo: XoClient, redis: aioredis.Redis, key_prefix: str,
                 rest: XoRest | None = None, inventory: Inventory | None = None) -> HandlerDeps:
    """What ``migrate.handle`` needs, from the worker's settings."""
    return HandlerDeps(xo=xo, redis=redis, key_prefix=key_prefix, lock_ttl_s=settings.lock_ttl_s,
                       lock_wait_s=settings.lock_wait_s, migrate_timeout_s=settings.migrate_timeout_s,
                       per_sr_limit=settings.per_sr_limit, sr_slot_wait_s=settings.sr_slot_wait_s, rest=rest,
                       inventory=inventory, copies=CopySlots(settings.concurrency, wait_s=settings.prepared_wait_s))


async def build_migrator(stack: AsyncExitStack, settings: MigratorSettings, *, rabbit: RabbitSettings,
                         redis: RedisSettings, xo: XoSettings) -> Migrator:
    """Connect to Redis and RabbitMQ (BackendUnavailable when RabbitMQ cannot be reached) and wire the worker;
    every client is closed when ``stack`` closes. A non-admin XO account is refused (XoAuthError)."""
    xo_client = XoClient.from_settings(xo)
    stack.push_async_callback(xo_client.close)
    await xo_client.require_admin("migrator")  # XoAuthError: a non-admin account is refused, with the reason
    rest = XoRest.from_settings(xo, idle_timeout_s=settings.stream_idle_timeout_s)
    stack.push_async_callback(rest.close)
    redis_client, connection, publisher = await open_messaging(stack, rabbit, redis, name=settings.worker_name)
    jobs = JobStore(redis_client, redis.key_prefix, active_ttl_s=settings.job_active_ttl_s,
                    result_ttl_s=settings.job_result_ttl_s)
    # SRs (placement) from XO's notifications, loaded at the first job: not one SR read per job
    inventory = Inventory(xo_client)
    stack.push_async_callback(inventory.close)
    deps = handler_deps(settings, xo_client, redis_client, redis.key_prefix, rest, inventory)
    consumer = Consumer(connection, publisher, jobs, deps, settings)
    return Migrator(settings, stack, xo_client, redis_client, publisher, jobs, consumer, inventory=inventory)
