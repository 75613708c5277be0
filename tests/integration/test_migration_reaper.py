"""The reaper's second duty (issue 10 item 7): a job record left ``queued`` by a frontend that crashed after writing
it and before publishing it is published again, once per ``queued_stale_after_s``, and runs exactly once; a late
copy of a finished job's request (such a re-publish, stuck behind a backlog) never runs it again; and the
``xocsi_migration_jobs_running`` gauge KEDA adds to the queue length counts a claimed job until it ends."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.xo_simulator.topology import derived_id
from shared import messages
from shared.messages import MigrationRequested
from tests.support.migration import (
    DISK,
    HOST_A2,
    POOL_A,
    SR_A1,
    SR_A2,
    TAG,
    TIMEOUT_S,
    VM_A2,
    Env,
    copying,
    ready_jobs,
    vdis_named,
)
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

FAST_REAPER = {"reaper_interval_s": 0.2, "queued_stale_after_s": 1.0}
HOST_A1 = derived_id("host", "Pool A", "host-a1")
VM_A1 = derived_id("vm", "Pool A", "host-a1", "node-a1")


def _request(env: Env) -> MigrationRequested:
    [vdi] = vdis_named(env.sim)
    return MigrationRequested(
        job_id=messages.new_job_id(), disk_name=DISK, volume_id="name:x", vdi_id_seen=vdi["id"], tag=TAG,
        vm_id=VM_A2, host_id=HOST_A2, pool_id=POOL_A, requested_at=messages.utc_now(), correlation_id="c-1")


async def _finished_job(env: Env, job_id: str) -> bool:
    record = await env.finished()
    return record is not None and record.job_id == job_id


def _running() -> float:
    return REGISTRY.get_sample_value("xocsi_migration_jobs_running") or 0.0


async def test_a_queued_record_never_published_is_republished_and_runs_once(env: Env) -> None:
    request = _request(env)
    _, created = await env.jobs.create_or_join(request)  # the frontend wrote the record, then crashed:
    assert created  # no message carries the job

    worker = await env.worker("reaper-worker", **FAST_REAPER)
    record = await eventually(lambda: env.finished(), TIMEOUT_S, description="the lost job ran")
    assert record.job_id == request.job_id and record.state == "succeeded"
    [vdi] = vdis_named(env.sim)
    assert vdi["$SR"] == SR_A2
    assert int(env.sim.simulator.stats.migrations[DISK]) == 1
    assert worker.consumer.stats.claimed == 1

    # a late copy of the same job (the first publish was only slow after all) is dropped by the claim
    await env.publisher.request(request)
    await worker.consumer.drain(TIMEOUT_S)
    assert worker.consumer.stats.dropped == {"finished": 1}
    assert int(env.sim.simulator.stats.migrations[DISK]) == 1


async def test_a_late_copy_of_a_job_finished_before_another_never_moves_the_disk_back(env: Env) -> None:
    """Job 1 moved the disk to host-a2, job 2 (the pod back on node-a1) moved it back; a late copy of job 1's request
    then comes, after job 2's record expired too: it is dropped, not run again."""
    worker = await env.worker("w1", job_result_ttl_s=60)  # job 2's record stays until the test deletes it
    first = await env.submit()
    await eventually(lambda: _finished_job(env, first.job_id), TIMEOUT_S, description="job 1 finished")
    second = await env.submit(vm_id=VM_A1, host_id=HOST_A1)
    await eventually(lambda: _finished_job(env, second.job_id), TIMEOUT_S, description="job 2 finished")
    assert [vdi["$SR"] for vdi in vdis_named(env.sim)] == [SR_A1]

    await env.publisher.request(first)  # while job 2's record is still there
    await worker.consumer.drain(TIMEOUT_S)
    await env.redis.delete(env.jobs.key(DISK))  # job 2's record expired (its result TTL)
    await env.publisher.request(first.with_attempt(2))
    await worker.consumer.drain(TIMEOUT_S)

    assert worker.consumer.stats.dropped == {"superseded": 2}
    assert worker.consumer.stats.claimed == 2
    assert [vdi["$SR"] for vdi in vdis_named(env.sim)] == [SR_A1]
    assert int(env.sim.simulator.stats.migrations[DISK]) == 2


async def test_a_queued_record_is_republished_once_per_interval_not_every_sweep(env: Env) -> None:
    request = _request(env)
    await env.jobs.create_or_join(request)
    worker = await env.worker("sweeping-worker", reaper_interval_s=3600, queued_stale_after_s=1.0)
    reaper = worker.consumer._reaper  # noqa: SLF001  (its sweep, driven by hand: no timing involved)
    assert await reaper.sweep() == 0  # younger than queued_stale_after_s: its message may be on its way
    record = await env.jobs.get(DISK)
    assert record is not None
    await env.redis.eval("local r = cjson.decode(redis.call('GET', KEYS[1])); r.heartbeat_ms = r.heartbeat_ms - 5000;"
                         " redis.call('SET', KEYS[1], cjson.encode(r), 'KEEPTTL')", 1, env.jobs.key(DISK))
    assert await reaper.sweep() == 1
    assert await reaper.sweep() == 0  # touched: the next re-publish waits another queued_stale_after_s
    await eventually(lambda: env.finished(), TIMEOUT_S, description="the job ran")
    assert int(env.sim.simulator.stats.migrations[DISK]) == 1


async def test_the_running_gauge_counts_a_claimed_job_until_it_ends(env: Env) -> None:
    before = _running()
    await env.worker("gauge-worker")
    await env.submit()
    await eventually(lambda: copying(env.sim), TIMEOUT_S, description="the copy runs")
    assert _running() == before + 1
    assert await ready_jobs(env.amqp_url) == 0  # RabbitMQ no longer sees it: the gauge is what counts it
    await eventually(lambda: env.finished(), TIMEOUT_S, description="the job finished")
    # the record is written before the job's task ends (and the gauge goes down): wait for the task, not the record
    await eventually(lambda: _running() == before, TIMEOUT_S, description="the gauge back to its value before")
