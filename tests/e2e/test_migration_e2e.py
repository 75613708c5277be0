"""Attach-time migration end to end over gRPC, everything as separate processes as in production: the XO
simulator (real data mode), the controller, a node plugin per node VM and N migrators, on the session's
RabbitMQ (a vhost per test) and Redis (a key prefix per test).

The seed's story (a volume follows its pod from host A to host B and back, data intact, one copy per move);
shared SRs across two pools (XO cannot move a disk between pools: a clear refusal, and the volume stays usable
in its own pool); 20 volumes published at once to the other host (one copy each, nothing left in Redis or the
queues). Publishes are sent as external-attacher sends them: 300 s timeout, ABORTED/UNAVAILABLE retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from services.devstack.brokers import RabbitEndpoint, RedisEndpoint, management_client
from services.devstack.stack import Stack, StackOptions, running_stack
from services.devstack.wait import eventually
from shared import messages, vdi_metadata
from shared.csi import csi_pb2
from tests.e2e.stack import mount_cap

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(150),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="needs losetup (util-linux) for real data mode"),
]

MiB = 1024**2
T = TypeVar("T")
ATTACHER_TIMEOUT_S = 300.0  # external-attacher --timeout as m4rCsi deploys it
RETRIED_CODES = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
MIGRATING = {"srsWithTag": "k8s-migrating", "migrating": "true"}
SHARED_MIGRATING = {"srsWithTag": "k8s-shared", "migrating": "true"}


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        reason = "migration e2e needs root: the simulator attaches loop devices and the node mounts filesystems"
        print(reason)
        pytest.skip(reason)


@contextlib.asynccontextmanager
async def stack_on_session_brokers(work: Path, amqp_url: str, redis: RedisEndpoint, prefix: str,
                                   **options: Any) -> AsyncIterator[Stack]:
    """The whole stack on the session's brokers (no RabbitMQ boot): this test's vhost and key prefix."""
    async with running_stack(work, StackOptions(amqp_url=amqp_url, redis_url=redis.url, redis_prefix=prefix,
                                                management=False, **options)) as stack:
        yield stack


# --- the attacher's and kubelet's side -----------------------------------------------------------------


async def as_attacher(call: Callable[[float], Awaitable[T]], *, within_s: float = 120.0) -> T:
    """``call(timeout)`` the way external-attacher retries it: each try bounded by ATTACHER_TIMEOUT_S, ABORTED,
    UNAVAILABLE and DEADLINE_EXCEEDED retried with exponential backoff for ``within_s``; other codes raise."""
    loop = asyncio.get_running_loop()
    deadline, delay_s = loop.time() + within_s, 0.1
    while True:
        try:
            return await call(ATTACHER_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRIED_CODES or loop.time() > deadline:
                raise
        await asyncio.sleep(delay_s)  # the attacher's exponential backoff, not synchronisation
        delay_s = min(delay_s * 2, 2.0)


async def create(stack: Stack, name: str, size: int, parameters: dict[str, str],
                 preferred: dict[str, str] | None = None) -> str:
    requirements = csi_pb2.TopologyRequirement(preferred=[csi_pb2.Topology(segments=preferred)] if preferred else [])
    response = await stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size), volume_capabilities=[mount_cap()],
        parameters=parameters, accessibility_requirements=requirements), timeout=30)
    return str(response.volume.volume_id)


async def publish(stack: Stack, volume_id: str, node: str) -> dict[str, str]:
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=stack.vm_ids[node],
                                                     volume_capability=mount_cap())
    response = await as_attacher(lambda t: stack.controller.ControllerPublishVolume(request, timeout=t))
    return dict(response.publish_context)


async def unpublish(stack: Stack, volume_id: str, node: str) -> None:
    await stack.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, node_id=stack.vm_ids[node]), timeout=30)


@contextlib.asynccontextmanager
async def mounted(stack: Stack, node: str, volume_id: str, ctx: dict[str, str]) -> AsyncIterator[Path]:
    """NodeStage + NodePublish on ``node``; yields the target path; NodeUnpublish + NodeUnstage on exit."""
    tag = hashlib.sha256(f"{node}/{volume_id}".encode()).hexdigest()[:10]
    staging, target = stack.work / f"staging-{tag}", stack.work / f"target-{tag}"
    plugin = stack.node(node)
    await plugin.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging), volume_capability=mount_cap()),
        timeout=60)
    await plugin.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging), target_path=str(target),
        volume_capability=mount_cap()), timeout=30)
    try:
        yield target
    finally:
        await plugin.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=str(target)), timeout=30)
        await plugin.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging)), timeout=30)


def write_file(path: Path, size: int) -> str:
    """Random bytes, fsynced; returns their sha256."""
    data = os.urandom(size)
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- what XO, the simulator, Redis and RabbitMQ say ---------------------------------------------------------


async def sim_stats(stack: Stack) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.xo_url.replace("ws://", "http://").removesuffix("/api/"),
                                 timeout=10) as admin:
        response = await admin.get("/_sim/stats")
        response.raise_for_status()
        return dict(response.json())


async def migrations_of(stack: Stack, disk: str) -> int:
    return int((await sim_stats(stack))["migrations"].get(disk, 0))


async def srs_of(stack: Stack, disk: str) -> list[str]:
    """Names of the SRs holding a VDI named ``disk`` (one entry per VDI)."""
    names = {sr.id: sr.name_label for sr in await stack.xo.find_srs()}
    return sorted(names[vdi.sr_id] for vdi in await stack.xo.find_vdis(name_label=disk))


async def migration_mark(stack: Stack, disk: str) -> str | None:
    (vdi,) = await stack.xo.find_vdis(name_label=disk)
    info = vdi_metadata.parse(vdi.name_description)
    assert info is not None, vdi.name_description
    return info.in_progress_to_sr


async def host_segment(stack: Stack, node: str) -> dict[str, str]:
    vm = await stack.xo.get_vm(stack.vm_ids[node])
    assert vm is not None
    return {"pool": vm.pool_id, "host": vm.container}


async def redis_keys(redis: RedisEndpoint, prefix: str) -> list[str]:
    client = aioredis.Redis.from_url(redis.url, socket_timeout=5, decode_responses=True)
    try:
        return [key async for key in client.scan_iter(match=f"{prefix}*")]
    finally:
        await client.aclose()


def queue_contents(rabbit: RabbitEndpoint, vhost: str, queue: str) -> tuple[int, int]:
    """(messages the management API counts, messages a basic.get sees now, put back) of ``queue``: the count
    lags by the statistics interval, the get does not."""
    path = f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
    with management_client(rabbit) as http:
        counted = http.get(path)
        counted.raise_for_status()
        got = http.post(f"{path}/get", json={"count": 10, "ackmode": "ack_requeue_true", "encoding": "auto"})
        got.raise_for_status()
    return int(counted.json().get("messages", 0)), len(got.json())


def vhost_of(amqp_url: str) -> str:
    return unquote(amqp_url.rsplit("/", 1)[1])


# --- the tests ---------------------------------------------------------------------------------------------


async def test_volume_follows_its_pod_to_the_other_host_and_back_with_its_data(
        root: None, tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    """The seed's story on local SRs: one copy per move, to the tagged SR of the node's host, data intact."""
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=2,
                                        host_topology=True) as stack:
        disk = "csi-pvc-roam"
        volume_id = await create(stack, "pvc-roam", 64 * MiB, MIGRATING, await host_segment(stack, "node-a1"))
        assert volume_id == "name:pvc-roam"
        assert await srs_of(stack, disk) == ["Local A1"]  # WaitForFirstConsumer: placed on node-a1's host

        ctx = await publish(stack, volume_id, "node-a1")
        assert await migrations_of(stack, disk) == 0  # already usable there: attach only
        async with mounted(stack, "node-a1", volume_id, ctx) as target:
            first = await asyncio.to_thread(write_file, target / "first.bin", 8 * MiB)
        await unpublish(stack, volume_id, "node-a1")

        ctx = await publish(stack, volume_id, "node-a2")
        assert await srs_of(stack, disk) == ["Local A2"]
        assert await migrations_of(stack, disk) == 1
        assert await migration_mark(stack, disk) is None
        async with mounted(stack, "node-a2", volume_id, ctx) as target:
            assert await asyncio.to_thread(sha256_of, target / "first.bin") == first
            second = await asyncio.to_thread(write_file, target / "second.bin", 4 * MiB)
        await unpublish(stack, volume_id, "node-a2")

        ctx = await publish(stack, volume_id, "node-a1")
        assert await srs_of(stack, disk) == ["Local A1"]
        assert await migrations_of(stack, disk) == 2
        async with mounted(stack, "node-a1", volume_id, ctx) as target:
            assert await asyncio.to_thread(sha256_of, target / "first.bin") == first
            assert await asyncio.to_thread(sha256_of, target / "second.bin") == second
        # a repeated publish to where it is answers the same context, without a copy
        assert await publish(stack, volume_id, "node-a1") == ctx
        assert await migrations_of(stack, disk) == 2


async def test_shared_sr_volume_stays_in_its_pool_when_asked_to_cross_pools(
        root: None, tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    """Shared SRs across two pools: XO's vdi.migrate works within a pool only (VDI.pool_migrate / VDI.copy; an
    SR of another pool is HANDLE_INVALID), so a publish to a node of the other pool is refused with
    FAILED_PRECONDITION, nothing is copied, and the volume stays usable from every node of its own pool."""
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=1,
                                        topology="two-pools") as stack:
        disk = "csi-pvc-shared"
        pool_a = (await host_segment(stack, "node-a1"))["pool"]
        volume_id = await create(stack, "pvc-shared", 32 * MiB, SHARED_MIGRATING, {"pool": pool_a})
        assert await srs_of(stack, disk) == ["NFS A"]
        ctx = await publish(stack, volume_id, "node-a1")
        async with mounted(stack, "node-a1", volume_id, ctx) as target:
            written = await asyncio.to_thread(write_file, target / "data.bin", 4 * MiB)
        await unpublish(stack, volume_id, "node-a1")

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await publish(stack, volume_id, "node-b1")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
        assert disk in (refused.value.details() or "")
        assert await srs_of(stack, disk) == ["NFS A"]
        assert await migrations_of(stack, disk) == 0
        assert await migration_mark(stack, disk) is None  # a failed move leaves no "in progress" mark behind

        ctx = await publish(stack, volume_id, "node-a2")  # the other host of pool A: the shared SR, no copy
        assert await migrations_of(stack, disk) == 0
        async with mounted(stack, "node-a2", volume_id, ctx) as target:
            assert await asyncio.to_thread(sha256_of, target / "data.bin") == written


async def test_twenty_volumes_published_at_once_each_migrate_exactly_once_and_leave_nothing_behind(
        root: None, tmp_path: Path, amqp_vhost: str, rabbitmq: RabbitEndpoint, redis_server: RedisEndpoint,
        redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_JOB_RESULT_TTL_S", "2")  # finished job records expire soon after the test's publishes
    monkeypatch.setenv("MIGRATOR_JOB_RESULT_TTL_S", "2")
    count = 20
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=3,
                                        host_topology=True) as stack:
        on_a1 = await host_segment(stack, "node-a1")
        names = [f"pvc-herd-{n:02d}" for n in range(count)]
        volume_ids = [await create(stack, name, 16 * MiB, MIGRATING, on_a1) for name in names]
        vdis = Counter(vdi.name_label for vdi in await stack.xo.find_vdis())
        assert all(vdis[f"csi-{name}"] == 1 for name in names)

        contexts = await asyncio.gather(*(publish(stack, volume_id, "node-a2") for volume_id in volume_ids))
        assert all(ctx["device"] and ctx["vbd"] for ctx in contexts)
        assert len({ctx["device"] for ctx in contexts}) == count  # 20 distinct devices on node-a2

        stats = await sim_stats(stack)
        assert {f"csi-{name}": 1 for name in names} == {d: n for d, n in stats["migrations"].items()}
        vdis = Counter(vdi.name_label for vdi in await stack.xo.find_vdis())
        assert [name for name, n in vdis.items() if n > 1] == []
        assert [await srs_of(stack, f"csi-{name}") for name in names] == [["Local A2"]] * count

        await eventually(lambda: _nothing_under(redis_server, redis_prefix), 30, 0.2,
                         description=f"no lock or job record under {redis_prefix} once the results expired")
        vhost = vhost_of(amqp_vhost)
        for queue in (messages.JOBS_QUEUE, messages.DEAD_LETTER_QUEUE):
            await eventually(functools.partial(_empty, rabbitmq, vhost, queue), 30, 0.5,
                             description=f"{queue} empty")


async def _nothing_under(redis: RedisEndpoint, prefix: str) -> bool:
    keys = await redis_keys(redis, prefix)
    assert not keys, keys
    return True


async def _empty(rabbit: RabbitEndpoint, vhost: str, queue: str) -> bool:
    counted, got = await asyncio.to_thread(queue_contents, rabbit, vhost, queue)
    assert (counted, got) == (0, 0), f"{queue}: {counted} counted, {got} fetched"
    return True
