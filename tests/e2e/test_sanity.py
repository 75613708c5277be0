"""CSI spec checks that the upstream conformance suite (csi-sanity: tests/e2e/test_csi_sanity.py runs it) does not
make, against the stack deployed as in production, as separate processes: the XO simulator in real data mode,
the controller frontend and the node frontend of node-a1 (a split csi-sanity's all-in-one run does not exercise).

Kept from the former hand port of csi-sanity only where upstream stops: rows of the spec's error tables it leaves
out (UNIMPLEMENTED RPCs, unsupported fields, parameters of another class, ids of our own forms that name no
volume, negative max_entries), pagination (upstream's pagination spec is pending), published nodes and volume
condition (ListVolumes, ControllerGetVolume), unpublishing from every node, expansion that never shrinks, and
that real filesystems of the right size are mounted and grown. Each test cleans up what it made (LIFO, as
csi-sanity's resources.go does) and, at the end, XO holds no disk of ours.
"""

from __future__ import annotations

import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from dev.stack import running_stack
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.units import GiB
from tests.support.e2e import require_root

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="needs losetup (util-linux) for real data mode"),
]

TEST_VOLUME_SIZE = 1 * GiB
TEST_VOLUME_EXPAND_SIZE = TEST_VOLUME_SIZE + 1 * GiB  # csi-sanity's DefTestExpandIncrement
TEST_VOLUME_PARAMETERS = {"srsWithTag": "k8s-shared"}  # the shared SR: usable from every node VM
SANITY_NODE = "node-a1"
RPC_TIMEOUT_S = 30.0

CODE = grpc.StatusCode
MODE = csi_pb2.VolumeCapability.AccessMode
CONTROLLER_RPC = csi_pb2.ControllerServiceCapability.RPC
NODE_RPC = csi_pb2.NodeServiceCapability.RPC
SERVICE = csi_pb2.PluginCapability.Service

_UNIQUE_SUFFIX = f"-{secrets.token_hex(4).upper()}-{secrets.token_hex(4).upper()}"


def unique_string(prefix: str) -> str:
    return prefix + _UNIQUE_SUFFIX


def unknown_node_id() -> str:
    return f"fake-node-id-{str(uuid.uuid4())[:10]}"


# Ids of volumes that do not exist: csi-sanity's (not of a form this driver makes) and well-formed ones.
MISSING_VOLUME_IDS = {
    "sanity-default-idgen": lambda: f"fake-vol-id-{str(uuid.uuid4())[:10]}",
    "uuid-form": lambda: f"uuid:{uuid.uuid4()}",
    "bare-vdi-uuid": lambda: str(uuid.uuid4()),
    "name-form": lambda: f"name:{unique_string('never-created')}",
}


def capability(mode: int = MODE.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    """TestVolumeCapabilityWithAccessType: mount access with no fs_type, as csi-sanity sends it."""
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=MODE(mode=mode))


def create_request(name: str, *, required: int = TEST_VOLUME_SIZE, limit: int = 0) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[capability()], parameters=TEST_VOLUME_PARAMETERS,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit))


def make_create_volume_req(name: str) -> csi_pb2.CreateVolumeRequest:
    """MakeCreateVolumeReq: required and limit both the test volume size."""
    return create_request(name, limit=TEST_VOLUME_SIZE)


async def expect_code(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    """ExpectErrorCode: the call fails with ``code``; returns the message for further checks."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, f"unexpected error: {info.value.code()} {info.value.details()}"
    return info.value.details() or ""


@dataclass
class Sanity:
    """TestContext: connections and the paths csi-sanity creates around each test."""

    controller: csi_pb2_grpc.ControllerStub
    node: csi_pb2_grpc.NodeStub
    identities: dict[str, csi_pb2_grpc.IdentityStub]
    target_root: Path  # TargetPath: the parent of NodePublishVolumeRequest.target_path
    staging_path: Path  # StagingPath

    @property
    def target_path(self) -> str:
        return f"{self.target_root}/target"

    async def controller_caps(self) -> set[int]:
        response = await self.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
        return {cap.rpc.type for cap in response.capabilities}

    async def node_caps(self) -> set[int]:
        response = await self.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
        return {cap.rpc.type for cap in response.capabilities}

    async def provides_controller_service(self) -> bool:
        """node.go's BeforeEach asks the *node* endpoint's Identity whether there is a Controller service."""
        response = await self.identities["Node Service"].GetPluginCapabilities(
            csi_pb2.GetPluginCapabilitiesRequest())
        return any(cap.service.type == SERVICE.CONTROLLER_SERVICE for cap in response.capabilities)

    async def node_info(self) -> csi_pb2.NodeGetInfoResponse:
        info = await self.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert info.node_id
        return info


@dataclass
class Resources:
    """resources.go: registers what a test creates or publishes and frees it in LIFO order afterwards."""

    sc: Sanity
    managed: list[tuple[str, str]] = field(default_factory=list)  # (volume id, node id it was published to)

    async def create_volume(self, request: csi_pb2.CreateVolumeRequest) -> csi_pb2.CreateVolumeResponse:
        response = await self.sc.controller.CreateVolume(request, timeout=RPC_TIMEOUT_S)
        if response.volume.volume_id:
            self.managed.append((response.volume.volume_id, ""))
        return response

    async def must_create_volume(self, request: csi_pb2.CreateVolumeRequest) -> csi_pb2.Volume:
        volume = (await self.create_volume(request)).volume
        assert volume.volume_id, "volume ID in response is missing"
        return volume

    async def delete_volume(self, volume_id: str) -> None:
        await self.sc.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT_S)
        for index, (managed_id, _) in enumerate(self.managed):  # unregisterResource: the first entry only
            if managed_id == volume_id:
                del self.managed[index]
                break

    async def controller_publish(self, request: csi_pb2.ControllerPublishVolumeRequest
                                 ) -> csi_pb2.ControllerPublishVolumeResponse:
        response = await self.sc.controller.ControllerPublishVolume(request, timeout=RPC_TIMEOUT_S)
        if request.volume_id and request.node_id:
            self.managed.append((request.volume_id, request.node_id))
        return response

    async def cleanup(self) -> None:
        errors: list[str] = []
        stage_supported = NODE_RPC.STAGE_UNSTAGE_VOLUME in await self.sc.node_caps()
        for volume_id, node_id in reversed(self.managed):
            errors += await self._cleanup_volume(volume_id, node_id, stage_supported)
        self.managed.clear()
        assert not errors, "resource cleanup failed: " + "; ".join(errors)

    async def _cleanup_volume(self, volume_id: str, node_id: str, stage_supported: bool) -> list[str]:
        # lambdas: a grpc.aio call starts when it is created, and cleanup must run one step at a time
        node, controller, target = self.sc.node, self.sc.controller, self.sc.target_path
        steps: list[tuple[str, Callable[[], Awaitable[Any]], bool]] = [("NodeUnpublishVolume", lambda: (
            node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target),
                                     timeout=RPC_TIMEOUT_S)), True)]
        if stage_supported:
            steps.append(("NodeUnstageVolume", lambda: node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=volume_id, staging_target_path=str(self.sc.staging_path)), timeout=RPC_TIMEOUT_S), True))
        if node_id:
            steps.append(("ControllerUnpublishVolume", lambda: controller.ControllerUnpublishVolume(
                csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id),
                timeout=RPC_TIMEOUT_S), False))
        steps.append(("DeleteVolume", lambda: controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT_S), False))
        errors = []
        for name, call, not_found_is_fine in steps:
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                if not (not_found_is_fine and exc.code() == CODE.NOT_FOUND):
                    errors.append(f"{name} for volume ID {volume_id} failed: {exc.code().name} {exc.details()}")
        return errors

    # node.go's helpers: each step only when the driver has the capability, like csi-sanity
    async def publish_on_node(self, volume: csi_pb2.Volume, *, count: int = 1) -> None:
        """controllerPublishVolume + nodeStageVolume + nodePublishVolume (node.go), each ``count`` times
        where runControllerTest repeats it."""
        node_id = (await self.sc.node_info()).node_id
        publish_context: dict[str, str] = {}
        if await self.sc.provides_controller_service() and (
                CONTROLLER_RPC.PUBLISH_UNPUBLISH_VOLUME in await self.sc.controller_caps()):
            response = await self.controller_publish(csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume.volume_id, node_id=node_id, volume_capability=capability(),
                volume_context=volume.volume_context))
            publish_context = dict(response.publish_context)
        staging = ""
        if NODE_RPC.STAGE_UNSTAGE_VOLUME in await self.sc.node_caps():
            staging = str(self.sc.staging_path)
            for _ in range(count):
                await self.sc.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume.volume_id, volume_capability=capability(), staging_target_path=staging,
                    volume_context=volume.volume_context, publish_context=publish_context), timeout=RPC_TIMEOUT_S)
        for _ in range(count):
            await self.sc.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id, target_path=self.sc.target_path, staging_target_path=staging,
                volume_capability=capability(), volume_context=volume.volume_context,
                publish_context=publish_context), timeout=RPC_TIMEOUT_S)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sc(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Sanity]:
    require_root("the CSI spec checks beyond csi-sanity")
    work = tmp_path_factory.mktemp("sanity")
    async with running_stack(work) as stack:
        yield Sanity(
            controller=stack.controller,
            node=stack.node(SANITY_NODE),
            identities={
                "Node Service": csi_pb2_grpc.IdentityStub(stack.channel(stack.node_sockets[SANITY_NODE])),
                "Controller Service": csi_pb2_grpc.IdentityStub(stack.channel(stack.controller_socket)),
            },
            target_root=work / "csi-mount",
            staging_path=work / "csi-staging",
        )
        # beyond csi-sanity: after every test's cleanup, XO holds no disk of ours (an attached one cannot be
        # deleted, so this also shows that every publish was undone)
        leftovers = [vdi.name_label for vdi in await stack.xo.find_vdis() if vdi.name_label.startswith("csi-")]
        assert not leftovers, f"disks left behind: {leftovers}"


@pytest_asyncio.fixture(loop_scope="module")
async def r(sc: Sanity) -> AsyncIterator[Resources]:
    """TestContext.Setup/Teardown around Resources: csi-sanity mkdirs both paths (not their parents) before a
    test and removes them after; a driver that left a mount or a file behind makes the removal fail here."""
    sc.target_root.mkdir()
    sc.staging_path.mkdir()
    resources = Resources(sc)
    try:
        yield resources
        await resources.cleanup()
    finally:
        sc.target_root.rmdir()
        sc.staging_path.rmdir()


# --- Identity ---------------------------------------------------------------------------------------------


async def test_identity_plugin_capabilities_are_the_same_on_every_endpoint(sc: Sanity) -> None:
    """Beyond csi-sanity (spec, GetPluginCapabilities): "All instances ... SHALL return the same set of
    capabilities, regardless of ... which RPCs an instance is serving"; csi-sanity's Node tests rely on it
    by asking the node endpoint whether a Controller service exists."""
    answers = [await identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
               for identity in sc.identities.values()]
    assert all(answer == answers[0] for answer in answers), answers
    assert await sc.provides_controller_service()


# --- Requests missing a REQUIRED field (rows csi-sanity's table leaves out): INVALID_ARGUMENT -------------

Call = Callable[[Sanity], Awaitable[Any]]
MISSING_FIELD_CASES: dict[str, Call] = {
    "ValidateVolumeCapabilities without capabilities, for a volume that does not exist":
        lambda sc: sc.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=MISSING_VOLUME_IDS["name-form"]())),
    "ControllerGetVolume without volume id":
        lambda sc: sc.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest()),
    "ListVolumes with a negative max_entries":
        lambda sc: sc.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=-1)),
    "ControllerExpandVolume without capacity range, for a volume that does not exist":
        lambda sc: sc.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=MISSING_VOLUME_IDS["name-form"]())),
}


@pytest.mark.parametrize("case", list(MISSING_FIELD_CASES))
async def test_a_missing_required_field_is_invalid_argument(r: Resources, case: str) -> None:
    message = await expect_code(MISSING_FIELD_CASES[case](r.sc), CODE.INVALID_ARGUMENT)
    assert message, "the message names the field and the fix"


# --- Controller -------------------------------------------------------------------------------------------


async def test_get_capacity_for_the_class_within_the_node_topology(r: Resources) -> None:
    """Beyond csi-sanity: the class's free space as seen from the node's topology segment."""
    topology = (await r.sc.node_info()).accessible_topology
    response = await r.sc.controller.GetCapacity(csi_pb2.GetCapacityRequest(
        volume_capabilities=[capability()], parameters=TEST_VOLUME_PARAMETERS, accessible_topology=topology))
    assert response.available_capacity >= TEST_VOLUME_SIZE
    assert response.maximum_volume_size.value >= TEST_VOLUME_SIZE
    await expect_code(r.sc.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"srsWithTags": "typo"})),
                      CODE.INVALID_ARGUMENT)


async def _list_ids(sc: Sanity, max_entries: int = 0, starting_token: str = "") -> tuple[list[str], str]:
    response = await sc.controller.ListVolumes(csi_pb2.ListVolumesRequest(
        max_entries=max_entries, starting_token=starting_token))
    return [entry.volume.volume_id for entry in response.entries], response.next_token


async def test_list_volumes_pagination_walks_every_volume_once(r: Resources) -> None:
    """Beyond csi-sanity: max_entries bounds a page, next_token continues it, the last page has none."""
    for i in range(3):
        await r.must_create_volume(create_request(unique_string(f"sanity-page-{i}")))
    everything, token = await _list_ids(r.sc)
    assert len(everything) >= 3 and token == ""
    walked, token, pages = [], "", 0
    while True:
        page, token = await _list_ids(r.sc, max_entries=2, starting_token=token)
        assert len(page) <= 2 and (token == "" or len(page) == 2)
        walked += page
        pages += 1
        if not token:
            break
    assert walked == everything and pages == (len(everything) + 1) // 2


async def test_list_volumes_pagination_should_detect_volumes_added_between_pages_and_accept_tokens_when_the_last_volume_from_a_page_is_deleted(  # noqa: E501
        r: Resources) -> None:
    """The XIt of controller.go (disabled there as too fragile for index-based tokens), ported as written."""
    min_vol_count, max_entries = 3, 2
    existing: dict[str, bool] = {}
    initial, _ = await _list_ids(r.sc)
    existing |= dict.fromkeys(initial, True)
    for i in range(len(initial), min_vol_count):
        volume = await r.must_create_volume(csi_pb2.CreateVolumeRequest(
            name=f"sanity{i}", volume_capabilities=[capability()], parameters=TEST_VOLUME_PARAMETERS))
        existing[volume.volume_id] = True
    min_vol_count = max(min_vol_count, len(initial))
    page, next_token = await _list_ids(r.sc, max_entries=max_entries)
    assert len(page) == max_entries
    for volume_id in page:  # removing all listed volumes
        assert existing[volume_id]
        await r.delete_volume(volume_id)
        existing[volume_id] = False
    added = await r.must_create_volume(csi_pb2.CreateVolumeRequest(
        name="new-addition", volume_capabilities=[capability()], parameters=TEST_VOLUME_PARAMETERS))
    existing[added.volume_id] = True
    rest, _ = await _list_ids(r.sc, starting_token=next_token)
    assert len(rest) <= min_vol_count - max_entries + 1
    for volume_id in rest:  # no duplicates, nothing deleted
        assert existing[volume_id]
        existing[volume_id] = False


async def test_list_volumes_reports_the_nodes_a_volume_is_published_to(r: Resources) -> None:
    """Beyond csi-sanity: LIST_VOLUMES_PUBLISHED_NODES and VOLUME_CONDITION fill each entry's status."""
    volume = await r.must_create_volume(make_create_volume_req(unique_string("sanity-list-published")))
    node_id = (await r.sc.node_info()).node_id
    await r.controller_publish(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume.volume_id, node_id=node_id, volume_capability=capability()))
    response = await r.sc.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    entry = next(e for e in response.entries if e.volume.volume_id == volume.volume_id)
    assert list(entry.status.published_node_ids) == [node_id]
    assert entry.status.HasField("volume_condition") and not entry.status.volume_condition.abnormal
    assert entry.volume.capacity_bytes == TEST_VOLUME_SIZE


async def test_create_volume_with_already_existing_name_and_other_parameters_is_already_exists(r: Resources) -> None:
    """Beyond csi-sanity (spec, CreateVolume): same name, incompatible ``parameters`` -> ALREADY_EXISTS."""
    name = unique_string("sanity-controller-create-other-class")
    await r.must_create_volume(create_request(name))
    other = create_request(name)
    other.parameters["migrating"] = "true"
    await expect_code(r.create_volume(other), CODE.ALREADY_EXISTS)


async def test_create_volume_from_a_source_or_with_mutable_parameters_is_invalid_argument(r: Resources) -> None:
    """Beyond csi-sanity (it skips these without CLONE_VOLUME/CREATE_DELETE_SNAPSHOT/MODIFY_VOLUME): an
    unsupported field is INVALID_ARGUMENT, and nothing is created."""
    from_snapshot = make_create_volume_req(unique_string("sanity-controller-vol-from-snap"))
    from_snapshot.volume_content_source.snapshot.snapshot_id = "non-existing-snapshot-id"
    await expect_code(r.create_volume(from_snapshot), CODE.INVALID_ARGUMENT)
    mutable = make_create_volume_req(unique_string("sanity-controller-vol-with-mutable-parameters"))
    mutable.mutable_parameters["XXX_FakeKey"] = "XXX_FakeValue"
    await expect_code(r.create_volume(mutable), CODE.INVALID_ARGUMENT)


async def test_deleting_a_volume_twice_is_ok(r: Resources) -> None:
    volume = await r.must_create_volume(create_request(unique_string("sanity-controller-delete-twice")))
    await r.delete_volume(volume.volume_id)
    await r.delete_volume(volume.volume_id)


async def test_validate_volume_capabilities_with_unsupported_capabilities_is_not_confirmed(r: Resources) -> None:
    """Beyond csi-sanity (spec): ``confirmed`` only when every capability is supported; else a message says why.
    Parameters of another class are not confirmed either."""
    volume = await r.must_create_volume(create_request(unique_string("sanity-controller-validate-unsupported")))
    for mode in (MODE.MULTI_NODE_MULTI_WRITER, MODE.MULTI_NODE_SINGLE_WRITER):
        response = await r.sc.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[capability(), capability(mode)]))
        assert not response.HasField("confirmed") and "not supported" in response.message, response
    typo = await r.sc.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume.volume_id, volume_capabilities=[capability()], parameters={"srsWithTags": "x"}))
    assert not typo.HasField("confirmed") and "srsWithTags" in typo.message, typo
    same = await r.sc.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume.volume_id, volume_capabilities=[capability()], parameters=TEST_VOLUME_PARAMETERS))
    assert list(same.confirmed.volume_capabilities) == [capability()]


@pytest.mark.parametrize("kind", list(MISSING_VOLUME_IDS))
async def test_lookups_of_a_volume_that_does_not_exist_are_not_found(r: Resources, kind: str) -> None:
    """ValidateVolumeCapabilities / ControllerPublishVolume "should fail when the requested volume does not
    exist" with csi-sanity's ids, and, beyond csi-sanity, well-formed ids and ControllerGetVolume /
    ControllerExpandVolume / NodeGetVolumeStats / NodeExpandVolume (spec: "Volume does not exist")."""
    volume_id = MISSING_VOLUME_IDS[kind]()
    controller, node = r.sc.controller, r.sc.node
    node_id = (await r.sc.node_info()).node_id
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume_id, volume_capabilities=[capability()])),
        lambda: controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=unknown_node_id(), volume_capability=capability())),
        lambda: controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=capability())),
        lambda: controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)),
        lambda: controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_EXPAND_SIZE))),
        lambda: node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path="some/path")),
        lambda: node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path="some/path")),
    ]
    for call in calls:
        await expect_code(call(), CODE.NOT_FOUND)
    # ...while deleting or unpublishing what does not exist is success (spec: idempotent)
    await controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    await controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, node_id=unknown_node_id()))
    await controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id))


async def test_controller_get_volume_reports_published_nodes_and_condition(r: Resources) -> None:
    """Beyond csi-sanity: GET_VOLUME with VOLUME_CONDITION; no published node before, the node after."""
    volume = await r.must_create_volume(make_create_volume_req(unique_string("sanity-controller-get-volume")))
    request = csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
    before = await r.sc.controller.ControllerGetVolume(request)
    assert before.volume.volume_id == volume.volume_id and before.volume.capacity_bytes == TEST_VOLUME_SIZE
    assert list(before.status.published_node_ids) == [] and not before.status.volume_condition.abnormal
    node_id = (await r.sc.node_info()).node_id
    await r.controller_publish(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume.volume_id, node_id=node_id, volume_capability=capability()))
    after = await r.sc.controller.ControllerGetVolume(request)
    assert list(after.status.published_node_ids) == [node_id]


async def test_controller_unpublish_volume_without_node_id_unpublishes_from_every_node(r: Resources) -> None:
    """Beyond csi-sanity (spec): an unset node_id means "from all nodes it is published to"."""
    volume = await r.must_create_volume(make_create_volume_req(unique_string("sanity-controller-unpublish-all")))
    await r.controller_publish(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume.volume_id, node_id=(await r.sc.node_info()).node_id, volume_capability=capability()))
    await r.sc.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume.volume_id))
    got = await r.sc.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert list(got.status.published_node_ids) == []


async def test_expansion_repeated_or_smaller_keeps_the_size_and_never_shrinks(r: Resources) -> None:
    volume = await r.must_create_volume(create_request(unique_string("sanity-expand-volume")))
    request = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_EXPAND_SIZE),
        volume_capability=capability())
    for _ in range(2):  # repeating it is OK (spec: idempotent)
        response = await r.sc.controller.ControllerExpandVolume(request)
        assert response.capacity_bytes == TEST_VOLUME_EXPAND_SIZE and response.node_expansion_required
    request.capacity_range.required_bytes = TEST_VOLUME_SIZE  # asking for less keeps the size (no shrink)
    assert (await r.sc.controller.ControllerExpandVolume(request)).capacity_bytes == TEST_VOLUME_EXPAND_SIZE
    request.capacity_range.limit_bytes = TEST_VOLUME_SIZE  # ...and a limit below it is OUT_OF_RANGE
    await expect_code(r.sc.controller.ControllerExpandVolume(request), CODE.OUT_OF_RANGE)
    request.capacity_range.limit_bytes = 0  # a capability the driver cannot serve: "Exceeds capabilities"
    request.volume_capability.CopyFrom(capability(MODE.MULTI_NODE_MULTI_WRITER))
    await expect_code(r.sc.controller.ControllerExpandVolume(request), CODE.INVALID_ARGUMENT)


UNIMPLEMENTED_CASES: dict[str, Call] = {
    "CreateSnapshot": lambda sc: sc.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="name", source_volume_id="testId")),
    "DeleteSnapshot": lambda sc: sc.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
        snapshot_id="reallyfakesnapshotid")),
    "ListSnapshots": lambda sc: sc.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()),
    "GetSnapshot": lambda sc: sc.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id="none-exist-id")),
    "ControllerModifyVolume": lambda sc: sc.controller.ControllerModifyVolume(
        csi_pb2.ControllerModifyVolumeRequest(volume_id="non-existing-volume-id")),
}


@pytest.mark.parametrize("rpc", list(UNIMPLEMENTED_CASES))
async def test_rpcs_without_their_capability_are_unimplemented(r: Resources, rpc: str) -> None:
    """Beyond csi-sanity (which skips them without the capability): spec "Call not implemented"."""
    caps = await r.sc.controller_caps()
    assert not caps & {CONTROLLER_RPC.CREATE_DELETE_SNAPSHOT, CONTROLLER_RPC.LIST_SNAPSHOTS,
                       CONTROLLER_RPC.MODIFY_VOLUME}
    await expect_code(UNIMPLEMENTED_CASES[rpc](r.sc), CODE.UNIMPLEMENTED)


# --- Node ---------------------------------------------------------------------------------------------------


async def test_volume_stats_of_an_absolute_path_where_nothing_is_are_not_found(r: Resources) -> None:
    volume = await r.must_create_volume(make_create_volume_req(unique_string("sanity-node-get-volume-stats")))
    await r.publish_on_node(volume)
    await expect_code(r.sc.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=f"{r.sc.target_root}/nothing-here")), CODE.NOT_FOUND)


async def test_node_expansion_really_grows_the_mounted_filesystem(r: Resources) -> None:
    volume = await r.must_create_volume(make_create_volume_req(unique_string("sanity-node-expand-volume")))
    response = await r.sc.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_EXPAND_SIZE)))
    assert response.capacity_bytes == TEST_VOLUME_EXPAND_SIZE
    await r.publish_on_node(volume)
    expanded = await r.sc.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.volume_id, volume_path=r.sc.target_path,
        capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_VOLUME_EXPAND_SIZE)), timeout=RPC_TIMEOUT_S)
    assert expanded.capacity_bytes == TEST_VOLUME_EXPAND_SIZE
    assert shutil.disk_usage(r.sc.target_path).total > TEST_VOLUME_SIZE + TEST_VOLUME_EXPAND_SIZE // 4


async def test_a_published_volume_is_a_real_filesystem_of_its_size(r: Resources) -> None:
    info = await r.sc.node_info()
    request = make_create_volume_req(unique_string("sanity-node-full"))
    request.accessibility_requirements.requisite.append(info.accessible_topology)
    volume = await r.must_create_volume(request)
    await r.publish_on_node(volume)
    stats = await r.sc.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=r.sc.target_path))
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    total = next(u.total for u in stats.usage if u.unit == csi_pb2.VolumeUsage.BYTES)
    assert TEST_VOLUME_SIZE * 0.9 < total <= TEST_VOLUME_SIZE
