"""Moves across pools (services/migrator/transfer.py) on real RabbitMQ and Redis, the simulator in real data mode:
a disk on pool A asked for by a node of pool B is streamed through XO's REST export and import into a new VDI there,
with its bytes, and every fault of issue 12 (the worker killed mid-stream, the connection to XO cut, the target SR
full, the source's pool lost, a connection drop at each step of the swap) ends with exactly one complete disk
carrying the volume's name and no partial target."""

from __future__ import annotations

from typing import Any

import pytest

from dev.wait import eventually
from services.csi_frontend.attach import NodePlace
from services.csi_frontend.disks import Disk
from services.xo_simulator.faults import Faults, Latency
from services.xo_simulator.topology import derived_id
from shared import transfer_marks, vdi_metadata
from shared.errors import OperationPending
from shared.locks import DiskLock
from shared.progress import StreamProgress
from shared.units import MiB
from shared.volume_id import by_name
from shared.xo.errors import XoUnavailable
from tests.support.cross_pool import (
    DISK_SIZE,
    INCOMING,
    POOL_B,
    SR_A1,
    SR_B1,
    VM_B1,
    assert_one_complete_disk,
    finished,
    streaming,
    submit_to_pool_b,
    write_content,
)
from tests.support.migration import DISK, POOL_A, Env, dead_letters, vdis_named

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
HOST_A1 = derived_id("host", "Pool A", "host-a1")
VM_A1 = derived_id("vm", "Pool A", "host-a1", "node-a1")
SLOW = 8 * MiB  # bytes/s of the simulator's exports in tests that act while a stream runs (~3 s for the data)


async def _add_faults(env: Env, *rules: dict[str, Any]) -> None:
    await env.sim.simulator.add_faults(Faults.parse(list(rules)))


# --- the move ----------------------------------------------------------------------------------------------------


async def test_publish_on_a_node_of_another_pool_moves_the_disk_there_with_its_bytes(xenv: Env) -> None:
    checksum = write_content(xenv)
    await xenv.worker("w1")
    [source] = vdis_named(xenv.sim)
    context = await xenv.attacher.publish(by_name("vol1"), VM_B1, False, 60)
    moved = assert_one_complete_disk(xenv, checksum, SR_B1)
    assert moved["id"] != source["id"]
    assert context["device"] == "xvda"  # the node VM has no root disk in this topology: its first position
    assert [vbd["VM"] for vbd in xenv.sim.state.of_type("VBD") if vbd["VDI"] == moved["id"]] == [VM_B1]
    stats = xenv.sim.simulator.stats
    assert (stats.streams["rest.vdi.export"], stats.streams["rest.vdi.import"]) == (1, 1)
    assert stats.migrations.get(DISK, 0) == 0  # no vdi.migrate: it cannot cross pools


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": SLOW}])
async def test_the_job_record_shows_the_streams_progress_while_it_runs(xenv: Env) -> None:
    write_content(xenv)
    await xenv.worker("w1")
    await submit_to_pool_b(xenv)
    seen: list[StreamProgress] = []

    async def progressed() -> bool:
        record = await xenv.jobs.get(DISK)
        assert record is not None
        if record.progress is not None and record.state == "running":
            seen.append(record.progress)
        return len(seen) >= 2 and seen[-1].done_bytes > seen[0].done_bytes

    await eventually(progressed, 30, 0.1, description="two heartbeats with growing progress")
    total = seen[-1].total_bytes
    assert DISK_SIZE // 4 < total < DISK_SIZE // 2  # the VHD of the allocated blocks only (~1/3 of the disk)
    assert 0 < seen[-1].rate_bps and 0 < seen[-1].done_bytes < total
    record = await finished(xenv)
    assert record.state == "succeeded"
    assert record.progress is not None and record.progress.done_bytes <= total


# --- faults: each ends with exactly one complete disk ----------------------------------------------------------


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": SLOW}])
async def test_worker_killed_mid_stream_the_other_one_finishes_with_one_complete_disk(xenv: Env) -> None:
    checksum = write_content(xenv)
    first = await xenv.worker("w1")
    await submit_to_pool_b(xenv)
    await streaming(xenv)
    assert len(vdis_named(xenv.sim, INCOMING)) == 1  # the partial target, being filled
    await first.crash()  # as kill -9: no hand-back, the record goes stale, the connections drop
    xenv.sim.simulator.stream_rate_bps = 0
    await xenv.worker("w2")  # its reaper takes the job over; the retry deletes the partial target
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    assert record.attempt >= 2
    assert_one_complete_disk(xenv, checksum, SR_B1)


@pytest.mark.parametrize("method", ["rest.vdi.import", "rest.vdi.export"])
async def test_connection_to_xo_cut_mid_stream_is_retried_to_one_complete_disk(xenv: Env, method: str) -> None:
    checksum = write_content(xenv)
    await _add_faults(xenv, {"kind": "drop_socket", "method": method, "after_bytes": 5 * MiB, "count": 1})
    await xenv.worker("w1")
    await submit_to_pool_b(xenv)
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    assert record.attempt == 2
    assert xenv.sim.simulator.stats.streams[method] == 2
    assert_one_complete_disk(xenv, checksum, SR_B1)


async def test_target_sr_full_mid_stream_fails_the_job_and_keeps_the_source_whole(xenv: Env) -> None:
    checksum = write_content(xenv)
    [source] = vdis_named(xenv.sim)
    await _add_faults(xenv, {"method": "rest.vdi.import", "xapi": "SR_BACKEND_FAILURE_44",
                             "xapi_params": ["", "There is insufficient space", ""], "after_bytes": 6 * MiB,
                             "count": 1})
    await xenv.worker("w1")
    await submit_to_pool_b(xenv)
    record = await finished(xenv)
    assert record.state == "failed"
    assert record.result is not None and record.result.error is not None
    assert (record.result.error.code, record.result.error.retryable) == ("xo_no_space", False)
    kept = assert_one_complete_disk(xenv, checksum, SR_A1)  # the source, unmarked: usable again in pool A
    assert kept["id"] == source["id"]


async def test_target_sr_full_at_creation_fails_the_job_and_leaves_the_source_alone(xenv: Env) -> None:
    checksum = write_content(xenv)
    await _add_faults(xenv, {"method": "rest.vdi.create", "xapi": "SR_BACKEND_FAILURE_44", "count": 1})
    await xenv.worker("w1")
    await submit_to_pool_b(xenv)
    record = await finished(xenv)
    assert record.state == "failed"
    assert record.result is not None and record.result.error is not None
    assert record.result.error.code == "xo_no_space"
    assert_one_complete_disk(xenv, checksum, SR_A1)


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": SLOW}])
async def test_source_pool_lost_mid_stream_the_move_completes_once_xo_sees_it_again(xenv: Env) -> None:
    """XO loses pool A while its disk is exported: the stream breaks and the disk vanishes from XO's view. Absent is
    not deleted: the job retries (XoPoolDisconnected) until the pool is back, then moves the whole disk."""
    checksum = write_content(xenv)
    # Retries 0.5 s apart at most, 1,000 of them: the 3 s outage never exhausts them, however fast each attempt is.
    await xenv.worker("w1", max_attempts=1000, retry_backoff_max_s=0.5)
    await submit_to_pool_b(xenv)
    await streaming(xenv)
    pool_a = vdis_named(xenv.sim)[0]["$pool"]
    await _add_faults(xenv, {"kind": "pool_disconnect", "pool": pool_a, "duration_s": 3})
    await eventually(lambda: xenv.sim.simulator.stats.active_streams == 0, 30, 0.01,
                     description="the stream cut by the lost pool")
    xenv.sim.simulator.stream_rate_bps = 0
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    assert_one_complete_disk(xenv, checksum, SR_B1)


async def test_target_pool_lost_before_the_move_is_retried_not_failed_as_placement_impossible(xenv: Env) -> None:
    """XO has lost pool B when the job reads the SRs it may stream to: none of pool B's shows, which proves nothing
    (absent is not deleted). The job is retried (XoPoolDisconnected), not dead-lettered as placement_impossible,
    and the move completes once XO sees pool B again."""
    checksum = write_content(xenv)
    await _add_faults(xenv, {"kind": "pool_disconnect", "pool": POOL_B, "duration_s": 3})  # lost from now on
    # Retries 0.5 s apart at most, 1,000 of them: the 3 s outage never exhausts them, however fast each attempt is.
    await xenv.worker("w1", max_attempts=1000, retry_backoff_max_s=0.5)
    await submit_to_pool_b(xenv)
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    assert record.attempt > 1, "the first attempt found pool B lost"
    assert await dead_letters(xenv.amqp_url) == 0
    assert_one_complete_disk(xenv, checksum, SR_B1)


@pytest.mark.parametrize(("method", "after_calls"), [
    ("vdi.set", 1),  # marking the target complete
    ("vdi.set", 2),  # renaming it to the disk's name
    ("vdi.delete", 0),  # deleting the source
    ("vdi.set", 3),  # giving it the volume's csi:info
])
async def test_connection_dropped_at_each_step_of_the_swap_ends_with_one_complete_disk(
        xenv: Env, method: str, after_calls: int) -> None:
    """vdi.set calls of a move: 0 marks the source, 1 marks the target complete, 2 renames it, 3 describes it. Two
    drops in a row beat the client's one retry of an idempotent call: the attempt fails at that step."""
    checksum = write_content(xenv)
    await _add_faults(xenv, {"kind": "drop_socket", "method": method, "after_calls": after_calls, "count": 2})
    await xenv.worker("w1")
    await submit_to_pool_b(xenv)
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    assert record.attempt == 2
    assert_one_complete_disk(xenv, checksum, SR_B1)


# --- lookups while the swap runs ------------------------------------------------------------------------------------


async def test_lookups_in_the_swap_window_answer_pending_and_never_attach_the_target(xenv: Env) -> None:
    """Stop the move after the rename (the source's deletion fails every time): two VDIs carry the name, the source
    marked, the target with its transfer mark. An attach there answers ABORTED (OperationPending), on either pool;
    once the job can go on, its retry finishes the swap."""
    checksum = write_content(xenv)
    await _add_faults(xenv, {"kind": "drop_socket", "method": "vdi.delete"})
    await xenv.worker("w1", max_attempts=50)
    await submit_to_pool_b(xenv)
    def renamed_in_xo_cache() -> list[dict[str, Any]]:
        named = [v for v in xenv.sim.cache.of_type("VDI") if v["name_label"] == DISK]
        assert len(named) == 2
        return named

    named = await eventually(renamed_in_xo_cache, 30, 0.02, description="the target renamed, as XO shows it")
    assert sorted(vdi_metadata.parse(v["name_description"]) is None for v in named) == [False, True]
    disks = xenv.frontend.disks
    with pytest.raises(OperationPending, match="being migrated"):
        await disks.get(by_name("vol1"))
    source = await disks.copy_source(by_name("vol1"))
    assert isinstance(source, Disk) and vdi_metadata.parse(source.vdi.name_description) is not None
    place = await xenv.attacher.place_of(VM_B1)
    assert isinstance(place, NodePlace)
    xenv.sim.simulator.clear_faults()
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    assert_one_complete_disk(xenv, checksum, SR_B1)


async def test_a_crashed_attempt_s_target_is_deleted_by_the_next_one_even_on_another_sr(xenv: Env) -> None:
    """A partial target (``~incoming``, marked copying) left by an attempt that died is proven partial by its mark
    and deleted before the next attempt starts its own."""
    checksum = write_content(xenv)
    [source] = vdis_named(xenv.sim)
    partial = await xenv.sim.simulator.xapi.create_vdi(
        SR_B1, name_label=INCOMING, size=DISK_SIZE,
        name_description=f'csi:transfer: {{"state":"copying","kind":"move","from":"{source["id"]}","job":"old",'
                         '"info":"csi:info: {}"}')
    await eventually(lambda: partial["id"] in xenv.sim.cache, 5, description="the partial target in XO's cache")
    await xenv.worker("w1")
    await submit_to_pool_b(xenv)
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    assert partial["id"] not in xenv.sim.state
    assert_one_complete_disk(xenv, checksum, SR_B1)


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": SLOW}])
async def test_target_pool_lost_mid_stream_leaves_no_orphan_even_when_the_job_gives_up(xenv: Env) -> None:
    """XO loses pool B while the disk streams into it, and the job gives up (one attempt). XO cannot show whether
    ``~incoming`` is gone, so the source keeps its mark; the next job on the disk waits for pool B, deletes the
    leftover and clears the mark (here the pod is back on node-a1, where the disk is): no orphan VDI in pool B."""
    checksum = write_content(xenv)
    first = await xenv.worker("w1", max_attempts=1)
    await submit_to_pool_b(xenv)
    await streaming(xenv)
    await _add_faults(xenv, {"kind": "pool_disconnect", "pool": POOL_B})  # until the faults are cleared
    record = await finished(xenv)
    assert record.state == "failed", record.result
    [source] = vdis_named(xenv.sim)
    info = vdi_metadata.parse(source["name_description"])
    assert info is not None and info.in_progress_to_sr == SR_B1  # kept: its target may still be in pool B

    await first.stop()
    xenv.sim.simulator.clear_faults()  # and pool B is back: connected at once, its objects a cache lag later
    xenv.sim.simulator.stream_rate_bps = 0
    await xenv.worker("w2", max_attempts=1000, retry_backoff_max_s=0.5)
    await xenv.submit(vm_id=VM_A1, host_id=HOST_A1, pool_id=POOL_A)  # back on node-a1: the disk is usable there
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    assert_one_complete_disk(xenv, checksum, SR_A1)  # unmarked, and no VDI named <disk>~incoming left anywhere


@pytest.mark.parametrize("stream_options", [{"frontend": {"stale_mark_after_s": 1.5}}])
async def test_a_stale_mark_of_a_move_that_gave_up_is_cleared_with_its_leftover_under_the_disk_lock(
        xenv: Env) -> None:
    """As above, the move gives up while XO has lost pool B, leaving the source marked and ``~incoming`` in pool B;
    but no job runs on the disk again: its pod goes back to node-a1, where the disk is. Once the mark is stale, the
    controller deletes the leftover (XO shows pool B again) and clears the mark, holding the migrators' disk lock:
    while a migrator holds it the attach answers ABORTED and nothing is touched. No orphan VDI in pool B."""
    checksum = write_content(xenv)
    await _give_up_while_pool_b_is_lost(xenv)
    await eventually(lambda: bool(vdis_named(xenv.sim, INCOMING)) and _shows(xenv, INCOMING), 10,
                     description="XO shows pool B again, the leftover with it")
    held = DiskLock(xenv.redis, xenv.prefix, DISK, ttl_s=30, wait_s=0)
    async with held:  # a migrator working on the disk: ABORTED for the bound, then for the lock

        async def refused_for_the_lock() -> bool:
            try:
                await xenv.attacher.publish(by_name("vol1"), VM_A1, False, deadline_s=10)
            except OperationPending as exc:
                return "is locked by another worker" in exc.message
            raise AssertionError("published while a migrator held the disk")

        await eventually(refused_for_the_lock, 10, 0.2, description="ABORTED for the disk lock")
        assert len(vdis_named(xenv.sim, INCOMING)) == 1

    async def published() -> dict[str, str] | None:
        try:
            return await xenv.attacher.publish(by_name("vol1"), VM_A1, False, deadline_s=10)
        except OperationPending:
            return None

    context = await eventually(published, 10, 0.2, description="published once the lock went back")
    [vdi] = vdis_named(xenv.sim)
    assert context["vbd"] in vdi["$VBDs"] and vdis_named(xenv.sim, INCOMING) == []
    info = vdi_metadata.parse(vdi["name_description"])
    assert info is not None and info.in_progress_to_sr is None
    await xenv.attacher.unpublish(by_name("vol1"), VM_A1, 10)
    assert_one_complete_disk(xenv, checksum, SR_A1)
    assert await xenv.redis.exists(held.key) == 0  # the controller's hold went back too


async def _give_up_while_pool_b_is_lost(env: Env) -> None:
    """A move to pool B that gives up (one attempt) while XO has lost pool B mid-stream, leaving the source marked
    and ``~incoming`` in pool B; then pool B is back (connected at once, its objects a cache lag later)."""
    first = await env.worker("w1", max_attempts=1)
    await submit_to_pool_b(env)
    await streaming(env)
    await _add_faults(env, {"kind": "pool_disconnect", "pool": POOL_B})
    record = await finished(env)
    assert record.state == "failed", record.result
    await first.stop()
    env.sim.simulator.clear_faults()


def _shows(env: Env, name: str) -> bool:
    return any(vdi["name_label"] == name for vdi in env.sim.cache.of_type("VDI"))


# --- DeleteVolume during and after a move ------------------------------------------------------------------------


async def _deleted(env: Env) -> bool:
    """One DeleteVolume as external-provisioner sends it: True once it answered OK, False for ABORTED or
    UNAVAILABLE (XO still loading a pool), which it retries."""
    try:
        await env.frontend.provisioner.delete(by_name("vol1"), 30)
    except (OperationPending, XoUnavailable):
        return False
    return True


async def test_delete_volume_while_the_move_runs_is_aborted_until_it_ends_then_leaves_nothing(xenv: Env) -> None:
    """The PV is deleted while its disk moves to pool B (its pod went away during the attach): DeleteVolume answers
    ABORTED while the migrator holds the disk, then deletes the moved disk. Before, it deleted the marked source
    under the running job, which then finished its complete copy into a volume nobody had: a disk with no PV,
    never deleted."""
    write_content(xenv)
    xenv.sim.simulator.faults.latency = Latency.parse("vdi.set=1500")  # a loaded XO: the swap takes seconds
    await xenv.worker("w1")
    await submit_to_pool_b(xenv)
    await eventually(lambda: _complete_target_shown(xenv), 60, 0.02,
                     description="the target complete in pool B, not yet renamed")

    assert await _deleted(xenv) is False  # the migrator holds the disk
    assert len(vdis_named(xenv.sim)) == 1 and len(vdis_named(xenv.sim, INCOMING)) == 1  # nothing touched
    record = await finished(xenv)
    assert record.state == "succeeded", record.result
    await eventually(lambda: _deleted(xenv), 30, 0.2, description="DeleteVolume OK once the move ended")

    assert vdis_named(xenv.sim) == [] and vdis_named(xenv.sim, INCOMING) == []


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": SLOW}])
async def test_delete_volume_of_a_disk_whose_move_gave_up_deletes_its_leftover_in_the_other_pool(
        xenv: Env) -> None:
    """A move that gave up while XO had lost pool B keeps the source's mark and leaves ``~incoming`` there for the
    next job; a DeleteVolume is the last call the disk gets, so it deletes both (once XO shows pool B again: a
    lookup there proves nothing before). Before, the ``~incoming`` stayed in pool B for good."""
    write_content(xenv)
    await _give_up_while_pool_b_is_lost(xenv)

    await eventually(lambda: _deleted(xenv), 30, 0.2, description="DeleteVolume OK")

    assert vdis_named(xenv.sim) == [] and vdis_named(xenv.sim, INCOMING) == []


def _complete_target_shown(env: Env) -> bool:
    return any(vdi["name_label"] == INCOMING and (mark := transfer_marks.parse(vdi["name_description"])) is not None
               and mark.complete for vdi in env.sim.cache.of_type("VDI"))
