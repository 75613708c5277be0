"""shared/jobs.py against a real Redis: the Lua state changes of a job record (create-or-join, claim, heartbeat,
hand-back, finish, the reaper's takeover) and who may make them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from shared.jobs import DEFAULT_TOMBSTONE_TTL_S, JobRecord, JobStore
from shared.keys import disk_job_key, disk_last_job_key
from shared.messages import MigrationFinished, MigrationRequested

pytestmark = pytest.mark.integration

DISK = "csi-vol1"
FRESH_S = 60.0  # stale_after_s under which nothing in these tests is stale
STALE_S = 0.0  # ... and under which everything is


def _request(job_id: str = "job-1", attempt: int = 1, minute: int = 0) -> MigrationRequested:
    """``minute``: when it was requested, in minutes after the first request of these tests."""
    return MigrationRequested(
        job_id=job_id, disk_name=DISK, volume_id="name:vol1", vdi_id_seen="vdi-1", tag="k8s", vm_id="vm-2",
        host_id="host-2", pool_id="pool-a", requested_at=datetime(2026, 1, 2, 0, minute, tzinfo=UTC),
        correlation_id="c-1", attempt=attempt,
    )


@pytest.fixture
def jobs(redis: aioredis.Redis, redis_prefix: str) -> JobStore:
    return JobStore(redis, redis_prefix, active_ttl_s=60, result_ttl_s=5)


async def _running(jobs: JobStore, worker: str = "w1", attempt: int = 1, job_id: str = "job-1",
                   minute: int = 0) -> JobRecord:
    await jobs.create_or_join(_request(job_id, minute=minute))
    claim = await jobs.claim(_request(job_id, attempt=attempt, minute=minute), worker, stale_after_s=FRESH_S)
    assert claim.outcome == "claimed"
    return claim.record


async def _finished(jobs: JobStore, job_id: str, minute: int) -> JobRecord:
    """Job ``job_id``, requested at ``minute``, run and succeeded."""
    record = await _running(jobs, job_id=job_id, minute=minute)
    assert await jobs.finish(record, MigrationFinished(job_id=job_id, disk_name=DISK, outcome="succeeded"))
    return record


async def test_create_or_join_stores_the_request_and_joins_an_active_job(jobs: JobStore) -> None:
    record, created = await jobs.create_or_join(_request("job-1"))
    assert created and record.state == "queued" and record.request == _request("job-1")
    assert record.heartbeat_ms is not None

    joined, created = await jobs.create_or_join(_request("job-2"))
    assert not created and joined.job_id == "job-1"


async def test_claim_of_a_queued_job_runs_it_under_a_new_claim(jobs: JobStore) -> None:
    record = await _running(jobs)
    assert (record.state, record.worker, record.attempt) == ("running", "w1", 1)
    assert record.claim and record.request == _request()
    assert (await jobs.get(DISK)) == record


@pytest.mark.parametrize(
    ("attempt", "stale_after_s", "outcome"),
    [
        (1, FRESH_S, "duplicate"),  # a redelivery while the holder is alive
        (2, FRESH_S, "claimed"),  # the holder is handing the job back (attempt + 1 published first)
        (1, STALE_S, "claimed"),  # the holder stopped heartbeating
    ],
)
async def test_claim_of_a_running_job(jobs: JobStore, attempt: int, stale_after_s: float, outcome: str) -> None:
    first = await _running(jobs)
    claim = await jobs.claim(_request(attempt=attempt), "w2", stale_after_s=stale_after_s)
    assert claim.outcome == outcome
    if outcome == "claimed":
        assert claim.record.worker == "w2" and claim.record.claim != first.claim
        assert claim.record.attempt == attempt
        assert not await jobs.beat(first), "the first holder lost the job"
    else:
        assert claim.record == first


async def test_claim_without_a_record_recreates_it_from_the_request(jobs: JobStore) -> None:
    claim = await jobs.claim(_request(attempt=3), "w1", stale_after_s=FRESH_S)
    assert claim.outcome == "claimed"
    assert (claim.record.state, claim.record.attempt, claim.record.request) == ("running", 3, _request(attempt=3))


async def test_claim_of_a_finished_or_superseded_job_changes_nothing(jobs: JobStore) -> None:
    record = await _running(jobs)
    assert await jobs.finish(record, MigrationFinished(job_id="job-1", disk_name=DISK, outcome="succeeded"))
    assert (await jobs.claim(_request(), "w2", stale_after_s=STALE_S)).outcome == "finished"

    other, created = await jobs.create_or_join(_request("job-2"))
    assert created, "a finished job does not block a new one"
    claim = await jobs.claim(_request("job-1", attempt=2), "w2", stale_after_s=STALE_S)
    assert claim.outcome == "superseded" and claim.record == other


async def test_a_late_copy_of_a_job_finished_before_another_finished_is_superseded(jobs: JobStore) -> None:
    """The first job's late message (a reaper's re-publish behind a backlog) would move the disk back to where the
    older attach wanted it."""
    await _finished(jobs, "job-1", minute=0)
    await _finished(jobs, "job-2", minute=5)
    claim = await jobs.claim(_request("job-1", attempt=2, minute=0), "w3", stale_after_s=STALE_S)
    assert (claim.outcome, claim.record.job_id, claim.record.state) == ("superseded", "job-2", "succeeded")
    record = await jobs.get(DISK)
    assert record is not None and (record.job_id, record.state) == ("job-2", "succeeded")


@pytest.mark.parametrize(
    ("job_id", "minute", "outcome"),
    [
        ("job-1", 5, "finished"),  # a late copy of the last finished job
        ("job-0", 0, "superseded"),  # an older job's, requested at the same time
        ("job-0", 4, "superseded"),  # an older job's, requested before it
        ("job-3", 6, "claimed"),  # a newer job whose record Redis lost: it runs
    ],
)
async def test_without_a_record_the_disks_last_finished_job_decides(jobs: JobStore, redis: aioredis.Redis,
                                                                   job_id: str, minute: int, outcome: str) -> None:
    await _finished(jobs, "job-0", minute=0)
    await _finished(jobs, "job-1", minute=5)
    await redis.delete(jobs.key(DISK))  # the result expired (result_ttl_s), or Redis lost the record
    claim = await jobs.claim(_request(job_id, attempt=2, minute=minute), "w3", stale_after_s=STALE_S)
    assert claim.outcome == outcome
    if outcome == "claimed":
        assert (claim.record.job_id, claim.record.state, claim.record.attempt) == (job_id, "running", 2)
    else:
        assert (claim.record.job_id, claim.record.state, claim.record.attempt) == ("job-1", "succeeded", 1)
        assert claim.record.request is None and claim.record.result is None, "only the job's identity is kept"
        assert await jobs.get(DISK) is None, "nothing recreated"


async def test_a_new_request_after_a_finished_job_and_a_retry_of_a_lost_job_still_run(
    jobs: JobStore, redis: aioredis.Redis
) -> None:
    await _finished(jobs, "job-1", minute=0)
    second = await _running(jobs, job_id="job-2", minute=5)  # a new attach: its own record, queued, claimed
    await redis.delete(jobs.key(DISK))  # Redis lost the running record; the hand-back's message comes
    claim = await jobs.claim(_request("job-2", attempt=2, minute=5), "w2", stale_after_s=FRESH_S)
    assert (claim.outcome, claim.record.job_id, claim.record.attempt) == ("claimed", "job-2", 2)
    assert claim.record.claim != second.claim


async def test_the_last_finished_job_keeps_the_latest_request_time_for_its_ttl(
    jobs: JobStore, redis: aioredis.Redis, redis_prefix: str
) -> None:
    """An operator's requeue of an old failed job (``xocsi jobs requeue``) may finish after a newer job: late copies
    of both are dropped."""
    await _finished(jobs, "job-2", minute=5)
    await _finished(jobs, "job-1", minute=0)
    await redis.delete(jobs.key(DISK))
    for job_id, minute, outcome in (("job-1", 0, "finished"), ("job-2", 5, "superseded")):
        assert (await jobs.claim(_request(job_id, minute=minute), "w3", stale_after_s=STALE_S)).outcome == outcome
    assert (await jobs.claim(_request("job-3", minute=6), "w3", stale_after_s=STALE_S)).outcome == "claimed"
    pttl_ms = await redis.pttl(disk_last_job_key(redis_prefix, DISK))
    assert DEFAULT_TOMBSTONE_TTL_S * 1000 - 5_000 < pttl_ms <= DEFAULT_TOMBSTONE_TTL_S * 1000


async def test_only_the_owning_claim_writes(jobs: JobStore) -> None:
    record = await _running(jobs)
    stranger = record.model_copy(update={"claim": "someone-else"})
    result = MigrationFinished(job_id="job-1", disk_name=DISK, outcome="succeeded")
    assert not await jobs.beat(stranger)
    assert await jobs.requeue(stranger, 2) is None
    assert not await jobs.finish(stranger, result)
    assert await jobs.beat(record)
    assert await jobs.finish(record, result)
    assert (await jobs.get(DISK)) is not None and (await jobs.get(DISK)).state == "succeeded"  # type: ignore[union-attr]


async def test_a_record_redis_lost_is_written_back_by_its_owner(jobs: JobStore, redis: aioredis.Redis) -> None:
    record = await _running(jobs)
    await redis.delete(jobs.key(DISK))  # Redis restarted without persistence
    assert await jobs.beat(record)
    restored = await jobs.get(DISK)
    assert restored is not None and (restored.state, restored.claim) == ("running", record.claim)

    await redis.delete(jobs.key(DISK))
    assert await jobs.finish(record, MigrationFinished(job_id="job-1", disk_name=DISK, outcome="succeeded"))
    finished = await jobs.get(DISK)
    assert finished is not None and finished.state == "succeeded", "waiters still learn the outcome"


async def test_requeue_hands_the_job_back_for_the_next_attempt(jobs: JobStore, redis: aioredis.Redis) -> None:
    record = await _running(jobs)
    queued = await jobs.requeue(record, 2)
    assert queued is not None
    assert (queued.state, queued.attempt, queued.claim, queued.worker) == ("queued", 2, None, None)
    # The attempt-2 message is claimed; a late copy of the attempt-1 message then is a duplicate.
    assert (await jobs.claim(_request(attempt=2), "w2", stale_after_s=FRESH_S)).outcome == "claimed"
    assert (await jobs.claim(_request(attempt=1), "w3", stale_after_s=FRESH_S)).outcome == "duplicate"
    assert 0 < await redis.pttl(jobs.key(DISK)) <= 60_000


async def test_finish_keeps_the_result_for_the_result_ttl(jobs: JobStore, redis: aioredis.Redis) -> None:
    record = await _running(jobs)
    await jobs.finish(record, MigrationFinished(job_id="job-1", disk_name=DISK, outcome="failed"))
    assert 0 < await redis.pttl(jobs.key(DISK)) <= 5_000


async def test_exactly_one_reaper_takes_a_stale_job_over(jobs: JobStore) -> None:
    record = await _running(jobs)
    assert await jobs.take_over(record, "reaper", stale_after_s=FRESH_S) is None, "not stale yet"

    won = await asyncio.gather(*(jobs.take_over(record, f"reaper-{n}", stale_after_s=STALE_S) for n in range(5)))
    winners = [r for r in won if r is not None]
    assert len(winners) == 1
    assert winners[0].state == "running" and winners[0].claim != record.claim
    assert not await jobs.beat(record), "the crashed worker, if it comes back, has lost the job"


async def test_abandon_deletes_only_a_queued_record_of_that_job(jobs: JobStore) -> None:
    await jobs.create_or_join(_request())
    await jobs.abandon(DISK, "job-other")
    assert await jobs.get(DISK) is not None
    await jobs.abandon(DISK, "job-1")
    assert await jobs.get(DISK) is None

    await _running(jobs)
    await jobs.abandon(DISK, "job-1")  # a worker claimed it: the publish had gone through after all
    assert await jobs.get(DISK) is not None


async def test_records_lists_readable_records_under_the_prefix(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    jobs = JobStore(redis, redis_prefix + "a*[b]:", active_ttl_s=60, result_ttl_s=5)  # glob characters escaped
    await jobs.create_or_join(_request())
    await redis.set(disk_job_key(redis_prefix + "a*[b]:", "garbage"), b"not json", px=60_000)
    await redis.set(disk_job_key(redis_prefix + "aX[b]:", DISK), _request().to_body(), px=60_000)
    records = await jobs.records()
    assert [r.disk_name for r in records] == [DISK]
    assert abs(await jobs.now_ms() - (records[0].heartbeat_ms or 0)) < 5_000
