"""Volumes cloned from volumes (services/csi_frontend/cloning.py + services/migrator/clone.py) on real RabbitMQ and
Redis, the simulator in real data mode: the clone holds the source's bytes in the same pool or another, a larger
size is honoured, an attached source is refused with FAILED_PRECONDITION, CreateVolume answers ABORTED while the
job runs and its retry joins the same job, and a worker killed mid-stream leaves one complete clone."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from dev.wait import eventually
from services.csi_frontend.cloning import CloneRequest
from services.csi_frontend.controller import ControllerServicer
from services.csi_frontend.migration_gate import failed_job_error
from shared import messages, storage_class, transfer_marks, vdi_metadata
from shared.csi import csi_pb2
from shared.errors import AlreadyExistsIncompatible, OperationPending, OutOfRange, PreconditionFailed, VolumeNotFound
from shared.messages import CloneRequested
from shared.transfer_marks import TransferMark
from shared.units import MiB
from shared.vdi_metadata import StorageInfo
from shared.volume_id import by_name
from shared.xo.errors import XoPoolDisconnected
from tests.support.cross_pool import (
    DISK_SIZE,
    POOL_B,
    SR_A1,
    SR_B1,
    assert_one_complete_disk,
    backing_path,
    finished,
    sha256_of,
    streaming,
    write_content,
)
from tests.support.migration import DESCRIPTION, DISK, TAG, Env, vdis_named
from tests.support.node_host import FakeContext

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
CLONE = "csi-vol2"
PARAMS = storage_class.parse({"srsWithTag": TAG, "migrating": "true"})
VM_A1 = "node-a1"


def _request(*, size: tuple[int, int] = (0, 0), sized: bool = False, pool: str | None = None,
             source: str = "name:vol1") -> CloneRequest:
    requisite = [{"pool": pool}] if pool else []
    return CloneRequest("vol2", size, sized, PARAMS, requisite, [], source)


async def _clone(env: Env, request: CloneRequest, deadline_s: float = 60) -> Any:
    assert env.frontend.cloner is not None
    return await env.frontend.cloner.create(request, deadline_s)


async def _enqueue_clone(env: Env, source: dict[str, Any], description: str = DESCRIPTION, *,
                         by_uuid: bool = False) -> None:
    """What the frontend's gate does for a clone of vol1 (``source``, named by its VDI UUID with ``by_uuid``) into
    vol2 on SR B1, without waiting: the job record, then the confirmed request."""
    request = CloneRequested(
        kind="clone", job_id=messages.new_job_id(), disk_name=CLONE, volume_id="name:vol2",
        source_volume_id="uuid:" + source["id"] if by_uuid else "name:vol1", source_vdi_seen=source["id"],
        source_disk_name="" if by_uuid else DISK, sr_id=SR_B1, size_bytes=DISK_SIZE, description=description,
        requested_at=messages.utc_now(), correlation_id="c-clone")
    await env.jobs.create_or_join(request)
    await env.publisher.request(request)


def _vm_id(env: Env, name: str) -> str:
    return next(vm["id"] for vm in env.sim.state.of_type("VM") if vm["name_label"] == name)


@pytest.mark.parametrize(("pool", "sr"), [(None, "either"), (POOL_B, SR_B1)], ids=["any-pool", "pool-b"])
async def test_clone_holds_the_sources_bytes_in_the_same_pool_or_another(xenv: Env, pool: str | None,
                                                                         sr: str) -> None:
    checksum = write_content(xenv)
    [source] = vdis_named(xenv.sim)
    await xenv.worker("w1")
    created = await _clone(xenv, _request(pool=pool))
    assert created.volume_id == by_name("vol2")
    assert created.size_bytes == DISK_SIZE
    clone = assert_one_complete_disk(xenv, checksum, sr if sr != "either" else _sr_of(xenv, CLONE), name=CLONE)
    # the new volume's class, as CreateVolume writes it
    assert clone["name_description"] == StorageInfo(srs_with_tag=TAG, migrating=True, handle="name",
                                                    source_volume="name:vol1").to_description()
    assert_one_complete_disk(xenv, checksum, SR_A1)  # the source, untouched
    assert vdis_named(xenv.sim)[0]["id"] == source["id"]
    assert created.context["diskName"] == CLONE


def _sr_of(env: Env, name: str) -> str:
    [vdi] = vdis_named(env.sim, name)
    return str(vdi["$SR"])


async def test_a_larger_clone_is_grown_after_the_import(xenv: Env) -> None:
    checksum = write_content(xenv)
    await xenv.worker("w1")
    created = await _clone(xenv, _request(size=(2 * DISK_SIZE, 0), sized=True, pool=POOL_B))
    assert created.size_bytes == 2 * DISK_SIZE
    [clone] = vdis_named(xenv.sim, CLONE)
    assert clone["size"] == 2 * DISK_SIZE
    path = backing_path(xenv, clone)
    assert path.stat().st_size == 2 * DISK_SIZE
    with path.open("rb") as file:
        head = file.read(DISK_SIZE)
        assert file.read(DISK_SIZE) == bytes(DISK_SIZE)  # the grown part reads as zeros
    head_copy = path.with_suffix(".head")
    head_copy.write_bytes(head)
    assert sha256_of(head_copy) == checksum


async def test_an_attached_source_is_refused_saying_to_detach_it(xenv: Env) -> None:
    write_content(xenv)
    await xenv.worker("w1")
    await xenv.attacher.publish(by_name("vol1"), _vm_id(xenv, VM_A1), False, 30)
    with pytest.raises(PreconditionFailed, match=re.escape(transfer_marks.DETACH_TO_CLONE)):
        await _clone(xenv, _request())
    assert vdis_named(xenv.sim, CLONE) == [] and vdis_named(xenv.sim, transfer_marks.incoming_name(CLONE)) == []


async def test_a_source_attached_after_the_check_fails_the_job_with_the_same_reason(xenv: Env) -> None:
    """XO refuses to export a VDI a VM has plugged (VDI_IN_USE): the worker reports it as the frontend does."""
    write_content(xenv)
    [source] = vdis_named(xenv.sim)
    await xenv.attacher.publish(by_name("vol1"), _vm_id(xenv, VM_A1), False, 30)
    await xenv.worker("w1")
    await _enqueue_clone(xenv, source, by_uuid=True)
    record = await finished(xenv, name=CLONE)
    assert record.state == "failed" and record.result is not None and record.result.error is not None
    assert record.result.error.code == "precondition_failed"
    assert transfer_marks.DETACH_TO_CLONE in record.result.error.message
    assert vdis_named(xenv.sim, CLONE) == [] and vdis_named(xenv.sim, transfer_marks.incoming_name(CLONE)) == []


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": 8 * MiB}])
async def test_create_answers_pending_while_the_clone_runs_and_its_retry_joins_the_same_job(xenv: Env) -> None:
    checksum = write_content(xenv)
    await xenv.worker("w1")
    with pytest.raises(OperationPending, match="being cloned"):
        await _clone(xenv, _request(pool=POOL_B), deadline_s=1.5)  # 1 s of margin: gives up after 0.5 s
    record = await xenv.jobs.get(CLONE)
    assert record is not None and record.kind == "clone" and record.is_active
    created = await _clone(xenv, _request(pool=POOL_B))
    again = await _clone(xenv, _request(pool=POOL_B))  # the finished disk: no new job
    assert created == again
    assert xenv.sim.simulator.stats.streams["rest.vdi.export"] == 1
    final = await xenv.jobs.get(CLONE)
    assert final is not None and final.job_id == record.job_id
    assert_one_complete_disk(xenv, checksum, SR_B1, name=CLONE)


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": 8 * MiB}])
async def test_a_retry_while_the_clone_streams_joins_its_job_before_checking_the_source_again(xenv: Env) -> None:
    """XAPI exports a disk through a VBD of the control domain, which XO shows plugged for as long as the export
    runs; and the job's target already takes its room on the SR. A retry of the CreateVolume joins the running job
    first, without checking the source or placing a disk again: ABORTED while it runs, then the clone. Before, the
    retry found the source plugged (the job's own export) and answered FAILED_PRECONDITION, final for
    external-provisioner: the claim was dropped, and the finished clone leaked if it was deleted meanwhile."""
    checksum = write_content(xenv)
    await xenv.worker("w1")
    with pytest.raises(OperationPending, match="being cloned"):
        await _clone(xenv, _request(pool=POOL_B), deadline_s=1.5)
    await streaming(xenv)
    [source] = vdis_named(xenv.sim)
    xapi = xenv.sim.simulator.xapi
    export_vbd = xapi.add_vbd_record(_vm_id(xenv, VM_A1), source["id"], position="7", bootable=False, read_only=True)
    xenv.sim.state.update(export_vbd["id"], {"attached": True})  # what the export's plug shows, here on a node VM

    with pytest.raises(OperationPending, match="being cloned"):
        await _clone(xenv, _request(pool=POOL_B), deadline_s=1.5)

    xapi.remove_vbd_record(export_vbd["id"])
    xenv.sim.simulator.stream_rate_bps = 0
    created = await _clone(xenv, _request(pool=POOL_B))
    assert created.volume_id == by_name("vol2")
    assert xenv.sim.simulator.stats.streams["rest.vdi.export"] == 1
    assert_one_complete_disk(xenv, checksum, SR_B1, name=CLONE)


@pytest.mark.parametrize("stream_options", [{"frontend": {"stale_mark_after_s": 1.0}}])
async def test_a_source_with_a_stale_migration_mark_is_cloned_once_the_mark_is_cleared(xenv: Env) -> None:
    """The source carries a migration mark no job backs (m4rCsi leaves one after a failed vdi.migrate, as does a
    worker of ours killed between marking and clearing). CreateVolume settles it as an attach would: ABORTED until
    the mark is stale, then cleared, and the clone is made. Before, the clone job waited for a move that never
    came, attempt after attempt, and the claim never got its volume."""
    checksum = write_content(xenv)
    [source] = vdis_named(xenv.sim)
    info = vdi_metadata.parse(source["name_description"])
    assert info is not None
    marked = vdi_metadata.remarked(source["name_description"], SR_B1, info)
    xenv.sim.simulator.xapi.set_vdi_fields(source["id"], {"name_description": marked})
    await eventually(lambda: any(vdi["id"] == source["id"] and vdi["name_description"] == marked
                                 for vdi in xenv.sim.cache.of_type("VDI")), 10, description="XO's cache shows the mark")
    await xenv.worker("w1")

    async def cloned() -> Any:
        try:
            return await _clone(xenv, _request(pool=POOL_B), deadline_s=10)
        except OperationPending:
            return None

    created = await eventually(cloned, 30, 0.2, description="the clone once the stale mark is cleared")
    assert created.volume_id == by_name("vol2")
    assert_one_complete_disk(xenv, checksum, SR_B1, name=CLONE)
    [after] = vdis_named(xenv.sim)
    cleared = vdi_metadata.parse(after["name_description"])
    assert cleared is not None and cleared.in_progress_to_sr is None


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": 8 * MiB}])
async def test_a_request_for_a_larger_clone_that_joins_a_running_job_is_already_exists(xenv: Env) -> None:
    """A CreateVolume of the clone's name for a larger size joins the job a first request (the source's size)
    started: the disk it makes is not the one asked for, so ALREADY_EXISTS, as for a volume found finished.
    Before, it answered OK with the smaller disk."""
    write_content(xenv)
    await xenv.worker("w1")
    with pytest.raises(OperationPending, match="being cloned"):
        await _clone(xenv, _request(pool=POOL_B), deadline_s=1.5)
    with pytest.raises(AlreadyExistsIncompatible, match="already exists with"):
        await _clone(xenv, _request(size=(DISK_SIZE + 64 * MiB, 0), sized=True, pool=POOL_B))
    record = await xenv.jobs.get(CLONE)
    assert record is not None and record.state == "succeeded"
    assert [vdi["size"] for vdi in vdis_named(xenv.sim, CLONE)] == [DISK_SIZE]


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": 8 * MiB}])
async def test_worker_killed_mid_clone_the_other_one_finishes_it(xenv: Env) -> None:
    checksum = write_content(xenv)
    first = await xenv.worker("w1")
    with pytest.raises(OperationPending):
        await _clone(xenv, _request(pool=POOL_B), deadline_s=1.5)
    await streaming(xenv)
    await first.crash()
    xenv.sim.simulator.stream_rate_bps = 0
    await xenv.worker("w2")
    created = await _clone(xenv, _request(pool=POOL_B))
    assert created.volume_id == by_name("vol2")
    assert_one_complete_disk(xenv, checksum, SR_B1, name=CLONE)
    assert_one_complete_disk(xenv, checksum, SR_A1)


def _controller(env: Env) -> ControllerServicer:
    [controller] = [servicer for servicer, _ in env.frontend.servicers if isinstance(servicer, ControllerServicer)]
    return controller


def _create_request(*, source: str | None, size: int = 0) -> csi_pb2.CreateVolumeRequest:
    """CreateVolume of "vol2" in the test's class: a clone of volume ``source``, or blank (None); ``size`` bytes
    required (0: no capacity_range)."""
    request = csi_pb2.CreateVolumeRequest(
        name="vol2", parameters={"srsWithTag": TAG, "migrating": "true"},
        volume_capabilities=[csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))])
    if source is not None:
        request.volume_content_source.volume.volume_id = source
    if size:
        request.capacity_range.required_bytes = size
    return request


async def test_a_clone_without_a_size_retried_after_it_finished_answers_the_same_volume(xenv: Env) -> None:
    # No capacity_range: the clone takes its 64 MiB source's size, and the retry (CreateVolume answers ABORTED while
    # the job runs, so retries are the normal path) finds it: OK, not ALREADY_EXISTS for being under the 1 GiB default.
    write_content(xenv)
    await xenv.worker("w1")
    controller = _controller(xenv)
    request = _create_request(source="name:vol1")

    first = await controller.CreateVolume(request, FakeContext())
    again = await controller.CreateVolume(request, FakeContext())

    assert first == again
    assert (first.volume.volume_id, first.volume.capacity_bytes) == ("name:vol2", DISK_SIZE)
    assert len(vdis_named(xenv.sim, CLONE)) == 1


async def test_a_name_taken_by_a_clone_is_already_exists_for_a_blank_volume_or_another_source(xenv: Env) -> None:
    """Spec: a volume of that name "incompatible with the specified ... volume_content_source" is ALREADY_EXISTS.
    The clone's csi:info records its source, so a blank CreateVolume of its name (same size and class) is refused,
    and so is a clone of another source; the same request again is the same volume."""
    write_content(xenv)
    await xenv.worker("w1")
    controller = _controller(xenv)
    first = await controller.CreateVolume(_create_request(source="name:vol1"), FakeContext())

    with pytest.raises(AlreadyExistsIncompatible,
                       match="volume csi-vol2 already exists as a clone of volume name:vol1, not a blank volume"):
        await controller.CreateVolume(_create_request(source=None, size=DISK_SIZE), FakeContext())
    [source] = vdis_named(xenv.sim)
    with pytest.raises(AlreadyExistsIncompatible, match=f"not a clone of volume uuid:{source['id']}"):
        await controller.CreateVolume(_create_request(source=f"uuid:{source['id']}"), FakeContext())

    assert await controller.CreateVolume(_create_request(source="name:vol1"), FakeContext()) == first
    assert len(vdis_named(xenv.sim, CLONE)) == 1
    assert xenv.sim.simulator.stats.streams["rest.vdi.export"] == 1


async def test_a_blank_volume_of_that_name_is_already_exists_for_a_clone_and_no_job_runs(xenv: Env) -> None:
    write_content(xenv)
    await xenv.worker("w1")
    controller = _controller(xenv)
    blank = await controller.CreateVolume(_create_request(source=None, size=DISK_SIZE), FakeContext())

    with pytest.raises(AlreadyExistsIncompatible,
                       match="volume csi-vol2 already exists as a blank volume, not a clone of volume name:vol1"):
        await controller.CreateVolume(_create_request(source="name:vol1"), FakeContext())

    assert await xenv.jobs.get(CLONE) is None
    assert blank.volume.volume_id == "name:vol2" and len(vdis_named(xenv.sim, CLONE)) == 1
    assert xenv.sim.simulator.stats.streams["rest.vdi.export"] == 0


async def test_a_clone_job_finding_a_blank_disk_of_its_name_fails_as_already_exists_and_leaves_it(
        xenv: Env) -> None:
    """A blank CreateVolume of the clone's name made its disk while the clone job was queued: the job does not take
    that disk for its finished clone (it would answer OK over a volume without the source's content); it fails
    with already_exists_incompatible, which the frontend answers as ALREADY_EXISTS, and the blank disk stays."""
    write_content(xenv)
    [source] = vdis_named(xenv.sim)
    controller = _controller(xenv)
    await controller.CreateVolume(_create_request(source=None, size=DISK_SIZE), FakeContext())
    [blank] = vdis_named(xenv.sim, CLONE)
    await _enqueue_clone(xenv, source, StorageInfo(srs_with_tag=TAG, migrating=True, handle="name",
                                                   source_volume="name:vol1").to_description())
    await xenv.worker("w1")

    record = await finished(xenv, name=CLONE)
    assert record.state == "failed" and record.result is not None and record.result.error is not None
    assert record.result.error.code == "already_exists_incompatible"
    assert "was not cloned from volume name:vol1 (a blank volume)" in record.result.error.message
    answered = failed_job_error("clone of volume name:vol1 into vol2", record.result.error)
    assert isinstance(answered, AlreadyExistsIncompatible)
    assert [vdi["id"] for vdi in vdis_named(xenv.sim, CLONE)] == [blank["id"]]
    assert vdis_named(xenv.sim, transfer_marks.incoming_name(CLONE)) == []
    assert xenv.sim.simulator.stats.streams["rest.vdi.export"] == 0


async def test_a_disk_of_that_name_left_undescribed_or_still_finishing_a_clone_is_told_apart(xenv: Env) -> None:
    """A blank creation cut between XO renaming and describing its disk leaves the name with an empty description:
    a clone request of that name is ALREADY_EXISTS (it is a blank volume), not completed as a clone. A clone still
    finishing (the new name, its transfer mark) is a clone for a blank request: ALREADY_EXISTS too."""
    write_content(xenv)
    [source] = vdis_named(xenv.sim)
    controller = _controller(xenv)
    cut = await xenv.sim.simulator.xapi.create_vdi(SR_A1, name_label=CLONE, size=DISK_SIZE)
    await eventually(lambda: xenv.sim.simulator.mirror.cache.find(cut["id"]) is not None, 5,
                     description="XO's cache shows the renamed, undescribed disk")
    with pytest.raises(AlreadyExistsIncompatible, match="already exists as a blank volume, not a clone of volume"):
        await controller.CreateVolume(_create_request(source="name:vol1"), FakeContext())
    assert [vdi["name_description"] for vdi in vdis_named(xenv.sim, CLONE)] == [""]

    final = StorageInfo(srs_with_tag=TAG, migrating=True, handle="name", source_volume="name:vol1")
    finishing = TransferMark("complete", "clone", source["id"], "job-1", final.to_description())
    await xenv.frontend.xo.set_vdi(cut["id"], name_description=finishing.to_description())
    with pytest.raises(AlreadyExistsIncompatible, match="already exists as a clone of volume name:vol1, not a blank"):
        await controller.CreateVolume(_create_request(source=None, size=DISK_SIZE), FakeContext())


@pytest.mark.parametrize("stream_options", [{"stream_rate_bps": 8 * MiB}])
async def test_a_blank_disk_of_that_name_made_while_the_clone_streams_keeps_the_name(xenv: Env) -> None:
    """A blank CreateVolume of the clone's name while the clone streams (the clone's CreateVolume answered ABORTED
    and let go of the name): before its target takes the name, the job finds the blank disk, deletes its target and
    fails as already_exists_incompatible. One disk carries the name, no ~incoming is left."""
    write_content(xenv)
    [source] = vdis_named(xenv.sim)
    await _enqueue_clone(xenv, source, StorageInfo(srs_with_tag=TAG, migrating=True, handle="name",
                                                   source_volume="name:vol1").to_description())
    await xenv.worker("w1")
    await streaming(xenv)
    blank = await _controller(xenv).CreateVolume(_create_request(source=None, size=DISK_SIZE), FakeContext())
    xenv.sim.simulator.stream_rate_bps = 0

    record = await finished(xenv, name=CLONE)
    assert record.state == "failed" and record.result is not None and record.result.error is not None
    assert record.result.error.code == "already_exists_incompatible"
    assert "was made by another CreateVolume while it was being cloned" in record.result.error.message
    [disk] = vdis_named(xenv.sim, CLONE)
    assert blank.volume.volume_id == "name:vol2" and disk["$SR"] != "" and '"sourceVolume"' not in disk[
        "name_description"]
    assert vdis_named(xenv.sim, transfer_marks.incoming_name(CLONE)) == []


async def test_a_missing_source_is_not_found_and_a_limit_below_its_size_out_of_range(xenv: Env) -> None:
    write_content(xenv)
    with pytest.raises(VolumeNotFound, match="volume_content_source.volume.volume_id"):
        await _clone(xenv, _request(source="name:nope"))
    with pytest.raises(OutOfRange, match="below the size of the source volume"):
        await _clone(xenv, _request(size=(MiB, DISK_SIZE // 2), sized=True))
    assert vdis_named(xenv.sim, CLONE) == []


async def test_the_clone_job_record_is_visible_as_a_clone(xenv: Env) -> None:
    write_content(xenv)
    await xenv.worker("w1")
    await _clone(xenv, _request())
    record = await eventually(lambda: xenv.jobs.get(CLONE), 5, description="the clone's job record")
    assert record.kind == "clone" and record.state == "succeeded"
    assert record.target_host.startswith("SR ")
    assert DISK in (record.request.source_disk_name if isinstance(record.request, CloneRequested) else "")
    assert os.path.exists(backing_path(xenv, vdis_named(xenv.sim, CLONE)[0]))


async def test_no_sr_for_a_clone_while_xo_has_lost_the_pool_asked_for_is_unavailable_not_exhausted(
        xenv: Env) -> None:
    """A clone asked into pool B while XO has lost pool B: the clone's disk and pool B's SRs are missing from XO's
    view, not gone, so the answer is the retryable UNAVAILABLE (XoPoolDisconnected) naming the pool, as for
    CreateVolume, not "no SR" or "no room", and nothing is made; once the pool is back the same request makes the
    clone there."""
    write_content(xenv)
    await xenv.worker("w1")
    outages = xenv.sim.simulator.outages
    outages.disconnect(POOL_B, None)
    await eventually(lambda: not any(sr["id"] == SR_B1 for sr in xenv.sim.cache.of_type("SR")), 5,
                     description="pool B's SRs gone from XO's cache")
    with pytest.raises(XoPoolDisconnected, match="XO is not connected to Pool B"):
        await _clone(xenv, _request(pool=POOL_B))
    assert vdis_named(xenv.sim, CLONE) == []
    outages.reconnect(POOL_B)
    inventory = xenv.frontend.inventory
    assert inventory is not None

    async def pool_b_seen() -> bool:  # by the frontend: XO's enter notifications reached its inventory
        return any(sr.id == SR_B1 for sr in await inventory.srs())

    await eventually(pool_b_seen, 5, description="pool B's SRs back in the frontend's inventory")
    await _clone(xenv, _request(pool=POOL_B))
    assert [vdi["$SR"] for vdi in xenv.sim.state.of_type("VDI") if vdi["name_label"] == CLONE] == [SR_B1]


async def test_a_clone_job_decides_from_what_settling_read_not_from_a_lookup_of_its_own(xenv: Env) -> None:
    """The XO calls of one clone job into pool B (the worker's alone, counted by the simulator): the name of the new
    disk is looked up once (transfer.settle returns what it read), then confirmed absent as XO sees every pool."""
    write_content(xenv)
    [source] = vdis_named(xenv.sim)
    worker = await xenv.worker("w1")
    assert worker.migrator.inventory is not None
    await worker.migrator.inventory.srs()  # the SRs loaded (the worker warms them at start): not counted below
    stats = xenv.sim.simulator.stats
    stats.reset()
    await _enqueue_clone(xenv, source)
    record = await finished(xenv, name=CLONE)
    assert record.state == "succeeded", record
    # reads: settle's (~incoming, the name: the job's first look, not read again), the name once more after
    # server.getAll and the pools shown (absent only once XO sees every pool and holds its objects), the source by
    # name, its VBDs, the name before the target takes it (a blank disk made meanwhile keeps it), the target after
    # the stream and after its csi:info
    assert dict(stats.calls) == {"xo.getAllObjects": 9, "server.getAll": 1, "rest.vdi.create": 1, "rest.vdi.get": 1,
                                 "rest.vdi.export": 1, "rest.vdi.import": 1, "vdi.set": 3}
