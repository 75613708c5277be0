"""Overlapping calls for one volume against real processes (issue 10 item 1): the simulator (real data mode), one
or two controller frontends, and for the migrating case RabbitMQ, Redis and two migrators.

What the attacher can cause: a retry while the earlier call still runs, several waiters joined to one migration
job, a controller handover (two replicas acting on one volume). Each test fires its calls at once, then checks the
codes (exact counts), the VBDs XO holds (exactly one), and that a later idempotent publish still works.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import httpx
import pytest

from dev.brokers import RedisEndpoint
from dev.process import ServiceProcess
from dev.stack import Stack, running_stack
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.units import MiB
from tests.support.e2e import (
    MIGRATING,
    NEEDS_LOSETUP,
    as_attacher,
    create,
    host_segment,
    migrations_of,
    mount_cap,
    require_root,
    stack_on_session_brokers,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180), NEEDS_LOSETUP]
SHARED_FIXED = {"srsWithTag": "k8s-shared"}


@pytest.fixture
def root() -> None:
    require_root("concurrency e2e")


@pytest.fixture
async def stack(root: None, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path) as running:
        yield running


def _request(stack: Stack, volume_id: str, node: str) -> csi_pb2.ControllerPublishVolumeRequest:
    return csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=stack.vm_ids[node],
                                                  volume_capability=mount_cap())


async def _code_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _vbds(stack: Stack, disk: str) -> list[tuple[str, bool]]:
    """(node VM name, plugged) of every VBD of the disk's VDI(s) as XAPI holds them (the simulator's truth, not
    XO's lagging cache: what is left behind, whatever the cache shows yet)."""
    async with httpx.AsyncClient(base_url=stack.admin_url, timeout=10) as admin:
        response = await admin.get("/_sim/state")
        response.raise_for_status()
    objects = response.json().values()
    names = {vm_id: name for name, vm_id in stack.vm_ids.items()}
    vdis = {obj["id"] for obj in objects if obj.get("type") == "VDI" and obj.get("name_label") == disk}
    return sorted((names.get(obj["VM"], obj["VM"]), bool(obj["attached"])) for obj in objects
                  if obj.get("type") == "VBD" and obj.get("VDI") in vdis)


def _summary(results: list[tuple[grpc.StatusCode, str]]) -> dict[str, int]:
    return dict(Counter(code.name for code, _ in results))


async def test_eight_simultaneous_publishes_to_one_node_attach_once(stack: Stack) -> None:
    """The issue's case: eight publishes of one volume to one node at once (an attacher retry overlapping the
    first call, or waiters of one job). Before: 1 OK + 7 FAILED_PRECONDITION, 8 VBDs, every later publish
    failing. Now: all eight OK with one VBD and one device, and a later publish answers the same context."""
    volume_id = await create(stack, "pvc-eight", 64 * MiB, SHARED_FIXED)
    controller = stack.controller
    request = _request(stack, volume_id, "node-a1")
    results = await asyncio.gather(*(_code_of(controller.ControllerPublishVolume(request, timeout=60))
                                     for _ in range(8)))
    left = await _vbds(stack, "csi-pvc-eight")
    later = [await _code_of(controller.ControllerPublishVolume(request, timeout=30)) for _ in range(3)]
    print("eight publishes:", _summary(results), "VBDs left:", left, "three later publishes:", later)
    assert _summary(results) == {"OK": 8}, results
    assert left == [("node-a1", True)]
    assert _summary(later) == {"OK": 3}
    again = await controller.ControllerPublishVolume(request, timeout=30)
    assert again.publish_context["device"] == "xvdb"
    assert await _vbds(stack, "csi-pvc-eight") == [("node-a1", True)]


async def test_two_nodes_racing_end_with_one_vbd_and_the_loser_is_told_where_it_is(stack: Stack) -> None:
    """Twenty publishes of one shared volume, ten to each node, at once: one node wins every call of its own,
    the other gets FAILED_PRECONDITION naming the winner; one VBD; the winner's publish stays idempotent."""
    volume_id = await create(stack, "pvc-race", 64 * MiB, SHARED_FIXED)
    controller = stack.controller
    calls = [controller.ControllerPublishVolume(_request(stack, volume_id, node), timeout=60)
             for _ in range(10) for node in ("node-a1", "node-a2")]
    results = await asyncio.gather(*(_code_of(call) for call in calls))
    print("two nodes racing:", _summary(results), "VBDs:", await _vbds(stack, "csi-pvc-race"))
    assert _summary(results) == {"OK": 10, "FAILED_PRECONDITION": 10}, results
    ((winner, plugged),) = await _vbds(stack, "csi-pvc-race")
    assert plugged
    loser_messages = {message for code, message in results if code == grpc.StatusCode.FAILED_PRECONDITION}
    assert all(stack.vm_ids[winner] in message for message in loser_messages), loser_messages
    again = await controller.ControllerPublishVolume(_request(stack, volume_id, winner), timeout=30)
    assert again.publish_context["device"] == "xvdb"
    assert await _vbds(stack, "csi-pvc-race") == [(winner, True)]


async def _second_controller(stack: Stack) -> tuple[ServiceProcess, csi_pb2_grpc.ControllerStub]:
    """Another controller replica on its own socket (a leader handover: both act on one volume)."""
    socket = stack.work / "controller-2.sock"
    proc = await stack.start_controller("controller-2", socket)
    return proc, csi_pb2_grpc.ControllerStub(stack.channel(socket))


async def test_two_controller_replicas_publishing_at_once_leave_one_vbd(stack: Stack) -> None:
    """A handover: eight publishes to one node split over two controller processes. XO's state decides (each
    re-reads before attaching and after XO refuses a second plug): all eight OK, one VBD."""
    volume_id = await create(stack, "pvc-handover", 64 * MiB, SHARED_FIXED)
    _, other = await _second_controller(stack)
    request = _request(stack, volume_id, "node-a1")
    first = stack.controller
    calls = [(first if n % 2 else other).ControllerPublishVolume(request, timeout=60) for n in range(8)]
    results = await asyncio.gather(*(_code_of(call) for call in calls))
    print("two replicas:", _summary(results), "VBDs:", await _vbds(stack, "csi-pvc-handover"))
    # A replica that lost the plug race to the other re-reads and reuses its VBD; a conflict it cannot settle
    # answers ABORTED (the attacher retries), never leaves a VBD.
    assert set(_summary(results)) <= {"OK", "ABORTED"}, results
    assert await _vbds(stack, "csi-pvc-handover") == [("node-a1", True)]
    for controller in (first, other):
        again = await as_attacher(lambda t, c=controller: c.ControllerPublishVolume(request, timeout=t))
        assert again.publish_context["device"] == "xvdb"
    assert await _vbds(stack, "csi-pvc-handover") == [("node-a1", True)]


async def test_two_replicas_publishing_to_two_nodes_leave_one_vbd_and_name_the_winner(stack: Stack) -> None:
    """A handover while the attacher moves a volume: ten publishes to each node, one node through each controller
    process. One node gets the volume (OK for its calls); the other's calls are refused with FAILED_PRECONDITION
    naming the winner (XO refuses the second plug, the replica reads again), or ABORTED while XO's view has not
    shown the winner's VBD yet. One VBD either way."""
    volume_id = await create(stack, "pvc-split", 64 * MiB, SHARED_FIXED)
    _, other = await _second_controller(stack)
    controllers = {"node-a1": stack.controller, "node-a2": other}
    nodes = [node for _ in range(10) for node in controllers]
    answers = await asyncio.gather(*(_code_of(controllers[node].ControllerPublishVolume(
        _request(stack, volume_id, node), timeout=60)) for node in nodes))
    results = [(node, code, message) for node, (code, message) in zip(nodes, answers, strict=True)]
    ((winner, plugged),) = await _vbds(stack, "csi-pvc-split")
    loser = next(node for node in controllers if node != winner)
    print("two replicas, two nodes:", _summary([(code, m) for _, code, m in results]), "winner:", winner)
    assert plugged
    assert {code for node, code, _ in results if node == winner} == {grpc.StatusCode.OK}
    refused = [(code, message) for node, code, message in results if node == loser]
    assert {code for code, _ in refused} <= {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED}
    assert all(stack.vm_ids[winner] in message for code, message in refused
               if code == grpc.StatusCode.FAILED_PRECONDITION), refused
    with pytest.raises(grpc.aio.AioRpcError) as info:  # once settled: a clear refusal naming the winner
        await controllers[loser].ControllerPublishVolume(_request(stack, volume_id, loser), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stack.vm_ids[winner] in (info.value.details() or "")


async def test_publish_unpublish_overlapping_leave_no_stray_vbd(stack: Stack) -> None:
    """Eight publishes and eight unpublishes of one volume interleaved at once, then one last publish: whatever
    order they ran in, XO ends with exactly the one plugged VBD of that last publish."""
    volume_id = await create(stack, "pvc-flap", 64 * MiB, SHARED_FIXED)
    controller = stack.controller
    request = _request(stack, volume_id, "node-a1")
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=stack.vm_ids["node-a1"])
    calls: list[Awaitable[object]] = []
    for _ in range(8):
        calls += [controller.ControllerPublishVolume(request, timeout=60),
                  controller.ControllerUnpublishVolume(unpublish, timeout=60)]
    results = await asyncio.gather(*(_code_of(call) for call in calls))
    print("publish/unpublish:", _summary(results))
    assert _summary(results) == {"OK": 16}, results
    await controller.ControllerPublishVolume(request, timeout=30)
    assert await _vbds(stack, "csi-pvc-flap") == [("node-a1", True)]


@pytest.mark.timeout(240)
async def test_waiters_of_one_migration_over_two_replicas_attach_once(
        root: None, tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    """Eight publishes of a volume that must migrate, four through each of two controller replicas, as the
    attacher sends them (ABORTED retried): one job, one copy, one VBD, every publish OK."""
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=2,
                                        host_topology=True) as stack:
        volume_id = await create(stack, "pvc-joined", 64 * MiB, MIGRATING, await host_segment(stack, "node-a1"))
        _, other = await _second_controller(stack)
        request = _request(stack, volume_id, "node-a2")
        first = stack.controller
        results = await asyncio.gather(*(as_attacher(
            lambda t, c=(first if n % 2 else other): c.ControllerPublishVolume(request, timeout=t))
            for n in range(8)))
        assert {r.publish_context["device"] for r in results} == {"xvdb"}
        assert await migrations_of(stack, "csi-pvc-joined") == 1
        assert await _vbds(stack, "csi-pvc-joined") == [("node-a2", True)]


async def test_eight_volumes_published_to_one_node_at_once_each_get_their_own_device(stack: Stack) -> None:
    """A pod with several claims, or the attacher's worker threads: publishes of different volumes to one node at
    once. XO picks a new VBD's device, then creates it two XAPI round trips later, so two attaches to one VM can
    pick the same device and one fails with DEVICE_ALREADY_EXISTS. The controller attaches to one VM one at a
    time: all eight answer OK at the first call, each volume with one plugged VBD on its own device."""
    names = [f"pvc-many-{n}" for n in range(8)]
    volume_ids = [await create(stack, name, 64 * MiB, SHARED_FIXED) for name in names]
    controller = stack.controller
    results = await asyncio.gather(*(_code_of(controller.ControllerPublishVolume(
        _request(stack, volume_id, "node-a1"), timeout=60)) for volume_id in volume_ids))
    assert _summary(results) == {"OK": 8}, results
    devices = [(await controller.ControllerPublishVolume(_request(stack, volume_id, "node-a1"), timeout=30))
               .publish_context["device"] for volume_id in volume_ids]
    assert sorted(devices) == ["xvdb", "xvdc", "xvde", "xvdf", "xvdg", "xvdh", "xvdi", "xvdj"]
    for name in names:
        assert await _vbds(stack, f"csi-{name}") == [("node-a1", True)]
