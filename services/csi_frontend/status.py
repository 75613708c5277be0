"""The single table from domain errors to gRPC status codes (looked up through the MRO).

Checked against the error tables of the CSI spec: ABORTED is "operation pending for volume",
FAILED_PRECONDITION covers "attached to another node" and "SR not usable from the node", and
RESOURCE_EXHAUSTED "unable to provision in accessible_topology".
"""

from __future__ import annotations

import grpc

from shared import errors

TABLE: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.VolumeNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NodeNotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsIncompatible: grpc.StatusCode.ALREADY_EXISTS,
    errors.OperationPending: grpc.StatusCode.ABORTED,
    errors.CapacityExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PlacementImpossible: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.BackendFailure: grpc.StatusCode.INTERNAL,
    errors.DomainError: grpc.StatusCode.INTERNAL,
}


def code_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC code of ``error``: the nearest class in its MRO that the table names, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in TABLE:
            return TABLE[cls]
    return grpc.StatusCode.INTERNAL
