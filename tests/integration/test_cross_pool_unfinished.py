"""Moves across pools that stopped after their target took the disk's name (steps 6-8 of
services/migrator/transfer.py), on real RabbitMQ and Redis, the simulator in real data mode. The copy is the disk's
future and only a job finishes the move: the source's mark is never cleared under it; a job failing there is
retried past max_attempts; a publish finding the move with its job lost enqueues one, on either pool, and gets the
disk with its content. A source used since the copy was made (its mark cleared by an older controller) wins over
that copy."""

from __future__ import annotations

import os
from typing import Any

import aio_pika
import pytest

from dev.wait import eventually
from services.csi_frontend.disks import Disk
from services.xo_simulator.faults import Faults
from services.xo_simulator.topology import derived_id
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
from tests.support.migration import DISK, TAG, Env, Worker, dead_letters, vdis_named

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
VM_A1 = derived_id("vm", "Pool A", "host-a1", "node-a1")
CLEAR_AFTER_S = 1.0  # the controller's stale-mark bound in these tests
UNREACHABLE = {"code": 9, "message": "server unreachable"}  # XoUnavailable: retryable


async def _stopped_after_the_rename(env: Env) -> tuple[dict[str, Any], dict[str, Any]]:
    """A move to node-b1 whose source's deletion (step 7) fails every time, stopped there and its job lost
    (``_lose_the_job``). Returns (source, copy) as XAPI shows them: the source marked toward Local B1, the copy
    named after the disk with its complete transfer mark."""
    named = await _stopped(env, {"method": "vdi.delete", "error": UNREACHABLE}, "vdi.delete", 2)
    [source] = [v for v in named if v["$SR"] == SR_A1]
    [copy] = [v for v in named if v["$SR"] == SR_B1]
    mark = transfer_marks.parse(copy["name_description"])
    assert mark is not None and (mark.state, mark.kind, mark.source) == ("complete", "move", source["id"])
    info = vdi_metadata.parse(source["name_description"])
    assert info is not None and info.in_progress_to_sr == SR_B1
    return source, copy


async def _stopped_after_the_source_s_deletion(env: Env) -> dict[str, Any]:
    """A move to node-b1 whose last step (8: the copy's csi:info, the fourth vdi.set of a move) fails every time,
    stopped there and its job lost: the copy, named after the disk with its complete transfer mark, alone."""
    [copy] = await _stopped(env, {"method": "vdi.set", "after_calls": 3, "error": UNREACHABLE}, "vdi.set", 1,
                            calls=4)
    assert copy["$SR"] == SR_B1 and transfer_marks.is_marked(copy["name_description"])
    return copy


async def _stopped(env: Env, fault: dict[str, Any], method: str, vdis: int, *, calls: int = 1
                   ) -> list[dict[str, Any]]:
    """Run a move to node-b1 with ``fault`` until ``vdis`` VDIs carry the disk's name (one of them renamed) and
    ``method`` was called ``calls`` times, then lose its job and clear the fault; the VDIs named after the disk."""
    await env.sim.simulator.add_faults(Faults.parse([fault]))
    worker = await env.worker("w1")
    await submit_to_pool_b(env)

    def stopped() -> list[dict[str, Any]] | None:
        named = vdis_named(env.sim)
        renamed = any(transfer_marks.is_marked(v["name_description"]) for v in named)
        return named if renamed and len(named) == vdis and env.sim.simulator.stats.calls[method] >= calls else None

    named = await eventually(stopped, 30, 0.02, description=f"the move stopped at its failing {method}")
    await _lose_the_job(env, worker)
    env.sim.simulator.clear_faults()
    return named


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


@pytest.mark.parametrize("stream_options", [{"frontend": {"stale_mark_after_s": CLEAR_AFTER_S}}])
async def test_a_publish_on_the_source_s_pool_has_a_job_finish_the_move_then_bring_the_disk_back(xenv: Env) -> None:
    """The move stopped after its rename and its job was lost; the pod goes back to node-a1, where the source is.
    Its publish does not attach the source: finding the copy that took the disk's name and no job active, it
    enqueues one for node-a1 and waits for it (ABORTED while no migrator runs; a retry then finds that job active:
    ABORTED). The job finishes the move (the source deleted) and brings the disk back: one disk, on node-a1's SR,
    with its content."""
    checksum = write_content(xenv)
    source, copy = await _stopped_after_the_rename(xenv)
    await _no_migrator_yet(xenv, VM_A1)
    assert [v["$VBDs"] for v in vdis_named(xenv.sim) if v["id"] == source["id"]] == [[]]

    await xenv.worker("w2")
    context = await _published(xenv, VM_A1)
    back = assert_one_complete_disk(xenv, checksum, SR_A1)
    assert context["vbd"] in back["$VBDs"]
    assert source["id"] not in xenv.sim.state and copy["id"] not in xenv.sim.state
    assert xenv.sim.simulator.stats.streams["rest.vdi.import"] == 2  # into pool B, then back into pool A


async def test_a_publish_of_a_move_stopped_after_its_source_was_deleted_has_a_job_finish_it(xenv: Env) -> None:
    """The move stopped after its source was deleted, before the copy got its csi:info, and its job was lost: the
    copy with its transfer mark is the only VDI of the disk. A publish enqueues a job, which finishes the move."""
    checksum = write_content(xenv)
    copy = await _stopped_after_the_source_s_deletion(xenv)
    await _no_migrator_yet(xenv, VM_B1)

    await xenv.worker("w2")
    context = await _published(xenv, VM_B1)
    moved = assert_one_complete_disk(xenv, checksum, SR_B1)
    assert moved["id"] == copy["id"] and context["vbd"] in moved["$VBDs"]


async def test_a_move_failing_after_its_rename_is_retried_past_max_attempts_until_it_is_finished(xenv: Env) -> None:
    """XO refuses the last step of the move (the copy's csi:info) for longer than the job's attempts last: the job
    is handed back again and again, never failed (no dead letter), and finishes once XO takes the step."""
    checksum = write_content(xenv)
    await xenv.sim.simulator.add_faults(Faults.parse([{"method": "vdi.set", "after_calls": 3, "error": UNREACHABLE}]))
    await xenv.worker("w1", max_attempts=2)
    await submit_to_pool_b(xenv)

    async def retried_past_the_limit() -> bool:
        record = await xenv.jobs.get(DISK)
        assert record is not None and record.is_active, record
        return record.attempt >= 4

    await eventually(retried_past_the_limit, 30, 0.05, description="the job at its fourth attempt, still active")
    assert await dead_letters(xenv.amqp_url) == 0
    xenv.sim.simulator.clear_faults()
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    context = await _published(xenv, VM_B1)
    moved = assert_one_complete_disk(xenv, checksum, SR_B1)
    assert context["vbd"] in moved["$VBDs"]


async def _no_migrator_yet(env: Env, node: str) -> None:
    """With no migrator running: a publish to ``node`` enqueues the job that finishes the move and waits for it
    until its deadline (ABORTED "still running"); the next one finds that job active (ABORTED)."""
    with pytest.raises(OperationPending, match="still running"):
        await env.attacher.publish(by_name("vol1"), node, False, deadline_s=3)
    record = await env.jobs.get(DISK)
    assert record is not None and (record.state, record.target_host) == ("queued", _host_of(env, node))
    with pytest.raises(OperationPending, match=f"job {record.job_id} \\(queued\\) is finishing its move"):
        await env.attacher.publish(by_name("vol1"), node, False, deadline_s=3)


def _host_of(env: Env, vm_id: str) -> str:
    return str(env.sim.state.get(vm_id)["$container"])


async def _published(env: Env, node: str) -> dict[str, str]:
    """Publish to ``node`` as the attacher retries ABORTED; its context."""
    async def attempt() -> dict[str, str] | None:
        try:
            return await env.attacher.publish(by_name("vol1"), node, False, deadline_s=20)
        except OperationPending:
            return None

    return await eventually(attempt, 60, 0.2, description=f"the volume published to {node}")


@pytest.mark.parametrize("source_left", [True, False])
async def test_delete_volume_of_a_move_stopped_after_its_rename_deletes_every_vdi_of_the_disk(
        xenv: Env, source_left: bool) -> None:
    """The PV of a move stopped past its rename (its job lost) is deleted: no job needs to finish the move of a
    volume nobody has any more, so DeleteVolume deletes the copy and the source if left, under the migrators' disk
    lock (ABORTED until the killed worker's lock expired), and answers OK. Before, it answered ABORTED for ever (two
    VDIs of one name while a copy is marked; or the copy alone, "being finished")."""
    write_content(xenv)
    if source_left:
        await _stopped_after_the_rename(xenv)
    else:
        await _stopped_after_the_source_s_deletion(xenv)

    async def deleted() -> bool:
        try:
            await xenv.frontend.provisioner.delete(by_name("vol1"), 30)
        except OperationPending:
            return False
        return True

    await eventually(deleted, 60, 0.2, description="DeleteVolume OK")
    assert vdis_named(xenv.sim) == [] and vdis_named(xenv.sim, INCOMING) == []
