"""Migrations longer than RabbitMQ's consumer_timeout, worker crashes, retries and dead-lettering, against a
RabbitMQ of this module's own that times out unacked deliveries after 3 s (consumer_timeout 3000 ms checked on
a 1 s channel tick: a channel holding a delivery unacked is closed after ~4 s), the XO simulator copying the
2 GiB disk in ~8 s, and in-process workers (services/migrator) with their own connections."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from structlog.testing import capture_logs

from services.xo_simulator.topology import derived_id
from shared import messages, vdi_metadata
from shared.errors import BackendUnavailable
from shared.messages import MigrationFinished
from shared.units import GiB
from shared.volume_id import by_name
from shared.xo.client import XoClient
from shared.xo.models import Vdi
from tests.support import brokers
from tests.support.brokers import LocalRabbit, RabbitEndpoint
from tests.support.migration import (
    DESCRIPTION,
    DISK,
    SR_A1,
    SR_A2,
    VM_A2,
    Env,
    Worker,
    copying,
    dead_letters,
    ready_jobs,
    sim_settings,
    two_hosts,
    vdis_named,
)
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

COPY_S = 8  # the simulated copy of the 2 GiB disk: twice the broker's ~4 s ack timeout
STRICT_RABBIT_CONFIG = "{consumer_timeout, 3000}, {channel_tick_interval, 1000}"
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
TIMEOUT_S = 30.0
BUSY = {"method": "vdi.migrate", "xapi": "TOO_MANY_STORAGE_MIGRATES"}


@pytest.fixture(scope="module")
def strict_rabbitmq() -> Iterator[RabbitEndpoint]:
    """A RabbitMQ node for this module only, with the 3 s consumer_timeout (3.10 has no per-queue setting)."""
    if not RABBITMQ_SERVER.exists():
        pytest.skip(f"needs a local RabbitMQ ({RABBITMQ_SERVER}) to configure consumer_timeout")
    node = LocalRabbit(extra_rabbit_config=STRICT_RABBIT_CONFIG)
    try:
        node.start()
        yield node.endpoint
    finally:
        node.stop()


@pytest.fixture
def copy_s() -> float:
    return COPY_S


@pytest.fixture
def env_vhost(strict_rabbitmq: RabbitEndpoint, request: pytest.FixtureRequest) -> Iterator[str]:
    with brokers.temporary_vhost(strict_rabbitmq, "t-" + brokers.unique_name(request.node.name)) as url:
        yield url




def _migrations(env: Env) -> int:
    return int(env.sim.simulator.stats.migrations[DISK])


async def _never_ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


async def _ack_timeout_closes(amqp_url: str) -> BaseException | None:
    """Hold one delivery unacked and return what the broker closed the channel with (the module's premise)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        closed: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        channel.close_callbacks.add(lambda _ch, exc: None if closed.done() else closed.set_result(exc))
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"held"), routing_key=queue.name)
        await queue.consume(_never_ack)
        async with asyncio.timeout(TIMEOUT_S):
            return await closed


async def test_a_migration_longer_than_the_consumer_timeout_completes_once(env: Env) -> None:
    worker = await env.worker("w1")
    canary = asyncio.create_task(_ack_timeout_closes(env.amqp_url))

    await env.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S)

    assert "PRECONDITION_FAILED" in repr(await canary), "the broker times unacked deliveries out"
    [vdi] = vdis_named(env.sim)
    assert vdi["$SR"] == SR_A2
    assert _migrations(env) == 1
    record = await env.jobs.get(DISK)
    assert record is not None and record.state == "succeeded" and record.attempt == 1
    assert record.result is not None and record.result.duration_s >= 5, "longer than the ack timeout"
    stats = worker.consumer.stats
    assert (stats.channel_closed, stats.delivered, stats.claimed, stats.dropped) == (0, 1, 1, {})


async def test_a_worker_killed_mid_copy_is_reaped_and_the_job_completes_once(env: Env) -> None:
    first = await env.worker("w1")
    await env.submit()
    await eventually(lambda: copying(env.sim), TIMEOUT_S, description="XO copies the disk")
    await first.crash()
    stale = await env.jobs.get(DISK)
    assert stale is not None and (stale.state, stale.worker) == ("running", "w1")

    await _completed_once_by_a_second_worker(env)


async def test_a_worker_cut_off_from_redis_gives_its_job_up_before_it_can_be_reaped(env: Env) -> None:
    """Its heartbeats fail (connection refused) while XO still answers it: it cannot see a reaper take the job
    over, so it cancels its handler before the record is stale; the job then moves on once, to another worker."""
    first = await env.worker("w1")
    await env.submit()
    await eventually(lambda: copying(env.sim), TIMEOUT_S, description="XO copies the disk")
    with capture_logs() as logs:
        await brokers.cut_off(first.migrator.redis)
        lost = await eventually(lambda: _lost_jobs(logs), TIMEOUT_S, interval_s=0.02, description="w1 gives up")
        held = await env.jobs.get(DISK)
        now_ms = await env.jobs.now_ms()
    assert [entry["reason"].startswith("no heartbeat reached Redis for ") for entry in lost] == [True]
    assert held is not None and (held.state, held.worker, held.attempt) == ("running", "w1", 1)
    age_s = held.age_s(now_ms)
    assert age_s is not None and age_s < first.settings.stale_after_s, "given up before a reaper could take it"

    await _completed_once_by_a_second_worker(env)


async def _completed_once_by_a_second_worker(env: Env) -> None:
    """A second worker's reaper hands the job on (attempt 2) and the job completes without a second copy."""
    second = await env.worker("w2")
    done = await eventually(env.finished, TIMEOUT_S, interval_s=0.1, description="job finished")

    assert done is not None and (done.state, done.worker, done.attempt) == ("succeeded", "w2", 2)
    assert _migrations(env) == 1, "the copy XO went on with was awaited, not repeated"
    [vdi] = vdis_named(env.sim)
    assert vdi["$SR"] == SR_A2
    assert '"inProgressToSRUUID"' not in vdi["name_description"]
    assert second.consumer.stats.claimed == 1


def _lost_jobs(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "migration_finished" and entry.get("outcome") == "lost"]


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 4 * GiB, "faults": [{**BUSY, "count": 2}]}])
async def test_a_retryable_xo_error_is_retried_and_succeeds(env: Env) -> None:
    await env.worker("w1")

    await env.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S)

    record = await env.jobs.get(DISK)
    assert record is not None and (record.state, record.attempt) == ("succeeded", 3)
    assert _migrations(env) == 1
    assert await dead_letters(env.amqp_url) == 0


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 4 * GiB, "faults": [BUSY]}])
async def test_attempts_exhausted_dead_letter_the_job_and_announce_the_failure(env: Env) -> None:
    await env.worker("w1", max_attempts=3)
    connection = await aio_pika.connect(env.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        events = await channel.declare_queue(exclusive=True)
        await events.bind(messages.EVENTS_EXCHANGE, routing_key=messages.events_routing_key(DISK))

        with pytest.raises(BackendUnavailable, match=r"failed after retries: .*TOO_MANY_STORAGE_MIGRATES"):
            await env.attacher.publish(by_name("vol1"), VM_A2, False, deadline_s=TIMEOUT_S)

        event = await eventually(lambda: events.get(fail=False), TIMEOUT_S, description="failed event")
        dead = await channel.get_queue(messages.DEAD_LETTER_QUEUE)
        letter = await eventually(lambda: dead.get(fail=False), TIMEOUT_S, description="dead letter")
    assert event is not None and letter is not None
    failed = messages.parse_finished(event.body)

    assert isinstance(failed, MigrationFinished) and failed.outcome == "failed"
    assert failed.error is not None and (failed.error.code, failed.error.retryable) == ("xo_busy", True)
    headers = letter.headers or {}
    assert headers[messages.HEADER_REASON] == "attempts_exhausted"
    assert headers[messages.HEADER_ERROR_CODE] == "xo_busy"
    assert headers[messages.HEADER_ATTEMPT] == 3
    assert messages.parse_requested(letter.body).job_id == failed.job_id == letter.message_id
    record = await env.jobs.get(DISK)
    assert record is not None and (record.state, record.attempt) == ("failed", 3)
    [vdi] = vdis_named(env.sim)
    assert vdi["$SR"] == SR_A1 and _migrations(env) == 0


SMALL_DISK = "csi-vol2"


@pytest.mark.parametrize("sim_options", [{
    "migration_rate_bps": 2 * GiB // 5,  # csi-vol1 copies in 5 s, past the ack timeout; csi-vol2 in 1.25 s
    "topology": two_hosts(extra_vdis=({"name_label": SMALL_DISK, "name_description": DESCRIPTION,
                                       "size": "512MiB", "sr": "Local A1"},)),
}])
async def test_a_job_waiting_for_a_free_slot_stays_in_the_queue_not_unacked(env: Env) -> None:
    worker = await env.worker("w1", concurrency=1, prepare_ahead=0)
    await env.submit(DISK)
    await eventually(lambda: copying(env.sim), TIMEOUT_S, description="XO copies the first disk")
    await env.submit(SMALL_DISK)

    assert await ready_jobs(env.amqp_url) == 1, "the full worker paused its consumer: nothing delivered"
    for disk in (DISK, SMALL_DISK):
        done = await eventually(functools.partial(env.finished, disk), TIMEOUT_S, interval_s=0.1,
                                description=f"{disk} migrated")
        assert done is not None and (done.state, done.attempt) == ("succeeded", 1)
    stats = worker.consumer.stats
    assert (stats.channel_closed, stats.delivered, stats.claimed) == (0, 2, 2), "no delivery timed out"
    assert env.sim.simulator.stats.migrations[SMALL_DISK] == 1


@pytest.mark.parametrize("sim_options", [{
    "migration_rate_bps": 4 * GiB,  # copies of 0.5 s and 0.125 s
    "cache_lag_ms": 2000,  # XO's cache shows each write 2 s after XO answered it
    "topology": two_hosts(extra_vdis=({"name_label": SMALL_DISK, "name_description": DESCRIPTION,
                                       "size": "512MiB", "sr": "Local A1"},)),
}])
async def test_a_slot_goes_back_once_xo_finished_the_copy_not_after_the_waits_for_its_cache(env: Env) -> None:
    worker = await env.worker("w1", concurrency=1, prepare_ahead=0)
    await env.submit(DISK)
    await env.submit(SMALL_DISK)

    async def second_claimed() -> tuple[str, str] | None:
        second = await env.jobs.get(SMALL_DISK)
        if second is None or second.state != "running":
            return None
        first = await env.jobs.get(DISK)
        assert first is not None
        return first.state, second.worker or ""

    # The first job still waits 2 s for XO's cache to show its cleared mark and its source gone when the second,
    # on the same one-slot worker, is claimed.
    assert await eventually(second_claimed, TIMEOUT_S, interval_s=0.02) == ("running", "w1")
    for disk in (DISK, SMALL_DISK):
        done = await eventually(functools.partial(env.finished, disk), TIMEOUT_S, interval_s=0.1,
                                description=f"{disk} migrated")
        assert done is not None and (done.state, done.attempt) == ("succeeded", 1)
        assert env.sim.simulator.stats.migrations[disk] == 1
    assert (worker.consumer.stats.delivered, worker.consumer.stats.claimed) == (2, 2)


THIRD_DISK = "csi-vol3"
_THREE_DISKS = two_hosts(extra_vdis=tuple(
    {"name_label": name, "name_description": DESCRIPTION, "size": "512MiB", "sr": "Local A1"}
    for name in (SMALL_DISK, THIRD_DISK)))


def _started(env: Env, disk: str) -> bool:
    """XO copies ``disk`` now or has copied it (its VDI left Local A1)."""
    return any(o.get("current_operations") or o["$SR"] == SR_A2 for o in vdis_named(env.sim, disk))


async def _second_prepared_ahead(env: Env) -> Worker:
    """Worker w1 (one copy slot, prepare-ahead 1: the default) copies csi-vol1 and has claimed, locked and read
    csi-vol2, which waits for its copy slot."""
    worker = await env.worker("w1", concurrency=1)
    await env.submit(DISK)
    await eventually(lambda: copying(env.sim), TIMEOUT_S, description="XO copies the first disk")
    await env.submit(SMALL_DISK)

    async def prepared() -> bool:
        record = await env.jobs.get(SMALL_DISK)
        return record is not None and (record.state, record.worker) == ("running", "w1")

    await eventually(prepared, TIMEOUT_S, description="the second job claimed by the busy worker")
    return worker


@pytest.mark.parametrize("sim_options", [{
    "migration_rate_bps": 2 * GiB // 5,  # csi-vol1 copies in 5 s, past the ack timeout; the others in 1.25 s
    "topology": _THREE_DISKS,
}])
async def test_a_busy_worker_prepares_one_job_ahead_which_copies_as_soon_as_the_slot_frees(env: Env) -> None:
    worker = await _second_prepared_ahead(env)
    await env.submit(THIRD_DISK)
    assert await ready_jobs(env.amqp_url) == 1, "one job ahead at most: the third stays in the queue"
    assert not _started(env, SMALL_DISK), "the prepared job waits for the worker's copy slot"
    for disk in (DISK, SMALL_DISK, THIRD_DISK):
        done = await eventually(functools.partial(env.finished, disk), TIMEOUT_S, interval_s=0.1,
                                description=f"{disk} migrated")
        assert done is not None and (done.state, done.attempt) == ("succeeded", 1)
        assert env.sim.simulator.stats.migrations[disk] == 1
    stats = worker.consumer.stats
    assert (stats.channel_closed, stats.delivered, stats.claimed) == (0, 3, 3), "no delivery timed out"


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 2 * GiB // 5, "topology": _THREE_DISKS}])
async def test_a_job_goes_to_a_worker_with_a_free_copy_slot_before_one_that_would_prepare_it(env: Env) -> None:
    busy = await env.worker("w1", concurrency=1)
    await env.submit(DISK)
    await eventually(lambda: copying(env.sim), TIMEOUT_S, description="w1 copies the first disk")
    await env.worker("w2", concurrency=1)

    await env.submit(SMALL_DISK)  # both consume it: w1 to prepare it ahead (priority 0), w2 to copy it (priority 10)

    async def claimed_by() -> str | None:
        record = await env.jobs.get(SMALL_DISK)
        return record.worker if record is not None and record.state == "running" else None

    assert await eventually(claimed_by, TIMEOUT_S, interval_s=0.02) == "w2"
    done = await eventually(functools.partial(env.finished, SMALL_DISK), TIMEOUT_S, interval_s=0.1)
    assert done is not None and done.state == "succeeded"
    assert copying(env.sim), "w2 copied the second disk while w1 still copied the first"
    assert busy.consumer.stats.claimed == 1


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 2 * GiB // 10, "topology": _THREE_DISKS}])
async def test_a_prepared_job_goes_back_unstarted_when_its_worker_stays_busy_and_another_worker_takes_it(
        env: Env) -> None:
    first = await env.worker("w1", concurrency=1, prepared_wait_s=0.5)  # csi-vol1 copies in 10 s
    await env.submit(DISK)
    await eventually(lambda: copying(env.sim), TIMEOUT_S, description="w1 copies the first disk")
    await env.submit(SMALL_DISK)

    async def given_back() -> bool:
        return first.consumer.stats.claimed >= 3  # claimed, given back after 0.5 s, claimed again, ...

    await eventually(given_back, TIMEOUT_S, description="the prepared job given back and taken again")
    await env.worker("w2", concurrency=1)
    done = await eventually(functools.partial(env.finished, SMALL_DISK), TIMEOUT_S, interval_s=0.1,
                            description="the second disk migrated by the new worker")
    assert done is not None and (done.state, done.attempt) == ("succeeded", 1), "a give-back is no attempt"
    assert copying(env.sim), "long before w1 finished its copy"
    assert env.sim.simulator.stats.migrations[SMALL_DISK] == 1
    assert await dead_letters(env.amqp_url) == 0


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 2 * GiB // 5, "topology": _THREE_DISKS}])
async def test_a_prepared_job_whose_disk_changed_while_it_waited_acts_on_a_new_read_not_the_old_one(
        env: Env) -> None:
    await _second_prepared_ahead(env)  # csi-vol1 copies in 5 s while csi-vol2 waits for the copy slot

    # The job waits with the disk marked (being migrated). Once XO's cache shows the mark, someone (an operator,
    # another tool) writes a field of their own into the disk's description.
    xo = XoClient.from_settings(sim_settings(env.sim))
    try:
        [small] = vdis_named(env.sim, SMALL_DISK)

        async def marked() -> Vdi | None:
            vdi = await xo.get_vdi(small["id"])
            info = vdi_metadata.parse(vdi.name_description) if vdi is not None else None
            return vdi if info is not None and info.in_progress_to_sr == SR_A2 else None

        shown = await eventually(marked, TIMEOUT_S, description="the waiting job's mark in XO's cache")
        assert shown is not None
        await xo.set_vdi(shown.id, name_description=shown.name_description[:-1] + ',"note":"kept"}')
    finally:
        await xo.close()
    edited = DESCRIPTION[:-1] + ',"note":"kept"}'

    done = await eventually(functools.partial(env.finished, SMALL_DISK), TIMEOUT_S, interval_s=0.1,
                            description="the second disk migrated")
    assert done is not None and (done.state, done.attempt) == ("succeeded", 2), "run again from a new read"
    [moved] = vdis_named(env.sim, SMALL_DISK)
    assert (moved["$SR"], moved["name_description"]) == (SR_A2, edited), "the edit is kept, the mark cleared"
    assert env.sim.simulator.stats.migrations[SMALL_DISK] == 1


async def _while_prepared_with_an_unplugged_vbd(env: Env, act: Callable[[XoClient, str], Awaitable[None]]) -> str:
    """csi-vol2 gets an unplugged VBD on node-a1 (its VM was stopped without an unpublish: the job may move it), its
    job is prepared ahead by a busy worker (csi-vol1 copies in 5 s meanwhile), then ``act(xo, vbd_id)`` changes that
    VBD while the job waits for its copy slot. Returns node-a1's VM."""
    vm_a1 = derived_id("vm", "Pool A", "host-a1", "node-a1")
    xo = XoClient.from_settings(sim_settings(env.sim))
    try:
        [small] = vdis_named(env.sim, SMALL_DISK)
        vbd = await xo.attach_disk(vm_a1, small["id"])
        await xo.session.call("vbd.disconnect", {"id": vbd.id})
        await _second_prepared_ahead(env)
        await act(xo, vbd.id)
    finally:
        await xo.close()
    return vm_a1


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 2 * GiB // 5, "topology": _THREE_DISKS}])
async def test_a_prepared_job_does_not_move_a_disk_whose_vbd_a_node_plugged_while_it_waited(env: Env) -> None:
    # node-a1 starts again and plugs it: it uses the disk where it is
    vm_a1 = await _while_prepared_with_an_unplugged_vbd(env, lambda xo, vbd_id: xo.connect_vbd(vbd_id))

    async def failed() -> MigrationFinished | None:
        record = await env.finished(SMALL_DISK)
        return record.result if record is not None and record.state == "failed" else None

    result = await eventually(failed, TIMEOUT_S, interval_s=0.1, description="the second job failed")
    assert result is not None and result.error is not None
    assert (result.error.code, result.error.retryable) == ("precondition_failed", False)
    assert f"is plugged into VM {vm_a1}" in result.error.message
    [still] = vdis_named(env.sim, SMALL_DISK)
    assert (still["$SR"], env.sim.simulator.stats.migrations.get(SMALL_DISK, 0)) == (SR_A1, 0), "not moved under it"
    done = await eventually(functools.partial(env.finished, DISK), TIMEOUT_S, interval_s=0.1)
    assert done is not None and (done.state, env.sim.simulator.stats.migrations[DISK]) == ("succeeded", 1)


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 2 * GiB // 5, "topology": _THREE_DISKS}])
async def test_a_prepared_job_whose_disk_lost_a_vbd_while_it_waited_moves_it_on_its_first_attempt(env: Env) -> None:
    # node-a1's node unpublishes it: the VBD goes
    await _while_prepared_with_an_unplugged_vbd(env, lambda xo, vbd_id: xo.delete_vbd(vbd_id))

    done = await eventually(functools.partial(env.finished, SMALL_DISK), TIMEOUT_S, interval_s=0.1,
                            description="the second disk migrated")
    assert done is not None and (done.state, done.attempt) == ("succeeded", 1), "a VBD gone changes nothing: no retry"
    [moved] = vdis_named(env.sim, SMALL_DISK)
    assert (moved["$SR"], moved["$VBDs"]) == (SR_A2, [])
    assert env.sim.simulator.stats.migrations[SMALL_DISK] == 1


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 2 * GiB // 10, "topology": _THREE_DISKS}])
async def test_a_job_prepared_ahead_goes_back_with_its_attempt_when_its_worker_stops(env: Env) -> None:
    first = await _second_prepared_ahead(env)  # csi-vol1 copies in 10 s while csi-vol2 waits for the copy slot
    await first.stop(grace_s=0.5)  # a scale-down: the running copy is handed back, the prepared job given back

    async def queued_again() -> bool:
        record = await env.jobs.get(SMALL_DISK)
        return record is not None and (record.state, record.attempt) == ("queued", 1)

    assert await eventually(queued_again, TIMEOUT_S, interval_s=0.05) is True
    assert not _started(env, SMALL_DISK), "no copy started as the worker stopped"
    await env.worker("w2", concurrency=1)
    done = await eventually(functools.partial(env.finished, SMALL_DISK), TIMEOUT_S, interval_s=0.1,
                            description="the second disk migrated by the next worker")
    assert done is not None and (done.state, done.attempt) == ("succeeded", 1), "no attempt spent: it never began"
    assert env.sim.simulator.stats.migrations[SMALL_DISK] == 1
