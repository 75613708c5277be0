"""NodeServicer called directly: validation table, capabilities, info, locking and the no-root paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.csi_frontend.node import NodeConfig, NodeServicer, RpcContext, VolumeLocks
from shared.csi import csi_pb2
from shared.errors import (
    DomainError,
    InvalidRequest,
    OperationPending,
    OutOfRange,
    PreconditionFailed,
    VolumeNotFound,
)
from tests.support.capabilities import block_capability as _block
from tests.support.capabilities import mount_capability as _mount

_Mode = csi_pb2.VolumeCapability.AccessMode
_Rpc = csi_pb2.NodeServiceCapability.RPC


class FakeContext:
    """A grpc.aio.ServicerContext stand-in: the node service only reads the deadline."""

    def __init__(self, remaining_s: float | None = 30.0) -> None:
        self._remaining_s = remaining_s

    def time_remaining(self) -> float | None:
        return self._remaining_s


def _context(remaining_s: float | None = 30.0) -> RpcContext:
    return FakeContext(remaining_s)


def _node(tmp_path: Path, **overrides: Any) -> NodeServicer:
    settings: dict[str, Any] = {"node_id": "vm-1", "device_dir": tmp_path, "device_wait_s": 0.05, **overrides}
    return NodeServicer(NodeConfig(**settings))




def _stage(**fields: Any) -> csi_pb2.NodeStageVolumeRequest:
    base: dict[str, Any] = {
        "volume_id": "name:pvc-1",
        "staging_target_path": "/var/lib/kubelet/staging/pvc-1",
        "volume_capability": _mount(),
        "publish_context": {"device": "xvdb"},
    }
    return csi_pb2.NodeStageVolumeRequest(**{**base, **fields})


def _publish(**fields: Any) -> csi_pb2.NodePublishVolumeRequest:
    base: dict[str, Any] = {
        "volume_id": "name:pvc-1",
        "staging_target_path": "/var/lib/kubelet/staging/pvc-1",
        "target_path": "/var/lib/kubelet/pods/p/volumes/pvc-1/mount",
        "volume_capability": _mount(),
        "publish_context": {"device": "xvdb"},
    }
    return csi_pb2.NodePublishVolumeRequest(**{**base, **fields})


_NO_CAP: Any = None  # proto constructors treat None as "leave the field unset"
_NO_ACCESS_TYPE = csi_pb2.VolumeCapability(access_mode=_Mode(mode=_Mode.SINGLE_NODE_WRITER))
_NO_MODE = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())
_MULTI_NODE = _mount(mode=_Mode.MULTI_NODE_MULTI_WRITER)


def _expand(required_bytes: int, limit_bytes: int) -> csi_pb2.NodeExpandVolumeRequest:
    capacity = csi_pb2.CapacityRange(required_bytes=required_bytes, limit_bytes=limit_bytes)
    return csi_pb2.NodeExpandVolumeRequest(volume_id="v", volume_path="/p", capacity_range=capacity)


INVALID = [
    ("NodeStageVolume", _stage(volume_id=""), InvalidRequest, "volume_id is required"),
    ("NodeStageVolume", _stage(volume_id="x" * 129), InvalidRequest, "volume_id is longer than 128"),
    ("NodeStageVolume", _stage(staging_target_path=""), InvalidRequest, "staging_target_path is required"),
    ("NodeStageVolume", _stage(staging_target_path="rel/dir"), InvalidRequest, "staging_target_path 'rel/dir' must be"),
    ("NodeStageVolume", _stage(staging_target_path="/a/../etc"), InvalidRequest, "staging_target_path .* '..'"),
    ("NodeStageVolume", _stage(volume_capability=_NO_CAP), InvalidRequest, "volume_capability is required"),
    (
        "NodeStageVolume",
        _stage(volume_capability=_NO_ACCESS_TYPE),
        InvalidRequest,
        "access_type must be block or mount",
    ),
    ("NodeStageVolume", _stage(volume_capability=_NO_MODE), InvalidRequest, "access mode UNKNOWN is not supported"),
    (
        "NodeStageVolume",
        _stage(volume_capability=_mount("btrfs")),
        InvalidRequest,
        "volume_capability: fs_type 'btrfs' .* ext4, ext3, xfs",
    ),
    ("NodeStageVolume", _stage(publish_context={}), InvalidRequest, "not published to this node by Controller"),
    ("NodeStageVolume", _stage(publish_context={"device": "../sda"}), InvalidRequest, "bare device name"),
    ("NodeStageVolume", _stage(publish_context={"device": ".."}), InvalidRequest, "bare device name"),
    ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(staging_target_path="/s"), InvalidRequest, "volume_id"),
    ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(volume_id="v"), InvalidRequest, "staging_target_path"),
    ("NodePublishVolume", _publish(volume_id=""), InvalidRequest, "volume_id is required"),
    ("NodePublishVolume", _publish(target_path=""), InvalidRequest, "target_path is required"),
    ("NodePublishVolume", _publish(target_path="t"), InvalidRequest, "target_path 't' must be an absolute path"),
    ("NodePublishVolume", _publish(volume_capability=_NO_CAP), InvalidRequest, "volume_capability is required"),
    ("NodePublishVolume", _publish(volume_capability=_mount("zfs")), InvalidRequest, "fs_type 'zfs'"),
    ("NodePublishVolume", _publish(staging_target_path=""), PreconditionFailed, "call NodeStageVolume first"),
    (
        "NodePublishVolume",
        _publish(volume_capability=_block(), publish_context={}),
        InvalidRequest,
        r"publish_context\['device'\] is missing",
    ),
    ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(target_path="/t"), InvalidRequest, "volume_id"),
    ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(volume_id="v"), InvalidRequest, "target_path"),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_path="/p"), InvalidRequest, "volume_id"),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_id="v"), InvalidRequest, "volume_path is required"),
    (
        "NodeGetVolumeStats",
        csi_pb2.NodeGetVolumeStatsRequest(volume_id="v", volume_path="/a/../b"),
        InvalidRequest,
        "volume_path .* '..'",
    ),
    ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_path="/p"), InvalidRequest, "volume_id"),
    ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_id="v"), InvalidRequest, "volume_path is required"),
    (
        "NodeExpandVolume",
        csi_pb2.NodeExpandVolumeRequest(volume_id="v", volume_path="/p", volume_capability=_mount("ntfs")),
        InvalidRequest,
        "fs_type 'ntfs'",
    ),
    ("NodeExpandVolume", _expand(required_bytes=-1, limit_bytes=0), OutOfRange, "capacity_range"),
    ("NodeExpandVolume", _expand(required_bytes=10, limit_bytes=5), OutOfRange, "capacity_range"),
]


@pytest.mark.parametrize(("rpc", "request_", "error", "message"), INVALID)
async def test_bad_requests_raise_a_domain_error_naming_the_field(
    tmp_path: Path, rpc: str, request_: object, error: type[DomainError], message: str
) -> None:
    with pytest.raises(error, match=message) as raised:
        await getattr(_node(tmp_path), rpc)(request_, _context())
    assert type(raised.value) is error


@pytest.mark.parametrize("rpc", ["NodeGetVolumeStats", "NodeExpandVolume"])
@pytest.mark.parametrize("volume_path", ["some/path", "/no/such/path/anywhere"])
async def test_stats_and_expand_of_a_path_holding_nothing_is_not_found(
    tmp_path: Path, rpc: str, volume_path: str
) -> None:
    """csi-sanity sends the relative "some/path" and expects NOT_FOUND, not INVALID_ARGUMENT."""
    request_cls = getattr(csi_pb2, f"{rpc}Request")
    with pytest.raises(VolumeNotFound, match="volume_path"):
        await getattr(_node(tmp_path), rpc)(request_cls(volume_id="v", volume_path=volume_path), _context())


async def test_capabilities_are_stage_expand_stats_condition_and_single_node_writer_modes(tmp_path: Path) -> None:
    response = await _node(tmp_path).NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), _context())
    kinds = {cap.rpc.type for cap in response.capabilities}
    assert kinds == {_Rpc.STAGE_UNSTAGE_VOLUME, _Rpc.EXPAND_VOLUME, _Rpc.GET_VOLUME_STATS, _Rpc.VOLUME_CONDITION,
                     _Rpc.SINGLE_NODE_MULTI_WRITER}


async def test_info_reports_node_id_limit_and_topology(tmp_path: Path) -> None:
    node = _node(tmp_path, topology={"xcp-ng.org/pool": "pool-a", "xcp-ng.org/host": "host-1"})
    response = await node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), _context())
    assert response.node_id == "vm-1"
    assert response.max_volumes_per_node == 239
    assert dict(response.accessible_topology.segments) == {"xcp-ng.org/pool": "pool-a", "xcp-ng.org/host": "host-1"}


async def test_info_without_topology_leaves_the_field_unset(tmp_path: Path) -> None:
    response = await _node(tmp_path, max_volumes_per_node=7).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), _context())
    assert response.max_volumes_per_node == 7
    assert not response.HasField("accessible_topology")


@pytest.mark.parametrize("bad", [{"node_id": ""}, {"max_volumes_per_node": -1}, {"device_wait_s": -1.0}])
def test_node_config_rejects_nonsense(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="NodeConfig"):
        _node(tmp_path, **bad)


async def test_stage_of_a_device_that_never_appears_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(VolumeNotFound, match=r"device xvdb did not appear in .* is the volume attached"):
        await _node(tmp_path).NodeStageVolume(_stage(), _context())


async def test_stage_of_a_device_that_is_not_a_block_device_fails(tmp_path: Path) -> None:
    (tmp_path / "xvdb").write_bytes(b"")
    with pytest.raises(PreconditionFailed, match="not a block device"):
        await _node(tmp_path).NodeStageVolume(_stage(), _context())


async def test_unstage_and_unpublish_of_missing_paths_succeed(tmp_path: Path) -> None:
    node = _node(tmp_path)
    gone = str(tmp_path / "never-created")
    for _ in range(2):
        await node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id="v", staging_target_path=gone), _context()
        )
        await node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="v", target_path=gone), _context())


async def test_unpublish_removes_the_empty_target_directory(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="v", target_path=str(target))
    await _node(tmp_path).NodeUnpublishVolume(request, _context())
    assert not target.exists()


async def test_stats_of_an_unmounted_directory_report_an_abnormal_volume(tmp_path: Path) -> None:
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id="v", volume_path=str(tmp_path))
    response = await _node(tmp_path).NodeGetVolumeStats(request, _context())
    assert response.volume_condition.abnormal
    assert "no longer a mountpoint" in response.volume_condition.message


async def test_expand_of_an_unmounted_directory_is_not_found_unless_block(tmp_path: Path) -> None:
    node = _node(tmp_path)
    request = csi_pb2.NodeExpandVolumeRequest(volume_id="v", volume_path=str(tmp_path))
    with pytest.raises(VolumeNotFound, match="not mounted"):
        await node.NodeExpandVolume(request, _context())
    request.volume_capability.CopyFrom(_block())
    assert (await node.NodeExpandVolume(request, _context())).capacity_bytes == 0


async def test_a_second_call_on_a_busy_volume_is_aborted(tmp_path: Path) -> None:
    locks = VolumeLocks()
    async with locks.hold("name:pvc-1"):
        with pytest.raises(OperationPending, match="name:pvc-1"):
            async with locks.hold("name:pvc-1"):
                pytest.fail("a second holder must not enter")
        async with locks.hold("name:pvc-2"):  # other volumes are independent
            pass
    async with locks.hold("name:pvc-1"):  # released when the first call ended
        pass


async def test_servicer_rejects_concurrent_calls_on_one_volume(tmp_path: Path) -> None:
    node = _node(tmp_path)
    request = csi_pb2.NodeUnstageVolumeRequest(volume_id="name:pvc-1", staging_target_path=str(tmp_path / "s"))
    async with node._locks.hold("name:pvc-1"):
        with pytest.raises(OperationPending):
            await node.NodeUnstageVolume(request, _context())
    await node.NodeUnstageVolume(request, _context())
