"""Operating the migrator: SIGTERM (stop with grace: finish, or hand the job back), the health probes, and the
operator CLI ``xocsi jobs`` (list, dead, requeue), against real RabbitMQ and Redis and the XO simulator."""

from __future__ import annotations

import io
import json

import aiormq
import httpx
import pytest

from services.xo_simulator.faults import FaultRule
from services.xocsi import cli
from shared import messages
from shared.messages import FailureReason, MigrationRequested
from shared.progress import StreamProgress
from shared.units import GiB
from tests.support.brokers import pick_free_port
from tests.support.migration import (
    DISK,
    HOST_A2,
    POOL_A,
    SR_A2,
    TAG,
    VM_A2,
    Env,
    copying,
    dead_letters,
    ready_jobs,
    vdis_named,
)
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

TIMEOUT_S = 30.0




def _request(disk_name: str = DISK, job_id: str | None = None) -> MigrationRequested:
    return MigrationRequested(
        job_id=job_id or messages.new_job_id(), disk_name=disk_name, volume_id="name:x", vdi_id_seen="vdi-x",
        tag=TAG, vm_id=VM_A2, host_id=HOST_A2, pool_id=POOL_A, requested_at=messages.utc_now(), correlation_id="c",
    )


async def _jobs_cli(env: Env, *argv: str) -> tuple[int, str, str]:
    """``xocsi jobs ARGV`` in-process with this test's backends; (exit status, stdout, stderr)."""
    flags = {
        "list": ["--redis-url", env.redis_url, "--redis-key-prefix", env.prefix],
        "dead": ["--amqp-url", env.amqp_url],
        "requeue": ["--redis-url", env.redis_url, "--redis-key-prefix", env.prefix, "--amqp-url", env.amqp_url],
    }[argv[0]]
    out, err = io.StringIO(), io.StringIO()
    status = await cli.run(["jobs", *argv, *flags, "--timeout", "10"], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


# --- SIGTERM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 2 * GiB}])  # a 1 s copy
async def test_stop_lets_a_running_job_finish_within_the_grace_period(env: Env) -> None:
    worker = await env.worker("w1")
    await env.submit()
    await eventually(lambda: copying(env.sim), TIMEOUT_S, description="XO copies the disk")

    await worker.stop(grace_s=TIMEOUT_S)

    record = await env.jobs.get(DISK)
    assert record is not None and (record.state, record.attempt) == ("succeeded", 1)
    assert await ready_jobs(env.amqp_url) == 0
    assert env.sim.simulator.stats.migrations[DISK] == 1


async def test_stop_hands_back_a_job_that_outlives_the_grace_period(env: Env) -> None:
    first = await env.worker("w1")
    await env.submit()
    await eventually(lambda: copying(env.sim), TIMEOUT_S, description="XO copies the disk")

    await first.stop(grace_s=0.2)

    handed_back = await env.jobs.get(DISK)
    assert handed_back is not None and (handed_back.state, handed_back.attempt) == ("queued", 2)
    assert await ready_jobs(env.amqp_url) == 1
    await env.worker("w2")
    done = await eventually(env.finished, TIMEOUT_S, interval_s=0.1, description="job finished")
    assert done is not None and (done.state, done.worker, done.attempt) == ("succeeded", "w2", 2)
    assert env.sim.simulator.stats.migrations[DISK] == 1
    [vdi] = vdis_named(env.sim)
    assert vdi["$SR"] == SR_A2


# --- health -----------------------------------------------------------------------------------


async def test_health_probes_report_the_consume_loop_and_the_backends(env: Env) -> None:
    worker = await env.worker("w1", health_host="127.0.0.1", health_port=pick_free_port(), liveness_timeout_s=1.5,
                              probe_timeout_s=2)
    assert worker.migrator.health is not None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{worker.migrator.health.port}", timeout=5) as http:
        live, ready = await http.get("/livez"), await http.get("/readyz")
        assert (live.status_code, ready.status_code) == (200, 200)
        assert ready.json() == {"ok": True, "rabbitmq": "ok", "redis": "ok", "xo": "ok"}

        await env.sim.simulator.add_faults([FaultRule.model_validate(
            {"method": "xo.getAllObjects", "error": {"code": 21, "message": "operation failed"}})])
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["xo"].startswith("XoError") and ready.json()["redis"] == "ok"

        await worker.migrator.crash()  # the consume loop stops ticking; the health server still answers

        async def dead() -> bool:
            return (await http.get("/livez")).status_code == 503

        await eventually(dead, TIMEOUT_S, interval_s=0.1, description="/livez fails")
    await worker.crash()


# --- xocsi jobs -------------------------------------------------------------------------------


async def test_jobs_list_shows_jobs_in_flight_with_the_progress_of_a_stream(env: Env) -> None:
    await env.jobs.create_or_join(_request("csi-queued", "job-q"))
    claim = await env.jobs.claim(_request("csi-running", "job-r"), "w7", stale_after_s=60)
    streaming = await env.jobs.claim(_request("csi-streaming", "job-s"), "w8", stale_after_s=60)
    stream = StreamProgress(done_bytes=3 * 1024**3 // 2, total_bytes=4 * 1024**3, rate_bps=100 * 1024**2)
    assert await env.jobs.beat(streaming.record, stream)

    status, out, _ = await _jobs_cli(env, "list", "--json")
    assert status == 0
    rows = {row["disk_name"]: row for row in json.loads(out)}
    assert rows["csi-queued"]["state"] == "queued" and rows["csi-queued"]["worker"] is None
    running = rows["csi-running"]
    assert (running["kind"], running["state"], running["worker"], running["attempt"], running["target_host"],
            running["job_id"], running["progress"]) == ("migrate", "running", "w7", 1, HOST_A2, "job-r", None)
    assert 0 <= running["heartbeat_age_s"] < 10
    assert rows["csi-streaming"]["progress"] == stream.model_dump()
    assert claim.outcome == "claimed"

    status, out, _ = await _jobs_cli(env, "list")
    assert status == 0
    assert out.splitlines()[0].split() == ["DISK", "KIND", "STATE", "TARGET", "WORKER", "HEARTBEAT", "AGE",
                                           "ATTEMPT", "PROGRESS", "JOB"]
    assert "csi-running    migrate  running" in out
    assert "37% 1.5 GiB/4 GiB 100 MiB/s" in out


async def test_jobs_dead_lists_dead_letters_and_leaves_them_in_place(env: Env) -> None:
    request = _request(job_id="job-dead")
    error = FailureReason(code="capacity_exhausted", message="no SR has room", retryable=False)
    await env.publisher.dead_letter(request, reason="failed", error=error, worker="w9")

    for _ in range(2):
        status, out, _ = await _jobs_cli(env, "dead", "--json")
        assert status == 0
        [letter] = json.loads(out)
        assert (letter["job_id"], letter["disk_name"], letter["reason"], letter["worker"]) == (
            "job-dead", DISK, "failed", "w9")
        assert letter["error"] == "capacity_exhausted: no SR has room"
    assert await dead_letters(env.amqp_url) == 1

    status, out, _ = await _jobs_cli(env, "dead")
    assert status == 0 and "job-dead" in out and "capacity_exhausted: no SR has room" in out


@pytest.mark.parametrize("sim_options", [{
    "migration_rate_bps": 8 * GiB,
    "faults": [{"method": "vdi.migrate", "xapi": "TOO_MANY_STORAGE_MIGRATES", "count": 1}],
}])
async def test_jobs_requeue_sends_a_dead_letter_back_and_the_job_runs(env: Env) -> None:
    await env.worker("w1", max_attempts=1)
    request = await env.submit()
    failed = await eventually(env.finished, TIMEOUT_S, interval_s=0.05, description="job failed")
    assert failed is not None and failed.state == "failed"
    await eventually(lambda: dead_letters(env.amqp_url), TIMEOUT_S, description="job dead-lettered")

    status, _, err = await _jobs_cli(env, "requeue", "no-such-job")
    assert status == 1 and "no dead-lettered message for job no-such-job" in err
    assert await dead_letters(env.amqp_url) == 1

    status, out, err = await _jobs_cli(env, "requeue", request.job_id)
    assert status == 0, err
    assert f"job {request.job_id} (disk {DISK}) is queued again" in out

    async def succeeded() -> bool:
        record = await env.finished()
        return record is not None and record.state == "succeeded"

    await eventually(succeeded, TIMEOUT_S, interval_s=0.05, description="requeued job succeeded")
    assert await dead_letters(env.amqp_url) == 0
    assert env.sim.simulator.stats.migrations[DISK] == 1


# --- broker faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("sim_options", [{"migration_rate_bps": 8 * GiB}])
async def test_the_consumer_comes_back_after_the_broker_closes_its_channel(env: Env) -> None:
    worker = await env.worker("w1")
    assert worker.consumer.channel is not None
    underlay = await worker.consumer.channel.get_underlay_channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await underlay.queue_declare("no-such-queue", passive=True)  # the broker closes the channel (404)
    await eventually(lambda: worker.consumer.stats.channel_closed == 1, TIMEOUT_S, description="close noticed")

    await env.submit()

    done = await eventually(env.finished, TIMEOUT_S, interval_s=0.05, description="job finished")
    assert done is not None and done.state == "succeeded"
