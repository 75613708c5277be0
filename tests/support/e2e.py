"""e2e helpers shared by the e2e tests: capabilities, the attacher's and kubelet's side of a publish, and views
of the simulator, RabbitMQ and Redis. The stack itself runs through dev/stack.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from dev.brokers import RabbitEndpoint, RedisEndpoint, management_client
from dev.stack import Stack, StackOptions, running_stack
from dev.wait import eventually
from shared import keys, vdi_metadata
from shared.backoff import Backoff, retrying
from shared.csi import csi_pb2
from shared.units import MiB

MODE = csi_pb2.VolumeCapability.AccessMode


NEEDS_LOSETUP = pytest.mark.skipif(shutil.which("losetup") is None,
                                   reason="needs losetup (util-linux) for real data mode")


def processes_marked(marker: str) -> list[str]:
    """pid and command line of every live process whose environment carries ``marker`` (inherited from a dev
    command: the demo, a benchmark)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {cmdline[:160]}")
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def kill_marked(marker: str) -> None:
    """SIGKILL every live process whose environment carries ``marker``: what a failed test left behind must not
    load the machine under the tests after it."""
    for entry in processes_marked(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry.partition(":")[0]), signal.SIGKILL)


def require_root(what: str) -> None:
    """Skip, saying why, unless we are root: ``what`` needs the simulator's loop devices and the node's mounts."""
    if os.geteuid() != 0:
        reason = f"{what} need root: the simulator attaches loop devices and the node mounts filesystems"
        print(reason)
        pytest.skip(reason)


def mount_cap(fs_type: str = "ext4", mode: int = MODE.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


T = TypeVar("T")
ATTACHER_TIMEOUT_S = 300.0  # external-attacher --timeout as m4rCsi deploys it
ATTACHER_BACKOFF = Backoff(start_s=0.1, cap_s=2.0, jitter=False)
RETRIED_CODES = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
MIGRATING = {"srsWithTag": "k8s-migrating", "migrating": "true"}
SHARED_MIGRATING = {"srsWithTag": "k8s-shared", "migrating": "true"}


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
    return await retrying(lambda _: call(ATTACHER_TIMEOUT_S), backoff=ATTACHER_BACKOFF, give_up_after_s=within_s,
                          retry_if=lambda exc: isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRIED_CODES)


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
async def mounted(stack: Stack, node: str, volume_id: str, ctx: dict[str, str],
                  cap: csi_pb2.VolumeCapability | None = None) -> AsyncIterator[Path]:
    """NodeStage + NodePublish on ``node`` (``cap``: ext4 by default); yields the target path; NodeUnpublish +
    NodeUnstage on exit."""
    cap = cap or mount_cap()
    tag = hashlib.sha256(f"{node}/{volume_id}".encode()).hexdigest()[:10]
    staging, target = stack.work / f"staging-{tag}", stack.work / f"target-{tag}"
    plugin = stack.node(node)
    await plugin.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging), volume_capability=cap),
        timeout=60)
    await plugin.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap), timeout=30)
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
    async with httpx.AsyncClient(base_url=stack.admin_url,
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
        return [key async for key in client.scan_iter(match=keys.all_keys_pattern(prefix))]
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


# --- a volume moved from node-a1 to node-a2 with its data --------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """A volume the test created: its name, handle and disk (VDI name)."""

    name: str
    volume_id: str

    @property
    def disk(self) -> str:
        return f"csi-{self.name}"


@dataclass(frozen=True)
class Moving(Volume):
    """A volume written on node-a1 and detached, about to be published to node-a2."""

    checksum: str


async def written_on_a1(stack: Stack, name: str, data_bytes: int) -> Moving:
    """A migrating volume created on node-a1's host, ``data_bytes`` of random data written on node-a1, detached."""
    volume_id = await create(stack, name, data_bytes + 160 * MiB, MIGRATING, await host_segment(stack, "node-a1"))
    assert await srs_of(stack, f"csi-{name}") == ["Local A1"]
    ctx = await publish(stack, volume_id, "node-a1")
    async with mounted(stack, "node-a1", volume_id, ctx) as target:
        checksum = await asyncio.to_thread(write_file, target / "data.bin", data_bytes)
    await unpublish(stack, volume_id, "node-a1")
    return Moving(name, volume_id, checksum)


async def copying(stack: Stack, at_least: int = 1) -> None:
    """Return once the simulator runs ``at_least`` copies."""
    async def active() -> bool:
        return int((await sim_stats(stack))["active_migrations"]) >= at_least
    await eventually(active, 60, 0.05, description=f"{at_least} copies running in the simulator")


async def arrived_intact(stack: Stack, moving: Moving, node: str = "node-a2", host_sr: str = "Local A2") -> None:
    """One VDI, on the SR of the node's host, copied exactly once, with the data written on node-a1."""
    assert await srs_of(stack, moving.disk) == [host_sr]
    assert await migrations_of(stack, moving.disk) == 1
    ctx = await publish(stack, moving.volume_id, node)  # already published: the same answer, no copy
    async with mounted(stack, node, moving.volume_id, ctx) as target:
        assert await asyncio.to_thread(sha256_of, target / "data.bin") == moving.checksum
