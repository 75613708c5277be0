"""Bad-input sweep: malformed and hostile values sent to every entry point. Each gets a clear error with a
spec code (never INTERNAL or UNKNOWN), no process dies, and nothing is created, mounted or left behind.

Entry points: every CSI RPC of the controller and a node plugin (missing, empty, > 128 bytes, > 4 KiB maps,
unicode, path traversal, NUL) and the migration queue (malformed, wrong-typed, unknown-version and oversized
messages). XO answers with wrong types are in tests/unit/xo/test_wrong_types.py.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import pytest

from dev.brokers import RabbitEndpoint, RedisEndpoint
from dev.stack import Stack
from dev.wait import eventually
from shared import messages
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.units import MiB
from tests.support.e2e import MIGRATING, create, mount_cap, queue_contents, redis_keys, stack_on_session_brokers
from tests.support.e2e import vhost_of as vhost_name

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="needs losetup (util-linux) for real data mode"),
]

HOSTILE_IDS = ["", " ", "x" * 129, "é" * 70, "💥" * 40, "../../etc/passwd", "name:../../x", "name:a/b",
               "uuid:not-a-uuid", "a\x00b", "name:" + "x" * 124, "uuid:00000000-0000-0000-0000-000000000000"]
HOSTILE_PATHS = ["", "relative/path", "/tmp/../etc", "/etc/passwd", "/tmp/a\x00b", "/" + "x" * 5000]
BIG_MAP = {f"k{i}": "v" * 100 for i in range(50)}  # > 4 KiB
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK}


@pytest.fixture
async def stack(tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str
                ) -> AsyncIterator[Stack]:
    if os.geteuid() != 0:
        pytest.skip("the bad-input sweep runs the stack in real data mode, which needs root")
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=1,
                                        node_args=("--device-wait", "0.2s")) as running:
        yield running


async def answer(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def controller_calls(stack: Stack, hostile: str, node_id: str) -> list[tuple[str, Callable[[], Any]]]:
    c, cap = stack.controller, mount_cap()
    return [
        ("CreateVolume.name", lambda: c.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=hostile, volume_capabilities=[cap], parameters=MIGRATING,
            capacity_range=csi_pb2.CapacityRange(required_bytes=MiB)), timeout=20)),
        ("CreateVolume.parameters", lambda: c.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="pvc-bad", volume_capabilities=[cap], parameters={"srsWithTag": hostile}), timeout=20)),
        ("DeleteVolume", lambda: c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=hostile), timeout=20)),
        ("ControllerPublishVolume.volume_id", lambda: c.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(volume_id=hostile, node_id=node_id, volume_capability=cap),
            timeout=20)),
        ("ControllerPublishVolume.node_id", lambda: c.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(volume_id="name:pvc-ok", node_id=hostile, volume_capability=cap),
            timeout=20)),
        ("ControllerUnpublishVolume", lambda: c.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=hostile, node_id=hostile), timeout=20)),
        ("ValidateVolumeCapabilities", lambda: c.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=hostile, volume_capabilities=[cap]), timeout=20)),
        ("ListVolumes.starting_token", lambda: c.ListVolumes(
            csi_pb2.ListVolumesRequest(starting_token=hostile), timeout=20)),
        ("GetCapacity.parameters", lambda: c.GetCapacity(csi_pb2.GetCapacityRequest(
            parameters={"srsWithTag": hostile}, accessible_topology=csi_pb2.Topology(segments={"pool": hostile})),
            timeout=20)),
        ("ControllerGetVolume", lambda: c.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=hostile), timeout=20)),
        ("ControllerExpandVolume", lambda: c.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=hostile, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * MiB)), timeout=20)),
    ]


def node_calls(stack: Stack, node: str, volume_id: str, path: str) -> list[tuple[str, Callable[[], Any]]]:
    n, cap, ctx = stack.node(node), mount_cap(), {"device": path.rsplit("/", 1)[-1] or "x"}
    return [
        ("NodeStageVolume", lambda: n.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, publish_context=ctx, staging_target_path=path, volume_capability=cap), timeout=20)),
        ("NodeUnstageVolume", lambda: n.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=path), timeout=20)),
        ("NodePublishVolume", lambda: n.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=path, target_path=path, volume_capability=cap), timeout=20)),
        ("NodeUnpublishVolume", lambda: n.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=path), timeout=20)),
        ("NodeGetVolumeStats", lambda: n.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=path), timeout=20)),
        ("NodeExpandVolume", lambda: n.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume_id, volume_path=path), timeout=20)),
    ]


def mounts_outside(work: Path) -> set[str]:
    return {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if not line.split()[1].startswith(str(work))}


async def vdi_names(stack: Stack) -> list[str]:
    return sorted(v["name_label"] for v in await stack.xo.get_objects({"type": "VDI"}))


async def test_hostile_values_get_clear_spec_errors_and_change_nothing(stack: Stack) -> None:
    await create(stack, "pvc-ok", 16 * MiB, MIGRATING)
    before_vdis, before_mounts = await vdi_names(stack), mounts_outside(stack.work)
    node = "node-a1"
    seen: list[str] = []
    for hostile in HOSTILE_IDS:
        for rpc, call in controller_calls(stack, hostile, stack.vm_ids[node]):
            code, details = await answer(call())
            seen.append(f"{rpc}={code.name}")
            assert code in ALLOWED, (rpc, repr(hostile)[:40], code, details)
            assert code == grpc.StatusCode.OK or 0 < len(details) < 2048, (rpc, details)
        for rpc, call in node_calls(stack, node, hostile, str(stack.work / "x")):
            code, details = await answer(call())
            assert code in ALLOWED, (rpc, repr(hostile)[:40], code, details)
    for path in HOSTILE_PATHS:
        for rpc, call in node_calls(stack, node, "name:pvc-ok", path):
            code, details = await answer(call())
            assert code in ALLOWED, (rpc, repr(path)[:40], code, details)
    code, details = await answer(stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-big-map", volume_capabilities=[mount_cap()], parameters=BIG_MAP), timeout=20))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "4096" in details, details

    assert await vdi_names(stack) == before_vdis, "a hostile request created or removed a disk"
    assert mounts_outside(stack.work) == before_mounts, "a hostile path was mounted"
    assert not Path("/etc/passwd").is_mount()
    dead = [name for name, proc in stack.processes.items() if proc.returncode is not None]
    assert not dead, f"crashed: {dead}"
    for socket in [stack.controller_socket, *stack.node_sockets.values()]:
        identity = csi_pb2_grpc.IdentityStub(stack.channel(socket))
        assert (await identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)).name


BAD_MESSAGES: list[tuple[str, bytes]] = [
    ("not json", b"{not json"),
    ("a json array", b"[1, 2, 3]"),
    ("wrong types", json.dumps({"schema_version": 1, "job_id": 5, "disk_name": ["x"]}).encode()),
    ("unknown version", json.dumps({"schema_version": 99, "job_id": "j", "disk_name": "csi-x"}).encode()),
    ("missing fields", json.dumps({"schema_version": 1}).encode()),
    ("not utf-8", b"\xff\xfe\x00garbage"),
    ("oversized", b'{"schema_version": 1, "pad": "' + b"x" * (2 << 20) + b'"}'),
]


async def test_malformed_queue_messages_are_dead_lettered_and_the_worker_keeps_running(
        stack: Stack, rabbitmq: RabbitEndpoint, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str
) -> None:
    connection = await aio_pika.connect(amqp_vhost, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(messages.JOBS_EXCHANGE)
        for label, body in BAD_MESSAGES:
            await exchange.publish(aio_pika.Message(body=body, message_id=label.replace(" ", "-")),
                                   routing_key=messages.JOBS_ROUTING_KEY, timeout=10)
    vhost = vhost_name(amqp_vhost)

    def dead_lettered() -> bool:
        return queue_contents(rabbitmq, vhost, messages.DEAD_LETTER_QUEUE)[1] == len(BAD_MESSAGES)

    await eventually(dead_lettered, 60, 0.2, description="every bad message in the dead-letter queue")
    assert queue_contents(rabbitmq, vhost, messages.JOBS_QUEUE)[1] == 0
    migrator = stack.processes["migrator-1"]
    assert migrator.returncode is None, migrator.log_tail()
    assert await redis_keys(redis_server, redis_prefix) == []

