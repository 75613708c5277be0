"""Moves across pools that stopped after their target took the disk's name (steps 6-8 of
services/migrator/transfer.py) and whose job was lost, on real RabbitMQ and Redis, the simulator in real data mode:
the copy is the disk's future and only a job finishes the move, so the source's mark is never cleared under it;
and a source used since the copy was made (its mark cleared by an older controller) wins over that copy."""

from __future__ import annotations

import os
from typing import Any

import aio_pika
import pytest

from dev.wait import eventually
from services.csi_frontend.disks import Disk
from services.xo_simulator.faults import Faults
from shared import messages, transfer_marks, vdi_metadata
from shared.errors import OperationPending
from shared.messages import MigrationRequested
from shared.volume_id import by_name
from tests.support.cross_pool import (
    HOST_B1,
    INCOMING,
    POOL_B,
    SR_A1,
    SR_B1,
    VM_B1,
    assert_one_complete_disk,
    backing_path,
    finished,
    sha256_of,
    submit_to_pool_b,
    write_content,
)
from tests.support.migration import DISK, TAG, Env, Worker, vdis_named

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
CLEAR_AFTER_S = 1.0  # the controller's stale-mark bound in these tests
UNREACHABLE = {"code": 9, "message": "server unreachable"}  # XoUnavailable: retryable


async def _stopped_after_the_rename(env: Env) -> tuple[dict[str, Any], dict[str, Any]]:
    """A move to node-b1 whose source's deletion (step 7) fails every time, stopped there and its job lost: the
    worker killed and its record expired before a migrator came back to reap it. Returns (source, copy) as XAPI
    shows them: the source marked toward Local B1, the copy named after the disk with its complete transfer mark."""
    await env.sim.simulator.add_faults(Faults.parse([{"method": "vdi.delete", "error": UNREACHABLE}]))
    worker = await env.worker("w1")
    await submit_to_pool_b(env)

    def renamed() -> list[dict[str, Any]] | None:
        named = vdis_named(env.sim)
        return named if len(named) == 2 and env.sim.simulator.stats.calls["vdi.delete"] >= 1 else None

    named = await eventually(renamed, 30, 0.02, description="the copy renamed, the source's deletion refused")
    await _lose_the_job(env, worker)
    env.sim.simulator.clear_faults()
    [source] = [v for v in named if v["$SR"] == SR_A1]
    [copy] = [v for v in named if v["$SR"] == SR_B1]
    mark = transfer_marks.parse(copy["name_description"])
    assert mark is not None and (mark.state, mark.kind, mark.source) == ("complete", "move", source["id"])
    info = vdi_metadata.parse(source["name_description"])
    assert info is not None and info.in_progress_to_sr == SR_B1
    return source, copy


async def _lose_the_job(env: Env, worker: Worker) -> None:
    """As a worker killed while no other migrator runs, whose running record then expires (job_active_ttl_s): no
    record and no message (a running job's was acked when it was claimed; a hand-back the kill cut short may have
    published one, which would carry the job on, so it is purged)."""
    await worker.crash()
    await env.redis.delete(env.jobs.key(DISK))
    connection = await aio_pika.connect(env.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(messages.JOBS_QUEUE, passive=True)
        await queue.purge()


def _request(env: Env, source: dict[str, Any]) -> MigrationRequested:
    """A request of the disk for node-b1 (e.g. a stray copy of one, re-published by a reaper)."""
    return MigrationRequested(
        job_id=messages.new_job_id(), disk_name=DISK, volume_id="name:vol1", vdi_id_seen=source["id"], tag=TAG,
        vm_id=VM_B1, host_id=HOST_B1, pool_id=POOL_B, requested_at=messages.utc_now(), correlation_id="c-1")


@pytest.mark.parametrize("stream_options", [{"frontend": {"stale_mark_after_s": CLEAR_AFTER_S}}])
async def test_the_mark_of_a_source_whose_copy_took_its_name_is_never_cleared(xenv: Env) -> None:
    """No job runs on the disk any more. Past the stale-mark bound (and once the killed worker's disk lock expired),
    the controller's mark policy finds, under the disk lock, the copy that took the disk's name from this source:
    it keeps the mark (ABORTED) and the source is never attached. The job that finishes the move deletes the
    source and keeps the disk's content."""
    checksum = write_content(xenv)
    source, copy = await _stopped_after_the_rename(xenv)
    vdi = await xenv.frontend.xo.get_vdi(source["id"])
    assert vdi is not None
    disk = Disk(by_name("vol1"), vdi, vdi_metadata.parse(vdi.name_description))
    assert xenv.frontend.marks is not None
    marks = xenv.frontend.marks
    refusals = 0

    async def refused_for_the_copy() -> bool:
        nonlocal refusals
        with pytest.raises(OperationPending) as refused:
            await marks.settle(disk)
        refusals += "a migration job must finish the move" in refused.value.message
        return refusals >= 2

    await eventually(refused_for_the_copy, 15, 0.2, description="ABORTED twice for the copy, past the bound")
    [still] = [v for v in vdis_named(xenv.sim) if v["id"] == source["id"]]
    assert still["name_description"] == source["name_description"] and still["$VBDs"] == []

    await xenv.worker("w2")
    await xenv.jobs.create_or_join(request := _request(xenv, source))
    await xenv.publisher.request(request)
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    moved = assert_one_complete_disk(xenv, checksum, SR_B1)
    assert moved["id"] == copy["id"] and source["id"] not in xenv.sim.state


async def test_a_source_used_since_its_copy_was_made_is_kept_and_the_copy_deleted(xenv: Env) -> None:
    """The move stopped after its rename; then an older controller cleared the source's mark as stale and the pod
    wrote to it on node-a1. A stray request of the disk (a reaper's re-publish) settles the move: the source is not
    deleted, the copy, older, is, and the job moves the source with its new content."""
    write_content(xenv)
    source, copy = await _stopped_after_the_rename(xenv)
    info = vdi_metadata.parse(source["name_description"])
    assert info is not None
    await xenv.frontend.xo.set_vdi(source["id"], name_description=vdi_metadata.remarked(
        source["name_description"], None, info))
    fd = os.open(backing_path(xenv, source), os.O_WRONLY)
    try:
        os.pwrite(fd, b"written on node-a1 once the mark was cleared", 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    written = sha256_of(backing_path(xenv, source))

    await xenv.worker("w2")
    await xenv.jobs.create_or_join(request := _request(xenv, source))
    await xenv.publisher.request(request)
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    assert record.attempt == 2  # the first attempt deleted the copy, the second moved the source
    assert copy["id"] not in xenv.sim.state and source["id"] not in xenv.sim.state
    assert_one_complete_disk(xenv, written, SR_B1)
    assert vdis_named(xenv.sim, INCOMING) == []
