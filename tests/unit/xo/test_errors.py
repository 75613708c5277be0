"""from_rpc_error: XO's JSON-RPC errors become the XoError tree, each leaf also the domain error the CSI layer maps
to a gRPC code (shared/xo/errors.py)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import BackendUnavailable, CapacityExhausted, OperationPending, PreconditionFailed
from shared.xo.errors import (
    XoAuthError,
    XoBusy,
    XoError,
    XoInvalidParameters,
    XoNoFreeDevice,
    XoNoSpace,
    XoNotFound,
    XoPoolDisconnected,
    XoVdiInUse,
    from_rpc_error,
)


@pytest.mark.parametrize(
    ("error", "cls", "domain"),
    [
        ({"code": 1, "message": "no such VDI x", "data": {"id": "x", "type": "VDI"}}, XoNotFound, None),
        ({"code": 2, "message": "not enough permissions"}, XoAuthError, BackendUnavailable),
        ({"code": 10, "message": "invalid parameters", "data": {"errors": []}}, XoInvalidParameters, None),
        ({"code": 17, "message": "VDI in use", "data": {"objectId": "x"}}, XoVdiInUse, PreconditionFailed),
        (
            {"code": -32000, "message": "OTHER_OPERATION_IN_PROGRESS(VDI, OpaqueRef:1)",
             "data": {"code": "OTHER_OPERATION_IN_PROGRESS", "params": ["VDI", "OpaqueRef:1"]}},
            XoBusy,
            OperationPending,
        ),
        ({"code": -32000, "message": "TOO_MANY_STORAGE_MIGRATES(3)"}, XoBusy, OperationPending),
        ({"code": -32000, "message": "SR_BACKEND_FAILURE_44(, There is insufficient space, )"}, XoNoSpace,
         CapacityExhausted),
        ({"code": -32000, "message": "unknown error from the peer"}, XoError, None),
        ({"code": -32000, "message": "no allowed VBD devices", "data": {"name": "Error"}}, XoNoFreeDevice,
         CapacityExhausted),
        ({"code": -32000, "message": "no connection found for object v1", "data": {"name": "Error"}},
         XoPoolDisconnected, BackendUnavailable),
    ],
)
def test_error_translation(error: dict[str, Any], cls: type[XoError], domain: type[Exception] | None) -> None:
    translated = from_rpc_error(error, "vdi.migrate")
    assert type(translated) is cls
    if domain is not None:
        assert isinstance(translated, domain)
    assert translated.rpc_code == error["code"]


def test_xapi_code_from_data_wins_over_message() -> None:
    err = from_rpc_error({"code": -32000, "message": "weird", "data": {"code": "VDI_IN_USE"}}, "vdi.delete")
    assert isinstance(err, XoVdiInUse) and err.xapi_code == "VDI_IN_USE"
