"""Errors cross processes by stable code: every DomainError class declares one, the registry maps it (and the class
names older versions wrote) back, and a failed job's code reaches the attach as the right error."""

from __future__ import annotations

import types

import pytest

from services.csi_frontend.migration_gate import failed_job_error
from services.migrator.outcome import failure_of
from shared import errors
from shared.errors import DomainError, error_class
from shared.messages import FailureReason, MigrationFinished
from tests.support.errors import all_error_classes, bare_instance

# Every error class of the project and its code on the wire. A new class fails here until it is listed: its code
# is a promise to every other process (and to records already in Redis), so it is chosen once, on purpose.
CODES = {
    "DomainError": "domain_error",
    "InvalidRequest": "invalid_request",
    "OutOfRange": "out_of_range",
    "VolumeNotFound": "volume_not_found",
    "NodeNotFound": "node_not_found",
    "AlreadyExistsIncompatible": "already_exists_incompatible",
    "OperationPending": "operation_pending",
    "CapacityExhausted": "capacity_exhausted",
    "PlacementImpossible": "placement_impossible",
    "PreconditionFailed": "precondition_failed",
    "AttachedElsewhere": "attached_elsewhere",
    "BackendUnavailable": "backend_unavailable",
    "BackendFailure": "backend_failure",
    "XoError": "xo_error",
    "XoUnavailable": "xo_unavailable",
    "XoPoolDisconnected": "xo_pool_disconnected",
    "XoAuthError": "xo_auth_failed",
    "XoNotFound": "xo_not_found",
    "XoBusy": "xo_busy",
    "XoVdiInUse": "xo_vdi_in_use",
    "XoInvalidParameters": "xo_invalid_parameters",
    "XoNoSpace": "xo_no_space",
    "XoNoFreeDevice": "xo_no_free_device",
    "XoMethodNotFound": "xo_method_not_found",
    "LockLost": "lock_lost",
    "NotStarted": "not_started",
    "TransferUnfinished": "transfer_unfinished",
    "MountError": "mount_failed",
    "FilesystemCorrupt": "filesystem_corrupt",
}


def test_every_error_class_has_its_listed_code() -> None:
    assert {cls.__name__: cls.code for cls in all_error_classes()} == CODES
    assert {code: cls.__name__ for code, cls in errors.registered().items()} == {v: k for k, v in CODES.items()}


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda cls: cls.__name__)
def test_a_code_round_trips_through_a_finished_event(cls: type[DomainError]) -> None:
    error = failure_of(bare_instance(cls, "why"))
    sent = MigrationFinished(job_id="j", disk_name="csi-a", outcome="failed", error=error)
    received = MigrationFinished.model_validate_json(sent.model_dump_json())
    assert received.error is not None
    assert error_class(received.error.code) is cls
    assert (received.error.message, received.error.retryable) == ("why", cls.retryable)


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda cls: cls.__name__)
def test_the_class_name_an_older_version_wrote_is_still_read(cls: type[DomainError]) -> None:
    assert error_class(cls.__name__) is cls


def test_an_unknown_code_maps_to_nothing() -> None:
    assert error_class("a_code_of_a_newer_version") is None


def test_a_subclass_without_its_own_code_is_refused() -> None:
    with pytest.raises(TypeError, match="must declare its own stable snake_case `code`"):
        types.new_class("Unnamed", (errors.CapacityExhausted,))
    with pytest.raises(TypeError, match="already the code of CapacityExhausted"):
        types.new_class("Twin", (errors.CapacityExhausted,), {"code": "capacity_exhausted"})


@pytest.mark.parametrize(("code", "retryable", "expected"), [
    ("capacity_exhausted", False, errors.CapacityExhausted),
    ("xo_no_space", False, errors.CapacityExhausted),  # XO's "no space" is a CapacityExhausted: RESOURCE_EXHAUSTED
    ("XoNoSpace", False, errors.CapacityExhausted),  # the same, as a record written by an older version says it
    ("placement_impossible", False, errors.PlacementImpossible),
    ("PlacementImpossible", False, errors.PlacementImpossible),
    ("volume_not_found", False, errors.VolumeNotFound),
    ("xo_invalid_parameters", False, errors.PreconditionFailed),
    ("job_record_incomplete", False, errors.PreconditionFailed),
    ("a_code_of_a_newer_version", False, errors.PreconditionFailed),
    ("xo_busy", True, errors.BackendUnavailable),
    ("worker_lost", True, errors.BackendUnavailable),
])
def test_a_failed_job_reaches_the_attach_as_the_error_of_its_family(
    code: str, retryable: bool, expected: type[DomainError]
) -> None:
    raised = failed_job_error("migration of disk csi-a", FailureReason(code=code, message="why", retryable=retryable))
    assert type(raised) is expected
    assert raised.message.endswith("why")
