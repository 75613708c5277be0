"""Disks that cross pools and volumes cloned from volumes, end to end over gRPC with real bytes: the XO simulator
(real data mode, topology two-pools), the controller, a node plugin per node VM and migrators as separate processes
on the session's RabbitMQ (a vhost per test) and Redis (a key prefix per test).

Files written through a node of pool A are read back through a node of pool B after a cross-pool attach (the disk's
content streamed through XO's REST export and import), and from a clone; a migrator killed (SIGKILL) mid-stream
leaves the move to the other one, ending with one complete disk.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from dev.brokers import RedisEndpoint
from dev.stack import Stack
from dev.wait import eventually
from shared import transfer_marks
from shared.csi import csi_pb2
from shared.jobs import DEFAULT_ACTIVE_TTL_S, DEFAULT_RESULT_TTL_S, JobStore
from shared.units import MiB
from tests.support.e2e import (
    MIGRATING,
    SHARED_MIGRATING,
    as_attacher,
    create,
    host_segment,
    migration_mark,
    migrations_of,
    mount_cap,
    mounted,
    publish,
    require_root,
    sha256_of,
    sim_stats,
    srs_of,
    stack_on_session_brokers,
    unpublish,
    write_file,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180),
              pytest.mark.skipif(shutil.which("losetup") is None, reason="real data mode needs losetup (util-linux)")]
_Cap = csi_pb2.ControllerServiceCapability.RPC
# A dead worker's job is reaped within seconds, not the production 35 s.
MIGRATOR_ENV = {"MIGRATOR_JOB_HEARTBEAT_S": "1", "MIGRATOR_STALE_AFTER_S": "4", "MIGRATOR_REAPER_INTERVAL_S": "1",
                "MIGRATOR_LOCK_TTL_S": "3", "MIGRATOR_RETRY_BACKOFF_MAX_S": "2"}


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root("cross-pool e2e tests")


async def _written_on(stack: Stack, volume_id: str, node: str, name: str, size: int) -> str:
    ctx = await publish(stack, volume_id, node)
    async with mounted(stack, node, volume_id, ctx) as target:
        checksum = await asyncio.to_thread(write_file, target / name, size)
    await unpublish(stack, volume_id, node)
    return checksum


async def _read_on(stack: Stack, volume_id: str, node: str, name: str) -> str:
    ctx = await publish(stack, volume_id, node)
    async with mounted(stack, node, volume_id, ctx) as target:
        checksum = await asyncio.to_thread(sha256_of, target / name)
    await unpublish(stack, volume_id, node)
    return checksum


async def _incoming(stack: Stack, disk: str) -> int:
    return len(await stack.xo.find_vdis(name_label=transfer_marks.incoming_name(disk)))


async def test_shared_sr_volume_follows_its_pod_to_another_pool_and_back_with_its_files(
        tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    """The seed's "migration will still occur to meet topology" with shared SRs: the volume's topology spans both
    pools, a node of pool B gets the disk by a cross-pool move (no vdi.migrate), and back."""
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=1,
                                        topology="two-pools") as stack:
        disk = "csi-pvc-roam"
        pool_a = (await host_segment(stack, "node-a1"))["pool"]
        pool_b = (await host_segment(stack, "node-b1"))["pool"]
        response = await stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="pvc-roam", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
            volume_capabilities=[mount_cap()], parameters=SHARED_MIGRATING,
            accessibility_requirements=csi_pb2.TopologyRequirement(preferred=[
                csi_pb2.Topology(segments={"pool": pool_a})])), timeout=30)
        volume_id = response.volume.volume_id
        assert sorted(dict(t.segments)["pool"] for t in response.volume.accessible_topology) == sorted(
            [pool_a, pool_b])
        assert await srs_of(stack, disk) == ["NFS A"]
        first = await _written_on(stack, volume_id, "node-a1", "first.bin", 16 * MiB)

        assert await _read_on(stack, volume_id, "node-b1", "first.bin") == first
        assert await srs_of(stack, disk) == ["NFS B"]
        assert await migration_mark(stack, disk) is None
        assert await _incoming(stack, disk) == 0
        stats = await sim_stats(stack)
        assert stats["streams"] == {"rest.vdi.export": 1, "rest.vdi.import": 1}
        assert await migrations_of(stack, disk) == 0  # no vdi.migrate: it cannot cross pools

        second = await _written_on(stack, volume_id, "node-b2", "second.bin", 8 * MiB)  # pool B's shared SR
        assert (await sim_stats(stack))["streams"]["rest.vdi.export"] == 1
        assert await _read_on(stack, volume_id, "node-a2", "second.bin") == second
        assert await srs_of(stack, disk) == ["NFS A"]
        assert (await sim_stats(stack))["streams"]["rest.vdi.export"] == 2


async def test_local_sr_volume_moves_to_a_host_of_another_pool(
        tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=1,
                                        topology="two-pools", host_topology=True) as stack:
        volume_id = await create(stack, "pvc-local", 64 * MiB, MIGRATING, await host_segment(stack, "node-a1"))
        assert await srs_of(stack, "csi-pvc-local") == ["Local A1"]
        written = await _written_on(stack, volume_id, "node-a1", "data.bin", 24 * MiB)
        assert await _read_on(stack, volume_id, "node-b2", "data.bin") == written
        assert await srs_of(stack, "csi-pvc-local") == ["Local B2"]


async def test_clone_of_a_volume_in_another_pool_holds_its_files(
        tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=1,
                                        topology="two-pools") as stack:
        capabilities = await stack.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10)
        assert _Cap.CLONE_VOLUME in [cap.rpc.type for cap in capabilities.capabilities]
        pool_a = (await host_segment(stack, "node-a1"))["pool"]
        pool_b = (await host_segment(stack, "node-b1"))["pool"]
        source_id = await create(stack, "pvc-origin", 64 * MiB, SHARED_MIGRATING, {"pool": pool_a})
        ctx = await publish(stack, source_id, "node-a1")
        async with mounted(stack, "node-a1", source_id, ctx) as target:
            written = await asyncio.to_thread(write_file, target / "data.bin", 16 * MiB)
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # attached: XO cannot export it
                await _clone(stack, "pvc-copy", source_id, pool_b, 64 * MiB)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert transfer_marks.DETACH_TO_CLONE in (refused.value.details() or "")
        await unpublish(stack, source_id, "node-a1")

        clone = await _clone(stack, "pvc-copy", source_id, pool_b, 128 * MiB)  # larger than its source
        assert clone.content_source.volume.volume_id == source_id
        assert clone.capacity_bytes == 128 * MiB
        assert await srs_of(stack, "csi-pvc-copy") == ["NFS B"]
        ctx = await publish(stack, clone.volume_id, "node-b1")
        async with mounted(stack, "node-b1", clone.volume_id, ctx) as target:
            assert await asyncio.to_thread(sha256_of, target / "data.bin") == written
            fs = os.statvfs(target)
            assert fs.f_blocks * fs.f_frsize > 100 * MiB  # the source's filesystem grown to the clone's size
        await unpublish(stack, clone.volume_id, "node-b1")
        assert await _read_on(stack, source_id, "node-a2", "data.bin") == written  # the source, untouched
        again = await _clone(stack, "pvc-copy", source_id, pool_b, 128 * MiB)  # idempotent: the same volume
        assert again.volume_id == clone.volume_id
        assert (await sim_stats(stack))["streams"]["rest.vdi.export"] == 1


async def _clone(stack: Stack, name: str, source_id: str, pool: str, size: int) -> csi_pb2.Volume:
    """CreateVolume from ``source_id`` as external-provisioner sends it: ABORTED retried until the clone is done."""
    request = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size), volume_capabilities=[mount_cap()],
        parameters=SHARED_MIGRATING, volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source_id)),
        accessibility_requirements=csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(segments={"pool": pool})]))
    response = await as_attacher(lambda t: stack.controller.CreateVolume(request, timeout=min(t, 30)))
    return response.volume


async def test_migrator_killed_mid_stream_the_other_one_ends_with_one_complete_disk(
        tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in MIGRATOR_ENV.items():
        monkeypatch.setenv(name, value)
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=2,
                                        topology="two-pools", sim_args=("--stream-rate", "16MiB")) as stack:
        disk = "csi-pvc-kill"
        pool_a = (await host_segment(stack, "node-a1"))["pool"]
        volume_id = await create(stack, "pvc-kill", 128 * MiB, SHARED_MIGRATING, {"pool": pool_a})
        written = await _written_on(stack, volume_id, "node-a1", "data.bin", 64 * MiB)  # ~4 s at 16 MiB/s
        publishing = asyncio.create_task(publish(stack, volume_id, "node-b1"))
        redis = aioredis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
        jobs = JobStore(redis, redis_prefix, active_ttl_s=DEFAULT_ACTIVE_TTL_S, result_ttl_s=DEFAULT_RESULT_TTL_S)
        try:
            await _kill_the_streaming_worker(stack, jobs, disk)
            ctx = await publishing
        finally:
            await redis.aclose()
        assert ctx["device"]
        await unpublish(stack, volume_id, "node-b1")
        assert await srs_of(stack, disk) == ["NFS B"]
        assert await _incoming(stack, disk) == 0
        assert await _read_on(stack, volume_id, "node-b2", "data.bin") == written


async def _kill_the_streaming_worker(stack: Stack, jobs: JobStore, disk: str) -> None:

    async def streaming_worker() -> str:
        record = await jobs.get(disk)
        assert record is not None and record.progress is not None and record.worker is not None
        return record.worker

    worker = await eventually(streaming_worker, 60, 0.05, description="a migrator streaming the disk (progress)")
    victim = next(name for name, proc in stack.processes.items()
                  if name.startswith("migrator") and worker.endswith(f":{proc.pid}"))
    assert await _incoming(stack, disk) == 1
    await stack.processes[victim].kill()  # SIGKILL mid-stream

    async def succeeded_elsewhere() -> bool:
        record = await jobs.get(disk)
        assert record is not None and record.state == "succeeded" and record.attempt >= 2, record
        return record.worker != worker
    await eventually(succeeded_elsewhere, 90, 0.2, description="the other migrator finished the move")
