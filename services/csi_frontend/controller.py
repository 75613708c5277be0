"""The CSI Controller service: request checks and proto conversion; the work is in provisioning.py
and attach.py. RPC names are kept verbatim; errors are raised, never aborted here.

Every handler checks its REQUIRED fields (INVALID_ARGUMENT) before it resolves the volume id, so a missing
field is reported as such even for an id that names no volume (NOT_FOUND), as csi-sanity expects.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import wrappers_pb2

from services.csi_frontend import validation as check
from services.csi_frontend.attach import Attacher
from services.csi_frontend.cloning import Cloner, CloneRequest
from services.csi_frontend.disks import DiskLocator
from services.csi_frontend.provisioning import Provisioner, class_mismatch
from services.csi_frontend.selected_node import SelectedNode
from shared import storage_class
from shared import volume_id as vid
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.errors import InvalidRequest, OperationPending, VolumeNotFound
from shared.units import DISK_STEP
from shared.vdi_metadata import StorageInfo
from shared.xo.inventory import Inventory

_Cap = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = (
    _Cap.CREATE_DELETE_VOLUME,
    _Cap.PUBLISH_UNPUBLISH_VOLUME,
    _Cap.LIST_VOLUMES,
    _Cap.LIST_VOLUMES_PUBLISHED_NODES,
    _Cap.GET_CAPACITY,
    _Cap.EXPAND_VOLUME,
    _Cap.GET_VOLUME,
    _Cap.VOLUME_CONDITION,
    _Cap.PUBLISH_READONLY,
    _Cap.SINGLE_NODE_MULTI_WRITER,  # Kubernetes sends RWO as SINGLE_NODE_MULTI_WRITER, RWOP as ..._SINGLE_WRITER
)
DEFAULT_DEADLINE_S = 120.0


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    """CSI Controller over XO."""

    def __init__(self, provisioner: Provisioner, attacher: Attacher, disks: DiskLocator, inventory: Inventory,
                 selected_node: SelectedNode | None = None, cloner: Cloner | None = None) -> None:
        self._provisioner = provisioner
        self._attacher = attacher
        self._disks = disks
        self._inventory = inventory
        self._selected_node = selected_node  # WaitForFirstConsumer: the selected node's host first (selected_node.py)
        self._cloner = cloner  # CLONE_VOLUME: only with the migration queue (RabbitMQ + Redis)

    async def CreateVolume(self, request: csi_pb2.CreateVolumeRequest, context: grpc.aio.ServicerContext
                           ) -> csi_pb2.CreateVolumeResponse:
        vid.validate_volume_name(request.name, "name")
        check.check_capabilities(request.volume_capabilities)
        check.check_map(request.parameters, "parameters")
        source_id = self._clone_source(request)
        if request.mutable_parameters:
            raise InvalidRequest("mutable_parameters are not supported (no MODIFY_VOLUME capability): "
                                 "drop the VolumeAttributesClass")
        params = storage_class.parse(request.parameters)
        size = check.size_range(request.capacity_range if request.HasField("capacity_range") else None)
        reqs = request.accessibility_requirements
        preferred = check.topology_terms(reqs.preferred)
        if self._selected_node is not None:
            preferred = [*await self._selected_node.terms(request.parameters), *preferred]
        requisite = check.topology_terms(reqs.requisite)
        if source_id is not None and self._cloner is not None:
            sized = request.HasField("capacity_range") and request.capacity_range.required_bytes > 0
            # Unsized: the clone takes its source's size, so no default minimum (a retry finding a clone of a small
            # source must not answer ALREADY_EXISTS for it); a limit still holds.
            clone = CloneRequest(request.name, size if sized else (0, size[1]), sized, params, requisite, preferred,
                                 source_id)
            created = await self._cloner.create(clone, _deadline_s(context))
        else:
            created = await self._provisioner.create(request.name, size, params, requisite, preferred,
                                                     _deadline_s(context))
        volume = csi_pb2.Volume(
            volume_id=str(created.volume_id),
            capacity_bytes=created.size_bytes,
            volume_context=created.context,
            accessible_topology=[csi_pb2.Topology(segments=s) for s in created.topology],
        )
        if source_id is not None:
            volume.content_source.volume.volume_id = source_id
        return csi_pb2.CreateVolumeResponse(volume=volume)

    def _clone_source(self, request: csi_pb2.CreateVolumeRequest) -> str | None:
        """The source volume id of a clone request (None without a source); INVALID_ARGUMENT for snapshots, and
        for clones when this controller has no migration queue to run them."""
        if not request.HasField("volume_content_source"):
            return None
        source = request.volume_content_source
        if not source.HasField("volume"):
            raise InvalidRequest("volume_content_source.snapshot is not supported: this driver has no snapshots "
                                 "(XO has no per-disk snapshot call); clone a volume instead")
        if self._cloner is None:
            raise InvalidRequest("volume_content_source.volume is not supported here: clones run on the migration "
                                 "queue, and this controller has none configured (set AMQP_URL and REDIS_URL)")
        return check.require(source.volume.volume_id, "volume_content_source.volume.volume_id")

    async def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest, context: grpc.aio.ServicerContext
                           ) -> csi_pb2.DeleteVolumeResponse:
        """A volume that does not exist, or an id this driver never made, is deleted already: OK (spec)."""
        try:
            volume = vid.parse(request.volume_id)
        except VolumeNotFound:
            return csi_pb2.DeleteVolumeResponse()
        await self._provisioner.delete(volume, _deadline_s(context))
        return csi_pb2.DeleteVolumeResponse()

    async def ControllerPublishVolume(self, request: csi_pb2.ControllerPublishVolumeRequest,
                                      context: grpc.aio.ServicerContext) -> csi_pb2.ControllerPublishVolumeResponse:
        check.require(request.volume_id, "volume_id")
        node_id = check.require(request.node_id, "node_id")
        if not request.HasField("volume_capability"):
            raise InvalidRequest("volume_capability is required: set access_type (block or mount) and access_mode")
        check.check_capability(request.volume_capability)
        volume = vid.parse(request.volume_id)
        read_only = request.readonly or request.volume_capability.access_mode.mode in check.READ_ONLY_MODES
        publish_context = await self._attacher.publish(volume, node_id, read_only, _deadline_s(context))
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=publish_context)

    async def ControllerUnpublishVolume(self, request: csi_pb2.ControllerUnpublishVolumeRequest,
                                        context: grpc.aio.ServicerContext
                                        ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        """From ``node_id``, or from every node when it is unset. A volume or node that does not exist, or an
        id this driver never made, is attached nowhere: OK (spec: "can be safely regarded as unpublished")."""
        try:
            volume = vid.parse(request.volume_id)
        except VolumeNotFound:
            return csi_pb2.ControllerUnpublishVolumeResponse()
        await self._attacher.unpublish(volume, request.node_id or None, _deadline_s(context))
        return csi_pb2.ControllerUnpublishVolumeResponse()

    async def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        """``confirmed`` only when every capability is supported and the parameters are the volume's class."""
        check.require(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise InvalidRequest("volume_capabilities is required: give at least one (block or mount, with an "
                                 "access mode)")
        disk = await self._disks.get(vid.parse(request.volume_id))
        problems = [p for p in map(check.capability_problem, request.volume_capabilities) if p]
        if request.parameters:
            problems += _parameter_problems(request.parameters, disk.info)
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    async def ListVolumes(self, request: csi_pb2.ListVolumesRequest, context: grpc.aio.ServicerContext
                          ) -> csi_pb2.ListVolumesResponse:
        """Volumes sorted by id; ``next_token`` is the last id of the page and the next page starts after it,
        so a token stays valid when volumes are created or deleted between pages (spec: no consistent view
        is promised). A token that is not one of our ids is ABORTED (spec: "Invalid starting_token")."""
        if request.max_entries < 0:
            raise InvalidRequest("max_entries must not be negative; use 0 for no limit")
        after = _page_start(request.starting_token)
        entries = [e for e in await self._provisioner.list_volumes() if e.listed_id > after]
        has_more = 0 < request.max_entries < len(entries)
        if has_more:
            entries = entries[:request.max_entries]
        response = csi_pb2.ListVolumesResponse(next_token=entries[-1].listed_id if has_more else "")
        for entry in entries:
            item = response.entries.add()
            item.volume.volume_id = entry.listed_id
            item.volume.capacity_bytes = entry.vdi.size
            item.status.published_node_ids.extend(entry.published_vms)
            item.status.volume_condition.abnormal = entry.abnormal
            item.status.volume_condition.message = entry.condition
        return response

    async def GetCapacity(self, request: csi_pb2.GetCapacityRequest, context: grpc.aio.ServicerContext
                          ) -> csi_pb2.GetCapacityResponse:
        if request.volume_capabilities:
            check.check_capabilities(request.volume_capabilities)
        if not request.parameters:
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        params = storage_class.parse(request.parameters)
        available, largest = await self._provisioner.capacity(params, dict(request.accessible_topology.segments))
        return csi_pb2.GetCapacityResponse(  # the smallest volume: one step (XAPI rounds a size up to whole ones)
            available_capacity=available, maximum_volume_size=wrappers_pb2.Int64Value(value=largest),
            minimum_volume_size=wrappers_pb2.Int64Value(value=DISK_STEP),
        )

    async def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                                  context: grpc.aio.ServicerContext) -> csi_pb2.ControllerGetVolumeResponse:
        check.require(request.volume_id, "volume_id")
        volume = vid.parse(request.volume_id)
        state = await self._provisioner.describe(volume)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=csi_pb2.Volume(volume_id=str(volume), capacity_bytes=state.size_bytes),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=state.published_vms,
                volume_condition=csi_pb2.VolumeCondition(abnormal=state.abnormal, message=state.message),
            ),
        )

    async def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                                     context: grpc.aio.ServicerContext) -> csi_pb2.ControllerExpandVolumeResponse:
        check.require(request.volume_id, "volume_id")
        size = check.size_range(request.capacity_range if request.HasField("capacity_range") else None,
                                required=True)
        is_block = False
        if request.HasField("volume_capability"):
            check.check_capability(request.volume_capability)  # spec: "Exceeds capabilities"
            is_block = request.volume_capability.HasField("block")
        volume = vid.parse(request.volume_id)
        new_size = await self._provisioner.expand(volume, size, _deadline_s(context))
        # Offline expansion: the VDI grows while detached; the node grows the filesystem (NodeStageVolume finds
        # the device larger, or NodeExpandVolume).
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=new_size, node_expansion_required=not is_block)

    async def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                        context: grpc.aio.ServicerContext
                                        ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        capabilities = CAPABILITIES + ((_Cap.CLONE_VOLUME,) if self._cloner is not None else ())
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=_Cap(type=cap)) for cap in capabilities
        ])


def _deadline_s(context: grpc.aio.ServicerContext) -> float:
    """Seconds left to the caller (DEFAULT_DEADLINE_S when it set no deadline)."""
    remaining = context.time_remaining()
    return DEFAULT_DEADLINE_S if remaining is None else remaining


def _page_start(token: str) -> str:
    """The listed id a ListVolumes page starts after ("" for the first page): the token as given, once it is
    one of our id forms (a listed id may be a bare VDI UUID, which must not be rewritten to uuid:<VDI>)."""
    if not token:
        return ""
    try:
        vid.parse(token, "starting_token")
        return token
    except (InvalidRequest, VolumeNotFound) as exc:
        raise OperationPending(
            f"starting_token {token!r} is not a token this driver returned; restart the listing without it"
        ) from exc


def _parameter_problems(parameters: Mapping[str, str], info: StorageInfo | None) -> list[str]:
    """Why ``parameters`` do not describe the volume's StorageClass (nothing to compare for static volumes)."""
    try:
        params = storage_class.parse(parameters)
    except InvalidRequest as exc:
        return [exc.message]
    mismatch = class_mismatch(params, info) if info is not None else None
    return [mismatch] if mismatch else []
