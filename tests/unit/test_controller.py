"""ControllerServicer and IdentityServicer called directly with fakes, and the interceptor over a real grpc.aio
server: the csi-sanity expectations that need no XO (field order, ids of volumes that do not exist, paging).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.csi_frontend.controller import ControllerServicer
from services.csi_frontend.disks import Disk
from services.csi_frontend.identity import IdentityServicer
from services.csi_frontend.interceptors import ErrorMappingInterceptor
from services.csi_frontend.listing import VolumeEntry
from services.csi_frontend.provisioning import CreatedVolume
from shared import vdi_metadata
from shared import volume_id as vid
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.errors import InvalidRequest, OperationPending, VolumeNotFound
from shared.storage_class import StorageParams
from shared.xo.models import Vdi

_Mode = csi_pb2.VolumeCapability.AccessMode
FOREIGN_ID = "fake-vol-id-1b4e28ba-2"  # csi-sanity's DefaultIDGenerator


def _cap(mode: int = _Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=_Mode(mode=mode))


def _vdi(name: str, description: str = 'csi:info: {"srsWithTag":"k8s-shared"}') -> Vdi:
    return Vdi.model_validate({"id": str(uuid.uuid4()), "type": "VDI", "name_label": name,
                               "name_description": description, "size": 1024**3, "$SR": "sr-nfs"})


@dataclass
class FakeProvisioner:
    entries: list[VolumeEntry] = field(default_factory=list)
    deleted: list[vid.VolumeId] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # the volume names CreateVolume asked for

    async def list_volumes(self) -> list[VolumeEntry]:
        return self.entries

    async def delete(self, volume_id: vid.VolumeId, deadline_s: float | None = None) -> None:
        self.deleted.append(volume_id)

    async def create(self, name: str, size: tuple[int, int], params: StorageParams, *_: Any) -> CreatedVolume:
        self.created.append(name)
        volume_id = vid.by_name(name) if params.migrating else vid.by_uuid(str(uuid.uuid5(uuid.NAMESPACE_OID, name)))
        return CreatedVolume(volume_id, size[0], params.context(), [])


@dataclass
class FakeAttacher:
    unpublished: list[tuple[vid.VolumeId, str | None]] = field(default_factory=list)

    async def unpublish(self, volume_id: vid.VolumeId, node_id: str | None, deadline_s: float | None = None) -> None:
        self.unpublished.append((volume_id, node_id))


@dataclass
class FakeDisks:
    """Knows the volumes in ``known``; everything else does not exist."""

    known: dict[str, Disk] = field(default_factory=dict)

    async def get(self, volume_id: vid.VolumeId) -> Disk:
        if str(volume_id) not in self.known:
            raise VolumeNotFound(f"volume {volume_id} does not exist")
        return self.known[str(volume_id)]


class FakeContext:
    def time_remaining(self) -> float | None:
        return 30.0


@dataclass
class Setup:
    servicer: ControllerServicer
    provisioner: FakeProvisioner
    attacher: FakeAttacher
    disks: FakeDisks


@pytest.fixture
def setup() -> Setup:
    provisioner, attacher, disks = FakeProvisioner(), FakeAttacher(), FakeDisks()
    servicer = ControllerServicer(provisioner, attacher, disks, inventory=None)  # type: ignore[arg-type]
    return Setup(servicer, provisioner, attacher, disks)


async def _call(setup: Setup, rpc: str, request: Any) -> Any:
    return await getattr(setup.servicer, rpc)(request, FakeContext())


async def test_deleting_or_unpublishing_an_id_this_driver_never_made_is_ok(setup: Setup) -> None:
    await _call(setup, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=FOREIGN_ID))
    await _call(setup, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=FOREIGN_ID, node_id="fake-node-id"))
    assert setup.provisioner.deleted == [] and setup.attacher.unpublished == []


@pytest.mark.parametrize(
    ("rpc", "request_"),
    [
        ("ValidateVolumeCapabilities", csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=FOREIGN_ID, volume_capabilities=[_cap()])),
        ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(
            volume_id=FOREIGN_ID, node_id="fake-node-id", volume_capability=_cap())),
        ("ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(volume_id=FOREIGN_ID)),
        ("ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
            volume_id=FOREIGN_ID, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * 1024**3))),
        ("ValidateVolumeCapabilities", csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=f"uuid:{uuid.uuid4()}", volume_capabilities=[_cap()])),
    ],
)
async def test_lookups_of_a_volume_that_does_not_exist_are_not_found(setup: Setup, rpc: str, request_: Any) -> None:
    with pytest.raises(VolumeNotFound):
        await _call(setup, rpc, request_)


@pytest.mark.parametrize(
    ("rpc", "request_", "field_name"),
    [
        ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(), "volume_id"),
        ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(volume_id=FOREIGN_ID), "node_id"),
        ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(
            volume_id=FOREIGN_ID, node_id="fake-node-id"), "volume_capability"),
        ("ValidateVolumeCapabilities", csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=FOREIGN_ID),
         "volume_capabilities"),
        ("ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(volume_id=FOREIGN_ID), "capacity_range"),
        ("ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
            volume_id=FOREIGN_ID, capacity_range=csi_pb2.CapacityRange(required_bytes=1),
            volume_capability=_cap(_Mode.MULTI_NODE_MULTI_WRITER)), "volume_capability"),
        ("DeleteVolume", csi_pb2.DeleteVolumeRequest(), "volume_id"),
        ("ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(), "volume_id"),
        ("ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(), "volume_id"),
        ("CreateVolume", csi_pb2.CreateVolumeRequest(
            name="pvc-1", volume_capabilities=[_cap()], parameters={"srsWithTag": "t"},
            mutable_parameters={"iops": "3000"}), "mutable_parameters"),
    ],
)
async def test_a_missing_or_bad_field_is_reported_before_the_volume_is_looked_up(
        setup: Setup, rpc: str, request_: Any, field_name: str) -> None:
    with pytest.raises(InvalidRequest, match=field_name):
        await _call(setup, rpc, request_)


async def test_unpublish_without_node_id_unpublishes_from_every_node(setup: Setup) -> None:
    await _call(setup, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(volume_id="name:pvc-1"))
    assert setup.attacher.unpublished == [(vid.by_name("pvc-1"), None)]


async def test_validate_confirms_only_supported_capabilities_of_the_volume_class(setup: Setup) -> None:
    vdi = _vdi("csi-pvc-1")
    setup.disks.known["name:pvc-1"] = Disk(vid.by_name("pvc-1"), vdi, vdi_metadata.parse(vdi.name_description))

    async def validate(*caps: csi_pb2.VolumeCapability, **parameters: str) -> Any:
        return await _call(setup, "ValidateVolumeCapabilities", csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id="name:pvc-1", volume_capabilities=caps, parameters=parameters))

    assert (await validate(_cap(), srsWithTag="k8s-shared")).confirmed.volume_capabilities == [_cap()]
    refused = await validate(_cap(), _cap(_Mode.MULTI_NODE_MULTI_WRITER))
    assert not refused.HasField("confirmed") and "MULTI_NODE_MULTI_WRITER is not supported" in refused.message
    other = await validate(_cap(), srsWithTag="k8s-migrating", migrating="true")
    assert not other.HasField("confirmed") and "srsWithTag=k8s-shared" in other.message


def _entries(*names: str) -> list[VolumeEntry]:
    return [VolumeEntry(f"name:{n}", _vdi(f"csi-{n}"), [], False, "volume is healthy") for n in sorted(names)]


async def _page(setup: Setup, max_entries: int = 0, token: str = "") -> tuple[list[str], str]:
    response = await _call(setup, "ListVolumes", csi_pb2.ListVolumesRequest(
        max_entries=max_entries, starting_token=token))
    return [e.volume.volume_id for e in response.entries], response.next_token


async def test_list_volumes_pages_by_max_entries_and_next_token(setup: Setup) -> None:
    setup.provisioner.entries = _entries("a", "b", "c", "d", "e")
    first, token = await _page(setup, 2)
    assert first == ["name:a", "name:b"] and token == "name:b"
    second, token = await _page(setup, 2, token)
    third, last = await _page(setup, 2, token)
    assert (second, third, last) == (["name:c", "name:d"], ["name:e"], "")
    assert await _page(setup, 5) == (["name:a", "name:b", "name:c", "name:d", "name:e"], "")
    assert await _page(setup, 0, "name:c") == (["name:d", "name:e"], "")


async def test_list_volumes_tokens_survive_deleting_the_page_they_end(setup: Setup) -> None:
    setup.provisioner.entries = _entries("a", "b", "c")
    _, token = await _page(setup, 2)
    setup.provisioner.entries = _entries("c", "new-addition")  # a and b deleted, one added
    assert await _page(setup, 0, token) == (["name:c", "name:new-addition"], "")


async def test_list_volumes_entries_carry_published_nodes_and_condition(setup: Setup) -> None:
    setup.provisioner.entries = [VolumeEntry("name:a", _vdi("csi-a"), ["vm-1"], True, "stray copy")]
    response = await _call(setup, "ListVolumes", csi_pb2.ListVolumesRequest())
    status = response.entries[0].status
    assert list(status.published_node_ids) == ["vm-1"]
    assert status.volume_condition.abnormal and status.volume_condition.message == "stray copy"


@pytest.mark.parametrize("token", ["invalid-token", "name:", "x" * 200])
async def test_list_volumes_refuses_a_token_it_did_not_make_with_aborted(setup: Setup, token: str) -> None:
    with pytest.raises(OperationPending, match="starting_token"):
        await _page(setup, 0, token)


async def test_plugin_capabilities_are_plugin_wide_the_node_plugin_answers_them_too() -> None:
    # The node plugin (no probe: nothing remote to ask) announces the Controller service too: csi-sanity asks the
    # node endpoint, and told "no controller" it skips ControllerPublishVolume and then fails NodeStageVolume.
    answer = await IdentityServicer("csi.example").GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), FakeContext())  # type: ignore[arg-type]
    service, expansion = csi_pb2.PluginCapability.Service, csi_pb2.PluginCapability.VolumeExpansion
    assert [(c.service.type, c.volume_expansion.type) for c in answer.capabilities] == [
        (service.CONTROLLER_SERVICE, expansion.UNKNOWN), (service.VOLUME_ACCESSIBILITY_CONSTRAINTS, expansion.UNKNOWN),
        (service.UNKNOWN, expansion.OFFLINE)]


@pytest.fixture
async def base_controller(tmp_path: Path) -> AsyncIterator[csi_pb2_grpc.ControllerStub]:
    """The generated ControllerServicer (every RPC unimplemented) behind the frontend's interceptor."""
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    csi_pb2_grpc.add_ControllerServicer_to_server(csi_pb2_grpc.ControllerServicer(), server)
    endpoint = f"unix://{tmp_path}/csi.sock"
    server.add_insecure_port(endpoint)
    await server.start()
    async with grpc.aio.insecure_channel(endpoint) as channel:
        yield csi_pb2_grpc.ControllerStub(channel)
    await server.stop(grace=None)


async def test_rpcs_the_driver_leaves_out_are_unimplemented_not_internal(
        base_controller: csi_pb2_grpc.ControllerStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await base_controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id="v"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CreateSnapshot is not implemented" in (info.value.details() or "")
