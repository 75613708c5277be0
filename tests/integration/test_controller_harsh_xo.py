"""The controller and the migrator against the harsh simulator (issue 9 items 1, 3, 8): offline expansion, XO
losing the pool a migration needs, both VDIs busy during a copy, thin SRs' free space. The pool loss seen through
every controller RPC over gRPC is tests/e2e/test_pool_loss.py."""

from __future__ import annotations

import pytest

from dev.wait import eventually
from services.csi_frontend.disks import Disk
from services.xo_simulator.cache import Lag
from services.xo_simulator.faults import Faults, Latency
from shared import placement, vdi_metadata
from shared import volume_id as vid
from shared.csi import csi_pb2
from shared.errors import OutOfRange, PreconditionFailed
from shared.units import GiB, MiB
from shared.xo.errors import XoPoolDisconnected
from tests.support.brokers import RedisEndpoint
from tests.support.capabilities import block_capability, mount_capability
from tests.support.controller import Context, Controller, controller
from tests.support.migration import DISK, POOL_A, SR_A1, SR_A2, Env, open_env, vdis_named
from tests.support.sim import HOST_A2, SR_LOCAL_A1, SR_LOCAL_A2, SR_NFS_A, VM_A1

MOUNT = mount_capability()
BLOCK = block_capability()


async def _expand(ctl: Controller, volume_id: str, size: int,
                  cap: csi_pb2.VolumeCapability = MOUNT) -> csi_pb2.ControllerExpandVolumeResponse:
    return await ctl.servicer.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size), volume_capability=cap),
        Context())  # type: ignore[arg-type]


async def test_expansion_is_offline_an_attached_disk_is_refused_naming_its_node(ctl: Controller) -> None:
    servicer = ctl.servicer
    created = await servicer.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-grow", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB), volume_capabilities=[MOUNT],
        parameters={"srsWithTag": "k8s-shared"}), Context())  # type: ignore[arg-type]
    volume_id = created.volume.volume_id
    await servicer.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=VM_A1, volume_capability=MOUNT), Context())  # type: ignore[arg-type]
    with pytest.raises(PreconditionFailed, match=f"attached to node {VM_A1}.*offline expansion.*unpublish it first"):
        await _expand(ctl, volume_id, 128 * MiB)
    assert (await _expand(ctl, volume_id, 64 * MiB)).capacity_bytes == 64 * MiB  # already that large: OK
    await servicer.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, node_id=VM_A1), Context())  # type: ignore[arg-type]
    grown = await _expand(ctl, volume_id, 128 * MiB)
    assert (grown.capacity_bytes, grown.node_expansion_required) == (128 * MiB, True)  # the node grows the fs
    assert (await _expand(ctl, volume_id, 128 * MiB, BLOCK)).node_expansion_required is False
    vdi = await ctl.xo.get_vdi(volume_id)
    assert vdi is not None and vdi.size == 128 * MiB


async def test_an_expansion_with_a_limit_alone_grows_nothing(ctl: Controller) -> None:
    """required_bytes 0 asks for at least 0 bytes: the volume stays as it is. Before, the limit alone made it grow to
    the default size of a new volume (1 GiB), which nobody asked for."""
    created = await ctl.servicer.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-limit", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB), volume_capabilities=[MOUNT],
        parameters={"srsWithTag": "k8s-shared"}), Context())  # type: ignore[arg-type]
    answer = await ctl.servicer.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=created.volume.volume_id, capacity_range=csi_pb2.CapacityRange(limit_bytes=10 * GiB),
        volume_capability=MOUNT), Context())  # type: ignore[arg-type]
    vdi = await ctl.xo.get_vdi(created.volume.volume_id)
    assert (answer.capacity_bytes, vdi is not None and vdi.size) == (64 * MiB, 64 * MiB)


async def test_sizes_are_answered_as_xapi_rounds_them_and_a_limit_no_step_fits_is_out_of_range(
        ctl: Controller) -> None:
    """XAPI sizes a VHD disk in whole 2 MiB blocks, rounding up on create and on resize. A PVC of "1G" (10^9 bytes)
    gets 477 blocks; the answers give the size XO made (CreateVolume and its retry, then an expansion to "2G"), a
    range with no whole block in it (required = limit = 10^9) is OUT_OF_RANGE naming the limit to set, not a disk
    above its limit, and a limit alone gets the largest whole block count within it."""
    servicer = ctl.servicer

    def request(required: int, limit: int = 0, name: str = "pvc-1g") -> csi_pb2.CreateVolumeRequest:
        return csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
            volume_capabilities=[MOUNT], parameters={"srsWithTag": "k8s-shared"})

    with pytest.raises(OutOfRange, match=r"capacity_range: XCP-ng sizes disks in whole steps of 2 MiB.*"
                                         r"raise the limit to 1000341504 or more"):
        await servicer.CreateVolume(request(10**9, 10**9), Context())  # type: ignore[arg-type]
    assert ctl.sim.simulator.stats.calls["disk.create"] == 0

    created = await servicer.CreateVolume(request(10**9), Context())  # type: ignore[arg-type]
    again = await servicer.CreateVolume(request(10**9, 1000341504), Context())  # type: ignore[arg-type]
    assert created.volume.capacity_bytes == again.volume.capacity_bytes == 477 * 2 * MiB == 1000341504
    grown = await _expand(ctl, created.volume.volume_id, 2 * 10**9)
    vdi = await ctl.xo.get_vdi(created.volume.volume_id)
    assert vdi is not None and grown.capacity_bytes == vdi.size == 954 * 2 * MiB == 2000683008
    # a limit alone: the largest whole block within it (the default 1 GiB is above it)
    capped = await servicer.CreateVolume(request(0, 10**9, name="pvc-capped"), Context())  # type: ignore[arg-type]
    assert capped.volume.capacity_bytes == 476 * 2 * MiB == 998244352


async def test_free_space_of_a_thin_sr_is_what_is_not_allocated_physically(ctl: Controller) -> None:
    for _ in range(3):  # 3 x 400 GiB on a 1 TiB thin SR: the virtual allocation exceeds the size
        await ctl.xo.create_disk("someone-elses", 400 * 1024**3, SR_NFS_A)

    async def capacity_is_physical() -> bool:
        sr = await ctl.xo.get_sr(SR_NFS_A)
        assert sr is not None and sr.usage > sr.size  # overcommitted
        response = await ctl.servicer.GetCapacity(csi_pb2.GetCapacityRequest(
            parameters={"srsWithTag": "k8s-shared"}), Context())  # type: ignore[arg-type]
        assert response.available_capacity == sr.size - sr.physical_usage == placement.free_bytes(sr) > 0
        # the largest volume in whole 2 MiB steps (XAPI rounds a size up to them), the smallest one step
        assert response.available_capacity % (2 * MiB) != 0
        assert response.maximum_volume_size.value == response.available_capacity // (2 * MiB) * (2 * MiB)
        assert response.minimum_volume_size.value == 2 * MiB
        return True

    await eventually(capacity_is_physical, 5, 0.1, description="GetCapacity counts physical usage on a thin SR")


async def test_the_source_of_a_running_copy_is_told_apart_although_both_vdis_are_busy(
        amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    """During a copy XO shows a current operation on the source AND the copy, and the copy carries the source's
    description: a retried publish still finds the source to join the job (by the mark's target SR)."""
    async with open_env(amqp_vhost, redis_server, redis_prefix, migration_rate_bps=512 * MiB) as env:
        await env.worker("w1")
        await env.submit()
        await eventually(lambda: len(vdis_named(env.sim)) == 2 and all(
            v["current_operations"] for v in vdis_named(env.sim)), 10, description="a copy running")
        await eventually(lambda: _both_busy_in_cache(env), 10, description="XO's cache shows the copy")
        source = await env.frontend.disks.copy_source(vid.by_name("vol1"))
        assert isinstance(source, Disk) and source.vdi.sr_id == SR_A1


async def _both_busy_in_cache(env: Env) -> bool:
    vdis = await env.frontend.xo.find_vdis(name_label=DISK)
    return len(vdis) == 2 and all(v.current_operations for v in vdis)


async def test_a_migration_while_xo_lost_the_pool_is_retried_then_completes(
        amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    """The disk is absent from XO's view because its pool is lost: the job is retried (never failed for good as
    VolumeNotFound), nothing is copied meanwhile, and it completes once the pool is back."""
    async with open_env(amqp_vhost, redis_server, redis_prefix) as env:
        env.sim.simulator.outages.disconnect(POOL_A, None)
        await env.worker("w1", max_attempts=1000)
        await env.submit()
        await eventually(lambda: _retried(env), 10, description="the job retried while the pool is lost")
        assert env.sim.simulator.stats.migrations[DISK] == 0
        env.sim.simulator.outages.reconnect(POOL_A)
        record = await eventually(env.finished, 20, description="the job finished")
        assert record.result is not None and record.result.outcome == "succeeded", record
        [vdi] = vdis_named(env.sim)
        assert vdi["$SR"] == SR_A2 and env.sim.simulator.stats.migrations[DISK] == 1


async def _retried(env: Env) -> bool:
    record = await env.jobs.get(DISK)
    return record is not None and record.attempt >= 2 and record.is_active


async def test_a_pool_connected_again_but_not_yet_loaded_proves_no_absence(ctl: Controller) -> None:
    """xo-server marks a reconnected pool connected before xen-api's initial fetch brings its objects (issue 14
    review): until the pool's objects show, an empty lookup there is not a deleted disk. DeleteVolume answers
    UNAVAILABLE meanwhile (the disk kept), then deletes it once they show."""
    created = await ctl.servicer.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-reload", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB), volume_capabilities=[MOUNT],
        parameters={"srsWithTag": "k8s-shared"}), Context())  # type: ignore[arg-type]
    vdi_id = created.volume.volume_id  # a fixed shared volume: the bare VDI UUID
    mirror = ctl.sim.simulator.mirror
    pool = ctl.sim.simulator.store.get(vdi_id, "VDI")["$pool"]
    mirror.lag = Lag.parse("3000")  # XO's initial fetch of the pool lasts 3 s (a large pool), the status at once
    ctl.lose_pool(pool)
    ctl.regain_pool(pool)
    assert mirror.is_connected(pool) and mirror.cache.find(vdi_id) is None
    delete = csi_pb2.DeleteVolumeRequest(volume_id=vdi_id)

    with pytest.raises(XoPoolDisconnected, match=f"XO is still loading the objects of pool {pool}"):
        await ctl.servicer.DeleteVolume(delete, Context())  # type: ignore[arg-type]

    assert ctl.sim.simulator.store.find(vdi_id) is not None
    await eventually(lambda: mirror.cache.find(vdi_id) is not None, 10, description="the pool's objects back")
    await ctl.servicer.DeleteVolume(delete, Context())  # type: ignore[arg-type]
    assert ctl.sim.simulator.store.find(vdi_id) is None


async def test_a_creation_cut_between_xo_renaming_and_describing_the_disk_is_completed_by_its_retry(
        ctl: Controller) -> None:
    """XO's vdi.set renames (VDI.set_name_label), then describes (VDI.set_name_description): a CreateVolume cut in
    between leaves the final name undescribed. Its retry answers the volume and writes the class's csi:info, so the
    volume is listed and, for a migrating class, may migrate."""
    half = await ctl.sim.simulator.xapi.create_vdi(SR_NFS_A, name_label="csi-pvc-half", size=64 * MiB)
    await eventually(lambda: ctl.sim.simulator.mirror.cache.find(half["id"]) is not None, 5,
                     description="XO's cache shows the renamed, undescribed disk")
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-half", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB), volume_capabilities=[MOUNT],
        parameters={"srsWithTag": "k8s-shared"})

    created = await ctl.servicer.CreateVolume(request, Context())  # type: ignore[arg-type]

    assert created.volume.volume_id == half["id"]
    described = await ctl.xo.get_vdi(half["id"])
    assert described is not None and vdi_metadata.parse(described.name_description) is not None
    listed = await ctl.servicer.ListVolumes(csi_pb2.ListVolumesRequest(), Context())  # type: ignore[arg-type]
    assert [entry.volume.volume_id for entry in listed.entries] == [half["id"]]


async def test_a_write_xo_answers_no_such_object_while_it_lost_the_pool_is_retried_not_failed(
        amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    """The job read the disk, then XO lost its pool: the mark's vdi.set answers "no such object" (code 1). That
    proves nothing while XO has lost a pool: the job is retried (not failed for good) and completes once the pool
    is back, with one copy."""
    async with open_env(amqp_vhost, redis_server, redis_prefix) as env:
        sim = env.sim.simulator
        sim.faults.add(Faults.parse([{"method": "vdi.set", "error": {"code": 1, "message": "no such object"},
                                      "count": 1}]))
        sim.faults.latency = Latency.parse("server.getAll=1000")  # room to lose the pool before XO answers it
        await env.worker("w1", max_attempts=1000)
        await env.submit()
        await eventually(lambda: sim.faults.rules()[0]["count"] == 0, 10, description="the mark answered code 1")
        sim.outages.disconnect(POOL_A, None)
        sim.faults.latency = Latency.parse(None)
        await eventually(lambda: _retried(env), 10, description="the job retried while the pool is lost")
        sim.outages.reconnect(POOL_A)
        record = await eventually(env.finished, 20, description="the job finished")
        assert record.result is not None and record.result.outcome == "succeeded", record
        [vdi] = vdis_named(env.sim)
        assert vdi["$SR"] == SR_A2 and sim.stats.migrations[DISK] == 1


async def test_a_move_between_its_rename_and_the_source_s_deletion_is_a_copy_in_progress_not_a_stray(
        ctl: Controller) -> None:
    """Between a move's rename (the copy takes the disk's name, still carrying its transfer mark) and the source's
    deletion, two idle VDIs carry the name: ControllerGetVolume calls that a copy in progress, not an abnormal
    volume whose stray copy the user should remove by hand."""
    created = await ctl.servicer.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-g", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB), volume_capabilities=[MOUNT],
        parameters={"srsWithTag": "k8s-migrating", "migrating": "true"}), Context())  # type: ignore[arg-type]
    [source] = await ctl.xo.find_vdis(name_label="csi-pvc-g")
    copy = await ctl.sim.simulator.xapi.create_vdi(
        SR_LOCAL_A2, name_label="csi-pvc-g", size=64 * MiB,
        name_description=f'csi:transfer: {{"state":"complete","kind":"move","from":"{source.id}","job":"j",'
                         '"info":"csi:info: {}"}')

    async def both_shown() -> bool:
        return len(await ctl.xo.find_vdis(name_label="csi-pvc-g")) == 2
    await eventually(both_shown, 5, 0.05, description="XO's cache shows the renamed copy")
    assert not copy["current_operations"] and not source.current_operations

    got = await ctl.servicer.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
        volume_id=created.volume.volume_id), Context())  # type: ignore[arg-type]

    assert (got.status.volume_condition.abnormal, got.status.volume_condition.message) == (
        False, "a migration copy is in progress")


@pytest.mark.parametrize(("leftover_sr", "leftover_size", "limit", "reused"), [
    (SR_LOCAL_A2, 64 * MiB, 0, True),  # what this request would make: the retry finishes it
    (SR_LOCAL_A1, 64 * MiB, 0, False),  # the pod moved to host-a2 since: a disk there would be ALREADY_EXISTS
    (SR_LOCAL_A2, 128 * MiB, 96 * MiB, False),  # above the limit asked now
])
async def test_a_creation_cut_after_disk_create_is_resumed_only_with_a_disk_this_request_would_make(
        leftover_sr: str, leftover_size: int, limit: int, reused: bool) -> None:
    """An attempt cut after disk.create leaves ``csi-temp-<name>``; the retry finishes it only when it is a disk this
    request would make (size in range, SR of the class reached by the topology). Any other is deleted and the disk
    placed anew. Before, a leftover on another host was renamed to the final name and answered ALREADY_EXISTS to
    this request and every retry after it."""
    async with controller(settings={"host_topology": True}) as ctl:
        leftover = await ctl.xo.create_disk("csi-temp-pvc-x", leftover_size, leftover_sr)
        request = csi_pb2.CreateVolumeRequest(
            name="pvc-x", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB, limit_bytes=limit),
            volume_capabilities=[MOUNT], parameters={"srsWithTag": "k8s-migrating"})
        term = {"pool": POOL_A, "host": HOST_A2}
        request.accessibility_requirements.requisite.add(segments=term)
        request.accessibility_requirements.preferred.add(segments=term)

        created = await ctl.servicer.CreateVolume(request, Context())  # type: ignore[arg-type]

        [disk] = await ctl.xo.find_vdis(name_label="csi-pvc-x")
        assert (disk.id == leftover, disk.sr_id, disk.size) == (reused, SR_LOCAL_A2, 64 * MiB if not reused else
                                                                leftover_size)
        assert created.volume.capacity_bytes == disk.size
        assert await ctl.xo.find_vdis(name_label="csi-temp-pvc-x") == []
        assert [dict(t.segments) for t in created.volume.accessible_topology] == [term]
