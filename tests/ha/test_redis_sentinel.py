"""Redis failover through Sentinel (issue 14 item 2): the services reach Redis through three sentinels
(REDIS_SENTINELS + REDIS_SENTINEL_MASTER) and follow the primary when it dies during migrations.

Replication is asynchronous, so a failover can lose the disk lock (and the job record) a worker holds while XO
copies its disk: a second job for the same disk can then run beside the first. What keeps one copy per disk is
XO's state, re-read before every destructive call (migrate.handle): the second worker finds XO still copying the
disk and waits for that copy instead of starting another. The second test makes the loss certain (the replica is
frozen before the job starts, so it has none of the job's writes when it is promoted) and checks the soak's
invariants: one VDI per volume, on the right SR, copied once, data intact, no stray VDI.

The whole stack runs as separate processes on the session's RabbitMQ (a vhost of this test's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from dev.ha import LocalRedisSentinel
from dev.stack import Stack, StackOptions, running_stack
from dev.wait import eventually
from shared import keys
from shared.units import MiB
from tests.support.e2e import arrived_intact, copying, publish, require_root, written_on_a1
from tests.support.ha import each_moved_exactly_once, publish_all, volumes_on_a1

pytestmark = [pytest.mark.ha, pytest.mark.e2e, pytest.mark.timeout(240)]

PREFIX = "xocsi-ha:"
VOLUMES = 8
MIGRATOR_ENV = {"MIGRATOR_JOB_HEARTBEAT_S": "1", "MIGRATOR_STALE_AFTER_S": "4", "MIGRATOR_REAPER_INTERVAL_S": "1",
                "MIGRATOR_LOCK_TTL_S": "3", "MIGRATOR_RETRY_BACKOFF_MAX_S": "2"}


@contextlib.asynccontextmanager
async def _stack(tmp_path: Path, amqp_url: str, sentinels: LocalRedisSentinel, *, real_data: bool,
                 migration_rate: str) -> AsyncIterator[Stack]:
    options = StackOptions(migrators=2, real_data=real_data, nodes=real_data, amqp_url=amqp_url,
                           redis_sentinels=sentinels.sentinels, redis_prefix=PREFIX,
                           sim_args=("--migration-rate", migration_rate), migrator_args=("--concurrency", "2"))
    with pytest.MonkeyPatch.context() as env:
        for name, value in MIGRATOR_ENV.items():
            env.setenv(name, value)
        async with running_stack(tmp_path, options) as stack:
            yield stack


async def _failed_over(sentinels: LocalRedisSentinel) -> None:
    """Return once the sentinels name the replica as the primary and it answers as one."""
    replica = sentinels.replica.endpoint

    def promoted() -> bool:
        return sentinels.master_address() == (replica.host, replica.port) and sentinels.is_primary(sentinels.replica)
    await eventually(lambda: asyncio.to_thread(promoted), 30, 0.1, description="the replica promoted")


async def test_a_primary_killed_during_migrations_fails_over_and_every_attach_completes_once(
        redis_sentinel: LocalRedisSentinel, amqp_vhost: str, tmp_path: Path) -> None:
    async with _stack(tmp_path, amqp_vhost, redis_sentinel, real_data=False, migration_rate="32MiB") as stack:
        volumes = await volumes_on_a1(stack, "ha-redis", VOLUMES)
        publishing = publish_all(stack, volumes)
        await copying(stack, at_least=4)
        await asyncio.to_thread(redis_sentinel.kill, redis_sentinel.primary)
        await _failed_over(redis_sentinel)

        async with asyncio.timeout(180):
            await publishing  # every attach completes
        await each_moved_exactly_once(stack, volumes)
        assert all(proc.returncode is None for proc in stack.processes.values()), "a service exited"


async def _value(endpoint_port: int, key: str) -> bytes | None:
    client = aioredis.Redis(host="127.0.0.1", port=endpoint_port, socket_timeout=5)
    try:
        value = await client.get(key)
        return bytes(value) if value is not None else None
    finally:
        await client.aclose()


@pytest.mark.skipif(shutil.which("losetup") is None, reason="needs losetup (util-linux) for real data mode")
async def test_a_failover_that_loses_the_disk_lock_still_makes_one_copy_and_keeps_the_data(
        redis_sentinel: LocalRedisSentinel, amqp_vhost: str, tmp_path: Path) -> None:
    require_root("a failover losing a lock during a copy, checked on the data")
    # 192 MiB at 16 MiB/s: the copy lasts ~12 s, longer than the failover (~2 s) and a lock heartbeat (1 s)
    async with _stack(tmp_path, amqp_vhost, redis_sentinel, real_data=True, migration_rate="16MiB") as stack:
        moving = await written_on_a1(stack, "ha-lock", 192 * MiB)
        await asyncio.to_thread(redis_sentinel.cut_off_replica)  # the job's writes will exist on the primary only
        publishing = asyncio.create_task(publish(stack, moving.volume_id, "node-a2"))
        await copying(stack)
        lock = keys.disk_lock_key(PREFIX, moving.disk)
        token = await _value(redis_sentinel.primary.endpoint.port, lock)
        assert token is not None, "the worker copying the disk holds its lock"

        await asyncio.to_thread(redis_sentinel.kill, redis_sentinel.primary)  # the lock dies with it
        await asyncio.to_thread(redis_sentinel.resume, redis_sentinel.replica)
        await _failed_over(redis_sentinel)
        assert await _value(redis_sentinel.replica.endpoint.port, lock) != token, "the failover lost the lock"

        async with asyncio.timeout(180):
            await publishing
        await arrived_intact(stack, moving)  # one VDI, on Local A2, copied once, the data written on node-a1
        names = sorted(vdi.name_label for vdi in await stack.xo.find_vdis() if vdi.name_label.startswith("csi-"))
        assert names == [moving.disk], "no stray copy"
        # The worker that held the lock was fenced off by its lock heartbeat (lock_lost: it stops before its next
        # XO write) or by its job heartbeat (outcome lost: another job of the disk took over).
        fenced = [name for name, proc in stack.processes.items() if name.startswith("migrator")
                  and any(mark in proc.log_text() for mark in ('"event": "lock_lost"', '"outcome": "lost"'))]
        assert len(fenced) == 1, fenced
        assert all(proc.returncode is None for proc in stack.processes.values()), "a service exited"
