"""Attach-time migration end to end in one process: the frontend's Attacher + QueueMigrationGate, an in-process
migrator Consumer, real RabbitMQ and Redis (per-test vhost and key prefix), and the XO simulator (helpers in
tests/support/migration.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from services.xo_simulator.topology import derived_id
from shared import messages
from shared.errors import CapacityExhausted
from shared.keys import disk_job_key, disk_lock_key
from shared.units import GiB
from shared.volume_id import by_name
from shared.xo.client import XoClient
from tests.support.brokers import RedisEndpoint
from tests.support.migration import (
    DISK,
    SR_A1,
    SR_A2,
    TIMEOUT_S,
    VM_A2,
    Env,
    dead_letters,
    open_env,
    sim_settings,
    two_hosts,
    vdis_named,
)
from tests.support.wait import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def topology() -> dict[str, Any]:
    return two_hosts()


@pytest.fixture
async def stack(
    topology: dict[str, Any], amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str
) -> AsyncIterator[Env]:
    """A frontend and one worker; a 2 GiB disk copies in ~0.5 s."""
    async with open_env(amqp_vhost, redis_server, redis_prefix, topology=topology,
                        migration_rate_bps=4 * GiB) as env:
        await env.worker("test-worker")
        yield env


def _vdis(stack: Env) -> list[dict[str, Any]]:
    return vdis_named(stack.sim)


def _migrations(stack: Env) -> int:
    return int(stack.sim.simulator.stats.migrations[DISK])


async def _dead_letters(stack: Env) -> int:
    return await dead_letters(stack.amqp_url)


async def _lock_gone(stack: Env) -> bool:
    return not await stack.redis.exists(disk_lock_key(stack.prefix, DISK))


async def _keys_gone(stack: Env) -> bool:
    return not await stack.redis.exists(disk_lock_key(stack.prefix, DISK), disk_job_key(stack.prefix, DISK))


async def test_publish_migrates_the_disk_once_then_attaches(stack: Env) -> None:
    context = await stack.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S)

    [vdi] = _vdis(stack)
    assert vdi["$SR"] == SR_A2
    assert '"inProgressToSRUUID"' not in vdi["name_description"]
    assert context["vbd"] in vdi["$VBDs"]
    assert _migrations(stack) == 1
    # the lock goes back while the outcome is announced, not before: released, not left to its TTL
    await eventually(lambda: _lock_gone(stack), 1.0, description="disk lock released")
    await eventually(lambda: _keys_gone(stack), TIMEOUT_S, description="job record expired")


async def test_concurrent_publishes_share_one_job_and_one_migration(stack: Env) -> None:
    results = await asyncio.gather(
        *(stack.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S) for _ in range(5)),
        return_exceptions=True,
    )
    # One publish at a time per volume in a controller: the first waits for the one job and attaches, the others
    # then find its VBD plugged on the node and answer its context (issue 10: no second VBD, no refusal).
    assert all(isinstance(r, dict) for r in results), results
    assert len({r["vbd"] for r in results if isinstance(r, dict)}) == 1, results
    await stack.workers[0].consumer.drain(TIMEOUT_S)
    assert _migrations(stack) == 1
    [vdi] = _vdis(stack)
    [vbd] = vdi["$VBDs"]
    assert vdi["$SR"] == SR_A2 and results[0]["vbd"] == vbd  # type: ignore[index]
    await eventually(lambda: _keys_gone(stack), TIMEOUT_S, description="lock and job records gone")


async def test_malformed_message_is_dead_lettered_and_the_worker_keeps_running(stack: Env) -> None:
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


@pytest.mark.parametrize("topology", [two_hosts(a2_size="1GiB")])
async def test_no_room_on_target_fails_the_publish_and_dead_letters_the_job(stack: Env) -> None:
    with pytest.raises(CapacityExhausted, match=r"migration of disk csi-vol1 to host .* failed: no SR usable"):
        await stack.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S)

    await eventually(lambda: _dead_letters(stack), TIMEOUT_S, description="failed job dead-lettered")
    [vdi] = _vdis(stack)
    assert vdi["$SR"] == SR_A1
    assert _migrations(stack) == 0
    await eventually(lambda: _keys_gone(stack), TIMEOUT_S, description="lock and job records gone")


async def test_a_queued_job_does_not_move_a_disk_a_node_has_plugged_since(stack: Env) -> None:
    # The CO published the volume to node-a1 (where the disk is usable) while a job for node-a2 was queued.
    vm_a1 = derived_id("vm", "Pool A", "host-a1", "node-a1")
    [vdi] = _vdis(stack)
    xo = XoClient.from_settings(sim_settings(stack.sim))
    try:
        await xo.attach_disk(vm_a1, vdi["id"])
    finally:
        await xo.close()
    await stack.submit()

    async def failed() -> Any:
        record = await stack.finished()
        return record if record is not None and record.state == "failed" else None

    record = await eventually(failed, TIMEOUT_S, description="the job failed")
    assert record.result is not None and record.result.error is not None
    assert (record.result.error.code, record.result.error.retryable) == ("precondition_failed", False)
    assert f"is plugged into VM {vm_a1}" in record.result.error.message
    assert await eventually(lambda: _dead_letters(stack), TIMEOUT_S) == 1
    [still] = _vdis(stack)
    assert (still["$SR"], _migrations(stack)) == (SR_A1, 0), "not moved under node-a1"
