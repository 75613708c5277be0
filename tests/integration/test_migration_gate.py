"""The frontend's migration gate against real RabbitMQ and Redis: however many publishes wait at once, the frontend
keeps one events channel and one events queue (one consumer, a map of waiters), and concurrent publishes of one
disk share one job and one migration."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import pytest

from services.csi_frontend.disks import Disk
from shared import messages, metrics
from shared.errors import OperationPending
from shared.messages import FailureReason, MigrationFinished
from shared.units import GiB
from shared.volume_id import by_name
from tests.support.brokers import RabbitEndpoint, RedisEndpoint, management_client
from tests.support.e2e import vhost_of
from tests.support.migration import DISK, SR_A2, TIMEOUT_S, VM_A2, Env, open_env, two_hosts, vdis_named
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

WAITERS = 5


def _exclusive_queues(rabbit: RabbitEndpoint, amqp_url: str) -> list[dict[str, Any]]:
    with management_client(rabbit) as http:
        response = http.get(f"/api/queues/{quote(vhost_of(amqp_url), safe='')}")
        response.raise_for_status()
    return [queue for queue in response.json() if queue.get("exclusive")]


def _open_channels(env: Env) -> int:
    assert env.frontend.connection is not None
    transport = env.frontend.connection.transport
    assert transport is not None
    return sum(1 for channel in transport.connection.channels.values() if not channel.is_closed)


async def _disk(env: Env) -> Disk:
    return await env.frontend.disks.get(by_name(DISK.removeprefix("csi-")))


async def test_concurrent_first_publishes_share_one_events_channel_one_queue_one_job_and_one_migration(
    amqp_vhost: str, rabbitmq: RabbitEndpoint, redis_server: RedisEndpoint, redis_prefix: str
) -> None:
    async with open_env(amqp_vhost, redis_server, redis_prefix, topology=two_hosts(),
                        migration_rate_bps=4 * GiB) as env:
        gate, disk = env.frontend.gate, await _disk(env)
        assert gate is not None
        place = await env.frontend.attacher.place_of(VM_A2)
        enqueued, joined = metrics.JOBS_ENQUEUED._value.get(), metrics.JOBS_JOINED._value.get()
        waits = [asyncio.create_task(gate.migrate_for(disk, place, deadline_s=TIMEOUT_S)) for _ in range(WAITERS)]

        async def all_waiting() -> bool:
            return metrics.JOBS_ENQUEUED._value.get() + metrics.JOBS_JOINED._value.get() - enqueued - joined \
                == WAITERS

        await eventually(all_waiting, TIMEOUT_S, description="every publish created or joined the job")
        assert (metrics.JOBS_ENQUEUED._value.get() - enqueued, metrics.JOBS_JOINED._value.get() - joined) == (
            1, WAITERS - 1)
        assert _open_channels(env) == 2  # the publisher's and the events consumer's, not one per first publish
        [events] = _exclusive_queues(rabbitmq, amqp_vhost)  # one queue for the frontend, not one per publish

        await env.worker("w1")
        moved = await asyncio.gather(*waits)
        assert {d.vdi.sr_id for d in moved} == {SR_A2} and len({d.vdi.id for d in moved}) == 1
        assert env.sim.simulator.stats.migrations[DISK] == 1
        [vdi] = vdis_named(env.sim)
        assert vdi["$SR"] == SR_A2
        assert [q["name"] for q in _exclusive_queues(rabbitmq, amqp_vhost)] == [events["name"]]  # kept, for the next
        assert _open_channels(env) == 2


async def test_a_publish_whose_job_was_replaced_by_one_that_failed_is_aborted_not_told_that_failure(
    amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str
) -> None:
    """The publish's job ended and another attach's job of the disk replaced its record before the publish read its
    outcome; that job failed (for its own target). The publish answers ABORTED, naming both jobs, so the attacher
    retries and reads anew. Before, it answered the other job's failure as its own (FAILED_PRECONDITION here)."""
    async with open_env(amqp_vhost, redis_server, redis_prefix, topology=two_hosts()) as env:  # no migrator
        gate, disk = env.frontend.gate, await _disk(env)
        assert gate is not None
        place = await env.frontend.attacher.place_of(VM_A2)
        waiting = asyncio.create_task(gate.migrate_for(disk, place, deadline_s=TIMEOUT_S))
        ours = await eventually(lambda: env.jobs.get(DISK), TIMEOUT_S, description="the publish's job queued")
        assert ours.request is not None

        await env.redis.delete(env.jobs.key(DISK))  # ours ended, its record gone; another attach's job follows
        other = ours.request.model_copy(update={"job_id": messages.new_job_id()})
        await env.jobs.create_or_join(other)
        claim = await env.jobs.claim(other, "w-test", stale_after_s=30)
        assert claim.outcome == "claimed"
        await env.jobs.finish(claim.record, MigrationFinished(
            job_id=other.job_id, disk_name=DISK, outcome="failed",
            error=FailureReason(code="precondition_failed", message="its own target's reason", retryable=False)))

        with pytest.raises(OperationPending) as answered:
            await waiting
        assert answered.value.message == (f"job {ours.job_id} of disk {DISK} was replaced by job {other.job_id} "
                                          "(another attach asked for the disk), which failed; retry")
