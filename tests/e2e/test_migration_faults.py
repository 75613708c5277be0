"""Attach-time migration under faults, everything as separate processes: a migrator killed mid-copy, RabbitMQ
and Redis restarted mid-flight, the controller restarted while a publish waits, a malformed message.

One stack serves the module, with its own RabbitMQ and Redis (the tests restart them), two migrators and a
copy rate slow enough that a copy lasts seconds (~96 MiB of written blocks at 32 MiB/s). Every test moves its
own volume from host A to host B, as the attacher would (retrying ABORTED and UNAVAILABLE), then checks what
a fault must not change: one copy in XO, one VDI, the data, no lost job.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from dev.stack import Stack, StackOptions, running_stack
from dev.wait import eventually
from shared import messages
from shared.jobs import DEFAULT_ACTIVE_TTL_S, DEFAULT_RESULT_TTL_S, JobRecord, JobStore
from shared.units import MiB
from tests.support.e2e import (
    MIGRATING,
    arrived_intact,
    copying,
    create,
    host_segment,
    migrations_of,
    publish,
    queue_contents,
    require_root,
    srs_of,
    written_on_a1,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="needs losetup (util-linux) for real data mode"),
]

MIGRATION_RATE = "32MiB"
DATA_BYTES = 96 * MiB  # the sparse copy moves about this much: ~3 s at MIGRATION_RATE
# A dead worker's job is reaped within seconds, not the production 35 s (heartbeat 1 s, stale after 4 s).
MIGRATOR_ENV = {"MIGRATOR_JOB_HEARTBEAT_S": "1", "MIGRATOR_STALE_AFTER_S": "4", "MIGRATOR_REAPER_INTERVAL_S": "1",
                "MIGRATOR_LOCK_TTL_S": "3", "MIGRATOR_RETRY_BACKOFF_MAX_S": "2"}


@dataclass
class Faulty:
    stack: Stack
    jobs: JobStore


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def faulty(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Faulty]:
    require_root("migration fault tests")
    options = StackOptions(migrators=2, management=True, host_topology=True,
                           sim_args=("--migration-rate", MIGRATION_RATE))
    with pytest.MonkeyPatch.context() as env:
        for name, value in MIGRATOR_ENV.items():
            env.setenv(name, value)  # read by every migrator this stack starts, restarts included
        async with running_stack(tmp_path_factory.mktemp("faults"), options) as stack:
            assert stack.redis_url is not None
            # retries: the first command on a connection Redis closed when it restarted fails once
            redis = aioredis.Redis.from_url(stack.redis_url, socket_timeout=5, socket_connect_timeout=5,
                                            retry=Retry(ExponentialBackoff(cap=1, base=0.05), 5),
                                            retry_on_error=[RedisConnectionError])
            try:
                yield Faulty(stack, JobStore(redis, stack.options.redis_prefix, active_ttl_s=DEFAULT_ACTIVE_TTL_S,
                                           result_ttl_s=DEFAULT_RESULT_TTL_S))
            finally:
                await redis.aclose()


async def finished(jobs: JobStore, disk: str) -> JobRecord:
    """The disk's job record once it says succeeded. The publish may answer first: an attach whose disk XO
    already shows on a usable SR goes ahead while the job's owner is still recording its outcome."""
    async def succeeded() -> JobRecord:
        record = await jobs.get(disk)
        assert record is not None and record.state == "succeeded", record
        return record
    return await eventually(succeeded, 30, 0.1, description=f"the job of {disk} succeeded")


async def queues_empty(stack: Stack) -> None:
    assert stack.rabbit is not None
    endpoint = stack.rabbit.endpoint

    async def empty() -> bool:
        for queue in (messages.JOBS_QUEUE, messages.DEAD_LETTER_QUEUE):
            counted, got = await asyncio.to_thread(queue_contents, endpoint, "/", queue)
            assert (counted, got) == (0, 0), f"{queue}: {counted} counted, {got} fetched"
        return True
    await eventually(empty, 30, 0.5, description="jobs queue and dead-letter queue empty")


def name_of_worker(stack: Stack, worker: str | None) -> str:
    """The stack's name of the migrator process whose job owner name is ``worker`` (…:<pid>)."""
    assert worker is not None
    pid = int(worker.rsplit(":", 1)[1])
    return next(name for name, proc in stack.processes.items() if name.startswith("migrator") and proc.pid == pid)


# --- the tests ---------------------------------------------------------------------------------------------


async def test_migrator_killed_mid_copy_the_other_one_finishes_the_job(faulty: Faulty) -> None:
    stack = faulty.stack
    moving = await written_on_a1(stack, "pvc-kill", DATA_BYTES)
    publishing = asyncio.create_task(publish(stack, moving.volume_id, "node-a2"))
    await copying(stack)
    owner = (await faulty.jobs.get(moving.disk))
    assert owner is not None and owner.state == "running"
    victim = name_of_worker(stack, owner.worker)
    await stack.processes[victim].kill()  # kill -9 mid-copy; XO goes on copying

    await publishing
    record = await finished(faulty.jobs, moving.disk)
    assert record.job_id == owner.job_id and record.attempt >= 2  # reaped and handed back: the same job
    assert name_of_worker(stack, record.worker) != victim
    await arrived_intact(stack, moving)
    await stack.start_migrator(victim)  # the next tests get two migrators again


async def test_rabbitmq_restart_mid_flight_loses_no_job(faulty: Faulty) -> None:
    stack = faulty.stack
    assert stack.rabbit is not None
    moving = await written_on_a1(stack, "pvc-rabbit", DATA_BYTES)
    publishing = asyncio.create_task(publish(stack, moving.volume_id, "node-a2"))
    await copying(stack)
    await asyncio.to_thread(stack.rabbit.restart)  # clean stop (~8 s) and start; the copy ends meanwhile

    await publishing
    await finished(faulty.jobs, moving.disk)
    await arrived_intact(stack, moving)
    # after the restart the workers consume again: a new move goes through the queue
    fresh = await create(stack, "pvc-after-rabbit", 16 * MiB, MIGRATING, await host_segment(stack, "node-a1"))
    await publish(stack, fresh, "node-a2")
    assert await srs_of(stack, "csi-pvc-after-rabbit") == ["Local A2"]
    assert await migrations_of(stack, "csi-pvc-after-rabbit") == 1
    await queues_empty(stack)


@pytest.mark.parametrize("keep_data", [True, False], ids=["redis-restart", "redis-restart-empty"])
async def test_redis_restart_mid_flight_the_publish_still_succeeds_with_one_copy(faulty: Faulty,
                                                                                   keep_data: bool) -> None:
    """keep_data=False: Redis comes back empty (no locks, no job records); the owner writes its record back
    at its next heartbeat, and a waiter that saw the record vanish retries (ABORTED) and joins or recreates
    the job, whose worker finds XO's copy and waits for it instead of copying again."""
    stack = faulty.stack
    assert stack.redis is not None
    moving = await written_on_a1(stack, f"pvc-redis-{'kept' if keep_data else 'lost'}", DATA_BYTES)
    publishing = asyncio.create_task(publish(stack, moving.volume_id, "node-a2"))
    await copying(stack)
    await asyncio.to_thread(stack.redis.restart, keep_data=keep_data)

    await publishing
    await finished(faulty.jobs, moving.disk)
    await arrived_intact(stack, moving)


async def test_controller_restart_while_a_publish_waits_starts_no_second_job(faulty: Faulty) -> None:
    """The retried publish finds the job going on: while XO copies (two VDIs) it joins the disk's job and waits
    for it; afterwards the disk is usable from the node and is attached; no second job, one copy."""
    stack = faulty.stack
    moving = await written_on_a1(stack, "pvc-controller", 192 * MiB)  # ~6 s: outlasts the restart
    publishing = asyncio.create_task(publish(stack, moving.volume_id, "node-a2"))
    await copying(stack)
    waited_on = await faulty.jobs.get(moving.disk)
    assert waited_on is not None and waited_on.is_active
    await stack.crash_and_restart("controller")  # kill -9: the waiting call fails UNAVAILABLE and is retried

    await publishing
    record = await finished(faulty.jobs, moving.disk)
    assert (record.job_id, record.attempt) == (waited_on.job_id, 1)
    await arrived_intact(stack, moving)


async def test_malformed_message_is_dead_lettered_and_the_workers_keep_serving(faulty: Faulty) -> None:
    stack = faulty.stack
    assert stack.amqp_url is not None
    body = b'{"schema_version": 1, "job_id": "broken"'
    connection = await aio_pika.connect(stack.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(messages.JOBS_EXCHANGE)
        await exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                               routing_key=messages.JOBS_ROUTING_KEY, mandatory=True, timeout=10)
        dead_letters = await channel.get_queue(messages.DEAD_LETTER_QUEUE)

        async def dead_lettered() -> aio_pika.abc.AbstractIncomingMessage | None:
            return await dead_letters.get(no_ack=False, fail=False, timeout=5)

        dead = await eventually(dead_lettered, 20, 0.1, description="the malformed message in the dead letters")
        assert dead is not None and dead.body == body
        assert (dead.headers or {}).get(messages.HEADER_FIRST_DEATH_REASON) == "rejected"
        await dead.ack()  # taken out: the queue is empty again for whoever looks next

    fresh = await create(stack, "pvc-after-garbage", 16 * MiB, MIGRATING, await host_segment(stack, "node-a1"))
    await publish(stack, fresh, "node-a2")
    assert await srs_of(stack, "csi-pvc-after-garbage") == ["Local A2"]
    assert await migrations_of(stack, "csi-pvc-after-garbage") == 1
    assert [name for name, proc in stack.processes.items() if proc.returncode is not None] == []
    await queues_empty(stack)
