"""The CSI Identity service: plugin name and version, capabilities, and Probe (ready while this process serves).

Probe is what the liveness-probe sidecar turns into the container's liveness: it never asks XO, RabbitMQ or Redis,
since restarting the plugin brings none of them back (issue 10 item 7). Their reachability is readiness:
``/readyz`` on the metrics port (app.py ``Frontend.readiness``)."""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2

from shared.csi import csi_pb2, csi_pb2_grpc

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
    """The capabilities are plugin-wide: every instance, whatever its mode, answers the same."""

    def __init__(self, driver_name: str) -> None:
        self._name = driver_name

    async def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest, context: grpc.aio.ServicerContext
                            ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._name, vendor_version=VERSION)

    async def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                                    context: grpc.aio.ServicerContext) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=CAPABILITIES)

    async def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.aio.ServicerContext) -> csi_pb2.ProbeResponse:
        """Ready: the process answers gRPC (a wedged event loop does not, and the probe times out)."""
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
