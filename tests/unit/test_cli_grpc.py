"""xocsi end to end over real gRPC: the CLI in-process against a grpc.aio server on a unix socket.

The server is a test double of the *plugin* with fixed answers; it records every request so the
tests can check what the CLI sent. Unimplemented RPCs answer UNIMPLEMENTED, as generated servicers do.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.wrappers_pb2 import BoolValue

from services.xocsi import cli
from shared.csi import csi_pb2, csi_pb2_grpc

VOLUME = csi_pb2.Volume(
    volume_id="vol-1",
    capacity_bytes=1024**3,
    volume_context={"sr": "sr-fast"},
    accessible_topology=[csi_pb2.Topology(segments={"zone": "a"})],
)
ALL_VOLUME_IDS = ["vol-1", "vol-2", "vol-3"]
PAGE_SIZE = 2


@dataclass
class FakePlugin:
    endpoint: str
    requests: list[Any] = field(default_factory=list)  # the request messages received, in order
    never_answer: asyncio.Event = field(default_factory=asyncio.Event)


class Identity(csi_pb2_grpc.IdentityServicer):
    def __init__(self, plugin: FakePlugin) -> None:
        self.plugin = plugin

    async def GetPluginInfo(self, request, context):  # type: ignore[no-untyped-def]
        return csi_pb2.GetPluginInfoResponse(name="csi.test.example", vendor_version="1.2.3")

    async def GetPluginCapabilities(self, request, context):  # type: ignore[no-untyped-def]
        service = csi_pb2.PluginCapability.Service
        kinds = (service.CONTROLLER_SERVICE, service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
        return csi_pb2.GetPluginCapabilitiesResponse(
            capabilities=[csi_pb2.PluginCapability(service=service(type=kind)) for kind in kinds])

    async def Probe(self, request, context):  # type: ignore[no-untyped-def]
        return csi_pb2.ProbeResponse(ready=BoolValue(value=True))


class Controller(csi_pb2_grpc.ControllerServicer):
    def __init__(self, plugin: FakePlugin) -> None:
        self.plugin = plugin

    async def CreateVolume(self, request, context):  # type: ignore[no-untyped-def]
        self.plugin.requests.append(request)
        return csi_pb2.CreateVolumeResponse(volume=VOLUME)

    async def DeleteVolume(self, request, context):  # type: ignore[no-untyped-def]
        self.plugin.requests.append(request)
        return csi_pb2.DeleteVolumeResponse()

    async def ListVolumes(self, request, context):  # type: ignore[no-untyped-def]
        # Pages of PAGE_SIZE (fewer if max_entries asks); the token is the next index.
        self.plugin.requests.append(request)
        start = int(request.starting_token or 0)
        end = start + min(PAGE_SIZE, request.max_entries or PAGE_SIZE)
        entries = [
            csi_pb2.ListVolumesResponse.Entry(volume=csi_pb2.Volume(volume_id=volume_id, capacity_bytes=1024**3))
            for volume_id in ALL_VOLUME_IDS[start:end]
        ]
        next_token = str(end) if end < len(ALL_VOLUME_IDS) else ""
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    async def ControllerPublishVolume(self, request, context):  # type: ignore[no-untyped-def]
        self.plugin.requests.append(request)
        if request.volume_id == "vol-busy":
            await context.abort(grpc.StatusCode.ABORTED, "operation pending for volume vol-busy")
        if request.volume_id == "vol-slow":
            await self.plugin.never_answer.wait()
        return csi_pb2.ControllerPublishVolumeResponse(publish_context={"device": "/dev/xvdb"})

    async def ControllerGetCapabilities(self, request, context):  # type: ignore[no-untyped-def]
        rpc = csi_pb2.ControllerServiceCapability.RPC
        kinds = (rpc.CREATE_DELETE_VOLUME, rpc.PUBLISH_UNPUBLISH_VOLUME)
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.ControllerServiceCapability(rpc=rpc(type=kind)) for kind in kinds])


class Node(csi_pb2_grpc.NodeServicer):
    def __init__(self, plugin: FakePlugin) -> None:
        self.plugin = plugin

    async def NodeStageVolume(self, request, context):  # type: ignore[no-untyped-def]
        self.plugin.requests.append(request)
        return csi_pb2.NodeStageVolumeResponse()

    async def NodeGetInfo(self, request, context):  # type: ignore[no-untyped-def]
        return csi_pb2.NodeGetInfoResponse(
            node_id="host-1", max_volumes_per_node=7, accessible_topology=csi_pb2.Topology(segments={"zone": "a"})
        )

    async def NodeGetVolumeStats(self, request, context):  # type: ignore[no-untyped-def]
        usage = csi_pb2.VolumeUsage
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=[
                usage(unit=usage.BYTES, total=10 * 1024**3, used=1024**3, available=9 * 1024**3),
                usage(unit=usage.INODES, total=1000, used=10, available=990),
            ]
        )


@pytest.fixture
async def plugin(tmp_path: Path) -> AsyncIterator[FakePlugin]:
    fake = FakePlugin(endpoint=f"unix://{tmp_path}/csi.sock")
    server = grpc.aio.server()
    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(fake), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(Controller(fake), server)
    csi_pb2_grpc.add_NodeServicer_to_server(Node(fake), server)
    server.add_insecure_port(fake.endpoint)
    await server.start()
    try:
        yield fake
    finally:
        await server.stop(grace=None)


async def xocsi(plugin: FakePlugin, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await cli.run(["--endpoint", plugin.endpoint, *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def test_volume_create_sends_the_built_request_and_prints_the_volume(plugin: FakePlugin) -> None:
    code, out, err = await xocsi(
        plugin, "volume", "create", "pvc-1", "--size", "1GiB", "--param", "sr=fast", "--fs", "ext4",
        "--requisite", "zone=a", "--secret", "token=s3cr3t",
    )  # fmt: skip

    assert (code, err) == (0, "")
    (request,) = plugin.requests
    assert isinstance(request, csi_pb2.CreateVolumeRequest)
    assert request.name == "pvc-1"
    assert request.capacity_range.required_bytes == 1024**3
    assert dict(request.parameters) == {"sr": "fast"}
    assert dict(request.secrets) == {"token": "s3cr3t"}
    assert request.volume_capabilities[0].mount.fs_type == "ext4"
    assert [dict(t.segments) for t in request.accessibility_requirements.requisite] == [{"zone": "a"}]
    assert out.splitlines() == [
        "volume.capacity_bytes: 1073741824 (1 GiB)",
        "volume.volume_id: vol-1",
        "volume.volume_context.sr: sr-fast",
        "volume.accessible_topology[0].segments.zone: a",
    ]
    assert "s3cr3t" not in out


async def test_json_prints_the_response_with_proto_field_names(plugin: FakePlugin) -> None:
    code, out, _ = await xocsi(plugin, "--json", "volume", "create", "pvc-1", "--size", "1GiB")

    assert code == 0
    expected = csi_pb2.CreateVolumeResponse(volume=VOLUME)
    assert json.loads(out) == MessageToDict(expected, preserving_proto_field_name=True)
    assert '"volume_id": "vol-1"' in out


async def test_aborted_rpc_prints_the_code_and_details_and_exits_1(plugin: FakePlugin) -> None:
    code, out, err = await xocsi(plugin, "publish", "vol-busy", "--node", "host-1")

    assert (code, out) == (1, "")
    assert err == "error: ABORTED: operation pending for volume vol-busy\n"


async def test_the_timeout_is_the_grpc_deadline(plugin: FakePlugin) -> None:
    code, _, err = await xocsi(plugin, "--timeout", "0.2", "publish", "vol-slow", "--node", "host-1")

    assert code == 1
    assert err.startswith("error: DEADLINE_EXCEEDED: ")


async def test_unimplemented_rpc_is_reported(plugin: FakePlugin) -> None:
    code, _, err = await xocsi(plugin, "snapshot", "get", "snap-1")

    assert code == 1
    assert err.startswith("error: UNIMPLEMENTED: ")


async def test_publish_prints_the_publish_context(plugin: FakePlugin) -> None:
    code, out, _ = await xocsi(plugin, "publish", "vol-1", "--node", "host-1", "--readonly")

    assert (code, out) == (0, "publish_context.device: /dev/xvdb\n")
    (request,) = plugin.requests
    assert isinstance(request, csi_pb2.ControllerPublishVolumeRequest)
    assert (request.node_id, request.readonly) == ("host-1", True)


async def test_volume_list_follows_next_token(plugin: FakePlugin) -> None:
    code, out, _ = await xocsi(plugin, "volume", "list")

    assert code == 0
    assert [r.starting_token for r in plugin.requests] == ["", "2"]
    lines = out.splitlines()
    assert lines[0].split() == ["VOLUME", "ID", "CAPACITY", "PUBLISHED", "ON", "CONDITION", "TOPOLOGY"]
    assert [line.split()[0] for line in lines[1:]] == ALL_VOLUME_IDS


async def test_volume_list_json_merges_all_pages(plugin: FakePlugin) -> None:
    code, out, _ = await xocsi(plugin, "--json", "volume", "list")

    assert code == 0
    assert [e["volume"]["volume_id"] for e in json.loads(out)["entries"]] == ALL_VOLUME_IDS


async def test_volume_list_with_max_asks_once_and_prints_next_token(plugin: FakePlugin) -> None:
    code, out, _ = await xocsi(plugin, "volume", "list", "--max", "1")

    assert code == 0
    assert [r.max_entries for r in plugin.requests] == [1]
    assert out.splitlines()[1].split()[0] == "vol-1"
    assert out.splitlines()[-1] == "next_token: 1"


async def test_empty_response_prints_ok(plugin: FakePlugin) -> None:
    code, out, _ = await xocsi(plugin, "volume", "delete", "vol-1")

    assert (code, out) == (0, "DeleteVolume: ok\n")
    assert plugin.requests == [csi_pb2.DeleteVolumeRequest(volume_id="vol-1")]


async def test_identity_summary(plugin: FakePlugin) -> None:
    code, out, _ = await xocsi(plugin, "identity")

    assert code == 0
    assert out.splitlines() == [
        "name: csi.test.example",
        "vendor_version: 1.2.3",
        "capability: CONTROLLER_SERVICE",
        "capability: VOLUME_ACCESSIBILITY_CONSTRAINTS",
        "ready: true",
    ]


async def test_identity_json_keys_each_response_by_rpc(plugin: FakePlugin) -> None:
    code, out, _ = await xocsi(plugin, "--json", "identity")

    assert code == 0
    document = json.loads(out)
    assert document["GetPluginInfo"] == {"name": "csi.test.example", "vendor_version": "1.2.3"}
    assert document["Probe"] == {"ready": True}
    assert len(document["GetPluginCapabilities"]["capabilities"]) == 2


async def test_capabilities_are_listed_by_name(plugin: FakePlugin) -> None:
    code, out, _ = await xocsi(plugin, "controller", "caps")

    assert (code, out) == (0, "capability: CREATE_DELETE_VOLUME\ncapability: PUBLISH_UNPUBLISH_VOLUME\n")


async def test_node_commands(plugin: FakePlugin) -> None:
    info = await xocsi(plugin, "node", "info")
    stage = await xocsi(
        plugin, "node", "stage", "vol-1", "--staging-path", "/stage", "--publish-context", "device=/dev/xvdb",
        "--block",
    )  # fmt: skip
    stats = await xocsi(plugin, "node", "stats", "vol-1", "--path", "/target")

    assert info == (0, "node_id: host-1\nmax_volumes_per_node: 7\naccessible_topology.segments.zone: a\n", "")
    assert stage == (0, "NodeStageVolume: ok\n", "")
    (request,) = plugin.requests
    assert isinstance(request, csi_pb2.NodeStageVolumeRequest)
    assert dict(request.publish_context) == {"device": "/dev/xvdb"}
    assert request.volume_capability.HasField("block")
    assert stats[1].splitlines() == [
        "UNIT    TOTAL   USED   AVAILABLE",
        "BYTES   10 GiB  1 GiB  9 GiB",
        "INODES  1000    10     990",
    ]
