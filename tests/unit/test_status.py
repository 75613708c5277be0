"""The domain-error -> gRPC code table."""

from __future__ import annotations

import grpc
import pytest

from services.csi_frontend.status import TABLE, code_for
from shared import errors
from shared.xo import errors as xo_errors


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def test_every_domain_error_has_a_code() -> None:
    for cls in _all_subclasses(errors.DomainError):
        assert any(base in TABLE for base in cls.__mro__), cls


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.AttachedElsewhere("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.OperationPending("x"), grpc.StatusCode.ABORTED),
        (xo_errors.XoBusy("x"), grpc.StatusCode.ABORTED),
        (xo_errors.XoUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (xo_errors.XoAuthError("x"), grpc.StatusCode.UNAVAILABLE),
        (xo_errors.XoVdiInUse("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (xo_errors.XoNoSpace("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (xo_errors.XoNotFound("x"), grpc.StatusCode.INTERNAL),
        (errors.PlacementImpossible("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.OutOfRange("x"), grpc.StatusCode.OUT_OF_RANGE),
        (RuntimeError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_codes(error: BaseException, code: grpc.StatusCode) -> None:
    assert code_for(error) is code
