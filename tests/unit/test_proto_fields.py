"""shared/csi/csi.proto against values transcribed from the CSI 1.13 spec's protobuf blocks."""

from __future__ import annotations

import pytest

from shared.csi import csi_pb2, csi_pb2_grpc

# (message, {field name: field number}) as the spec declares them.
SPEC_FIELD_NUMBERS = [
    (
        csi_pb2.CreateVolumeRequest,
        {
            "name": 1,
            "capacity_range": 2,
            "volume_capabilities": 3,
            "parameters": 4,
            "secrets": 5,
            "volume_content_source": 6,
            "accessibility_requirements": 7,
            "mutable_parameters": 8,
        },
    ),
    (
        csi_pb2.ControllerPublishVolumeRequest,
        {"volume_id": 1, "node_id": 2, "volume_capability": 3, "readonly": 4, "secrets": 5, "volume_context": 6},
    ),
    (
        csi_pb2.NodeStageVolumeRequest,
        {
            "volume_id": 1,
            "publish_context": 2,
            "staging_target_path": 3,
            "volume_capability": 4,
            "secrets": 5,
            "volume_context": 6,
        },
    ),
    (
        csi_pb2.NodePublishVolumeRequest,
        {
            "volume_id": 1,
            "publish_context": 2,
            "staging_target_path": 3,
            "target_path": 4,
            "volume_capability": 5,
            "readonly": 6,
            "secrets": 7,
            "volume_context": 8,
        },
    ),
    (csi_pb2.NodeGetInfoResponse, {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3}),
    (csi_pb2.VolumeCapability, {"block": 1, "mount": 2, "access_mode": 3}),
    (csi_pb2.VolumeCapability.MountVolume, {"fs_type": 1, "mount_flags": 2, "volume_mount_group": 3}),
    (
        csi_pb2.Volume,
        {"capacity_bytes": 1, "volume_id": 2, "volume_context": 3, "content_source": 4, "accessible_topology": 5},
    ),
    (csi_pb2.GetCapacityResponse, {"available_capacity": 1, "maximum_volume_size": 2, "minimum_volume_size": 3}),
    (
        csi_pb2.NodeExpandVolumeRequest,
        {
            "volume_id": 1,
            "volume_path": 2,
            "capacity_range": 3,
            "staging_target_path": 4,
            "volume_capability": 5,
            "secrets": 6,
        },
    ),
    (csi_pb2.VolumeUsage, {"available": 1, "total": 2, "used": 3, "unit": 4}),
    (csi_pb2.ListVolumesResponse.VolumeStatus, {"published_node_ids": 1, "volume_condition": 2}),
    (
        csi_pb2.Snapshot,
        {
            "size_bytes": 1,
            "snapshot_id": 2,
            "source_volume_id": 3,
            "creation_time": 4,
            "ready_to_use": 5,
            "group_snapshot_id": 6,
        },
    ),
]

SPEC_ENUM_VALUES = [
    (
        csi_pb2.VolumeCapability.AccessMode.Mode,
        {
            "UNKNOWN": 0,
            "SINGLE_NODE_WRITER": 1,
            "SINGLE_NODE_READER_ONLY": 2,
            "MULTI_NODE_READER_ONLY": 3,
            "MULTI_NODE_SINGLE_WRITER": 4,
            "MULTI_NODE_MULTI_WRITER": 5,
            "SINGLE_NODE_SINGLE_WRITER": 6,
            "SINGLE_NODE_MULTI_WRITER": 7,
        },
    ),
    (
        csi_pb2.PluginCapability.Service.Type,
        {
            "UNKNOWN": 0,
            "CONTROLLER_SERVICE": 1,
            "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
            "GROUP_CONTROLLER_SERVICE": 3,
            "SNAPSHOT_METADATA_SERVICE": 4,
        },
    ),
    (csi_pb2.PluginCapability.VolumeExpansion.Type, {"UNKNOWN": 0, "ONLINE": 1, "OFFLINE": 2}),
    (
        csi_pb2.ControllerServiceCapability.RPC.Type,
        {
            "UNKNOWN": 0,
            "CREATE_DELETE_VOLUME": 1,
            "PUBLISH_UNPUBLISH_VOLUME": 2,
            "LIST_VOLUMES": 3,
            "GET_CAPACITY": 4,
            "CREATE_DELETE_SNAPSHOT": 5,
            "LIST_SNAPSHOTS": 6,
            "CLONE_VOLUME": 7,
            "PUBLISH_READONLY": 8,
            "EXPAND_VOLUME": 9,
            "LIST_VOLUMES_PUBLISHED_NODES": 10,
            "VOLUME_CONDITION": 11,
            "GET_VOLUME": 12,
            "SINGLE_NODE_MULTI_WRITER": 13,
            "MODIFY_VOLUME": 14,
            "GET_SNAPSHOT": 15,
        },
    ),
    (
        csi_pb2.NodeServiceCapability.RPC.Type,
        {
            "UNKNOWN": 0,
            "STAGE_UNSTAGE_VOLUME": 1,
            "GET_VOLUME_STATS": 2,
            "EXPAND_VOLUME": 3,
            "VOLUME_CONDITION": 4,
            "SINGLE_NODE_MULTI_WRITER": 5,
            "VOLUME_MOUNT_GROUP": 6,
        },
    ),
    (csi_pb2.VolumeUsage.Unit, {"UNKNOWN": 0, "BYTES": 1, "INODES": 2}),
]

SPEC_METHODS = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [
        "CreateVolume",
        "DeleteVolume",
        "ControllerPublishVolume",
        "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities",
        "ListVolumes",
        "GetCapacity",
        "ControllerGetCapabilities",
        "CreateSnapshot",
        "DeleteSnapshot",
        "ListSnapshots",
        "GetSnapshot",
        "ControllerExpandVolume",
        "ControllerGetVolume",
        "ControllerModifyVolume",
    ],
    "Node": [
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    ],
}


@pytest.mark.parametrize(
    ("message", "numbers"), SPEC_FIELD_NUMBERS, ids=[m.DESCRIPTOR.full_name for m, _ in SPEC_FIELD_NUMBERS]
)
def test_field_numbers_match_the_spec(message: type, numbers: dict[str, int]) -> None:
    fields = message.DESCRIPTOR.fields_by_name  # type: ignore[attr-defined]
    assert {name: field.number for name, field in fields.items()} == numbers


@pytest.mark.parametrize(
    ("enum", "values"), SPEC_ENUM_VALUES, ids=[e.DESCRIPTOR.full_name for e, _ in SPEC_ENUM_VALUES]
)
def test_enum_values_match_the_spec(enum: object, values: dict[str, int]) -> None:
    assert dict(enum.items()) == values  # type: ignore[attr-defined]


def test_package_and_wrapper_types() -> None:
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert csi_pb2.ProbeResponse.DESCRIPTOR.fields_by_name["ready"].message_type.full_name == (
        "google.protobuf.BoolValue"
    )
    assert csi_pb2.Snapshot.DESCRIPTOR.fields_by_name["creation_time"].message_type.full_name == (
        "google.protobuf.Timestamp"
    )
    int64 = csi_pb2.CapacityRange.DESCRIPTOR.fields_by_name["required_bytes"]
    assert int64.type == int64.TYPE_INT64


def test_services_are_exactly_identity_controller_and_node() -> None:
    services = csi_pb2.DESCRIPTOR.services_by_name
    assert {name: [m.name for m in services[name].methods] for name in services} == SPEC_METHODS


class _RecordingChannel:
    """Collects the method paths a generated stub registers; makes no calls."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def unary_unary(self, path: str, *args: object, **kwargs: object) -> None:
        self.paths.append(path)


@pytest.mark.parametrize(
    ("stub", "path"),
    [
        (csi_pb2_grpc.IdentityStub, "/csi.v1.Identity/GetPluginInfo"),
        (csi_pb2_grpc.ControllerStub, "/csi.v1.Controller/ControllerPublishVolume"),
        (csi_pb2_grpc.NodeStub, "/csi.v1.Node/NodeStageVolume"),
    ],
)
def test_generated_stubs_use_the_spec_method_paths(stub: type, path: str) -> None:
    channel = _RecordingChannel()
    stub(channel)
    assert path in channel.paths
    service = path.split("/")[1].removeprefix("csi.v1.")
    assert channel.paths == [f"/csi.v1.{service}/{method}" for method in SPEC_METHODS[service]]
