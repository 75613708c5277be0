"""The CSI Identity service: plugin name and version, capabilities, and Probe (ready when XO answers)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import wrappers_pb2

from shared.csi import csi_pb2, csi_pb2_grpc
from shared.errors import DomainError
from shared.logging import get_logger

log = get_logger(__name__)
VERSION = "0.1.0"
_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


# The plugin "as a whole" (spec, GetPluginCapabilities): every instance answers the same set, whatever
# RPCs it serves. csi-sanity asks the node endpoint whether a Controller service exists and, told no,
# skips ControllerPublishVolume and then fails NodeStageVolume for want of a device.
CAPABILITIES = (
    csi_pb2.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)),
    csi_pb2.PluginCapability(service=_Service(type=_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
    # Offline, as m4rCsi: XCP-ng's SR drivers resize a VDI only while no VBD of it is plugged (XO code 17).
    csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.OFFLINE)),
)


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    """``probe`` is None when nothing remote must answer (node mode); else it raises when not ready.
    The capabilities are plugin-wide: every instance, whatever its mode, answers the same."""

    def __init__(self, driver_name: str, *, probe: Callable[[], Awaitable[None]] | None) -> None:
        self._name = driver_name
        self._probe = probe

    async def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest, context: grpc.aio.ServicerContext
                            ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._name, vendor_version=VERSION)

    async def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                                    context: grpc.aio.ServicerContext) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=CAPABILITIES)

    async def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.aio.ServicerContext) -> csi_pb2.ProbeResponse:
        if self._probe is None:
            return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
        try:
            await self._probe()
        except DomainError as exc:
            log.warning("probe_not_ready", reason=exc.message)
            return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=False))
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
