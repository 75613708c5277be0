"""The domain-error -> gRPC code table (services/csi_frontend/status.py), checked class by class against the CSI
spec's error tables: every error class of the project answers the code listed here, so a new class (or a change
of the table) fails until someone decides which code the CO sees."""

from __future__ import annotations

import grpc
import pytest

from services.csi_frontend.status import code_for
from tests.support.errors import all_error_classes, bare_instance

Code = grpc.StatusCode
EXPECTED = {
    "DomainError": Code.INTERNAL,
    "InvalidRequest": Code.INVALID_ARGUMENT,
    "OutOfRange": Code.OUT_OF_RANGE,
    "VolumeNotFound": Code.NOT_FOUND,
    "NodeNotFound": Code.NOT_FOUND,
    "AlreadyExistsIncompatible": Code.ALREADY_EXISTS,
    "OperationPending": Code.ABORTED,  # "operation pending for volume"
    "LockLost": Code.ABORTED,
    "NotStarted": Code.ABORTED,
    "TransferUnfinished": Code.ABORTED,
    "CapacityExhausted": Code.RESOURCE_EXHAUSTED,  # "unable to provision in accessible_topology"
    "PlacementImpossible": Code.RESOURCE_EXHAUSTED,
    "PreconditionFailed": Code.FAILED_PRECONDITION,
    "AttachedElsewhere": Code.FAILED_PRECONDITION,  # "volume published to another node"
    "BackendUnavailable": Code.UNAVAILABLE,
    "BackendFailure": Code.INTERNAL,
    "MountError": Code.INTERNAL,
    "FilesystemCorrupt": Code.FAILED_PRECONDITION,  # fsck -a cannot repair it: an administrator must
    "XoError": Code.INTERNAL,
    "XoUnavailable": Code.UNAVAILABLE,
    "XoPoolDisconnected": Code.UNAVAILABLE,
    "XoAuthError": Code.UNAVAILABLE,
    "XoNotFound": Code.INTERNAL,  # an object vanished under a call: not the volume (handlers answer NOT_FOUND)
    "XoBusy": Code.ABORTED,
    "XoVdiInUse": Code.FAILED_PRECONDITION,
    "XoInvalidParameters": Code.INTERNAL,
    "XoNoSpace": Code.RESOURCE_EXHAUSTED,
    "XoNoFreeDevice": Code.RESOURCE_EXHAUSTED,
    "XoMethodNotFound": Code.INTERNAL,
}


def test_every_error_class_answers_its_listed_code() -> None:
    assert {cls.__name__: code_for(bare_instance(cls)) for cls in all_error_classes()} == EXPECTED


@pytest.mark.parametrize("error", [RuntimeError("x"), KeyError("x"), ValueError("x")])
def test_anything_that_is_not_a_domain_error_is_internal(error: BaseException) -> None:
    assert code_for(error) is Code.INTERNAL
