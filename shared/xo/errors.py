"""The XoError tree: the only place transport failures and XO/XAPI error codes are translated.

Tree (each leaf also inherits the domain error that the edges map to a code)::

    XoError (BackendFailure)            any XO answer we do not classify further; keeps rpc_code/xapi_code
    ├── XoUnavailable (BackendUnavailable)   connect/sign-in/call timeout, socket closed, XO code 9
    │   └── XoPoolDisconnected                XO lost a pool: its objects are missing, not deleted (also
    │                                         xo-server's "no connection found for object ...")
    ├── XoAuthError (BackendUnavailable)     XO codes 2, 3, 8: the credentials are wrong or lack rights
    ├── XoNotFound                            XO code 1 (no such object), XAPI HANDLE_INVALID / UUID_INVALID
    ├── XoBusy (OperationPending)             XAPI OTHER_OPERATION_IN_PROGRESS, TOO_MANY_STORAGE_MIGRATES,
    │                                         DEVICE_ALREADY_EXISTS
    ├── XoVdiInUse (PreconditionFailed)       XO code 17 (XAPI VDI_IN_USE)
    ├── XoInvalidParameters                   XO code 10: a bug on our side, never user input
    ├── XoNoSpace (CapacityExhausted)         XAPI SR_BACKEND_FAILURE_44 (insufficient space)
    ├── XoNoFreeDevice (CapacityExhausted)    xo-server's "no allowed VBD devices": the VM has no free disk slot
    └── XoMethodNotFound                      JSON-RPC -32601: this XO is too old for a method

No websockets, httpx or ssl exception type escapes shared/xo/. Messages never contain call parameters or
headers, so a token or password cannot leak through an error. JSON-RPC answers go through from_rpc_error,
REST answers (shared/xo/rest.py) through from_rest_error: 404 -> XoNotFound, 401/403 -> XoAuthError,
422 -> XoInvalidParameters, 503 -> XoUnavailable, a XAPI code in the message -> its class, else XoError.
"""

from __future__ import annotations

from typing import Any

from shared.errors import (
    BackendFailure,
    BackendUnavailable,
    CapacityExhausted,
    OperationPending,
    PreconditionFailed,
)


class XoError(BackendFailure, code="xo_error"):
    """An error answered by XO (or XAPI through XO). ``rpc_code`` is XO's JSON-RPC code (``code`` is the class's
    stable code, shared/errors.py)."""

    def __init__(
        self,
        message: str,
        *,
        rpc_code: int | None = None,
        xapi_code: str | None = None,
        method: str | None = None,
        data: Any = None,
    ) -> None:
        super().__init__(message)
        self.rpc_code = rpc_code
        self.xapi_code = xapi_code
        self.method = method
        self.data = data


class XoUnavailable(BackendUnavailable, XoError, code="xo_unavailable", retryable=True):
    """XO cannot be reached: connect or call timed out, or the socket closed."""


class XoPoolDisconnected(XoUnavailable, code="xo_pool_disconnected", retryable=True):
    """XO is not connected to every pool it manages (``server.getAll``): objects of a lost pool vanish from its
    cache, so an empty lookup proves nothing until XO reconnects."""


class XoAuthError(BackendUnavailable, XoError, code="xo_auth_failed", retryable=True):
    """XO refused the credentials (codes 2, 3, 8). Fix XOA_TOKEN or XOA_USERNAME/XOA_PASSWORD."""


class XoNotFound(XoError, code="xo_not_found"):
    """The object does not exist (code 1)."""


class XoBusy(OperationPending, XoError, code="xo_busy", retryable=True):
    """XAPI is busy with another operation on the object; retry later."""


class XoVdiInUse(PreconditionFailed, XoError, code="xo_vdi_in_use"):
    """The VDI is attached (code 17)."""


class XoInvalidParameters(XoError, code="xo_invalid_parameters"):
    """XO rejected the parameters (code 10)."""


class XoNoSpace(CapacityExhausted, XoError, code="xo_no_space"):
    """The SR has not enough free space."""


class XoNoFreeDevice(CapacityExhausted, XoError, code="xo_no_free_device"):
    """The VM has no device left for another disk (xo-server's createVbd: ``VM.get_allowed_VBD_devices`` is empty;
    a plain Error, so only an admin account reads it)."""


class XoMethodNotFound(XoError, code="xo_method_not_found"):
    """XO does not know the method (-32601)."""


_BY_XO_CODE: dict[int, type[XoError]] = {
    1: XoNotFound,
    2: XoAuthError,
    3: XoAuthError,
    8: XoAuthError,
    9: XoUnavailable,
    10: XoInvalidParameters,
    17: XoVdiInUse,
    -32601: XoMethodNotFound,
}
_BY_XAPI_CODE: dict[str, type[XoError]] = {
    "OTHER_OPERATION_IN_PROGRESS": XoBusy,
    "TOO_MANY_STORAGE_MIGRATES": XoBusy,
    "DEVICE_ALREADY_EXISTS": XoBusy,  # another attach to the VM took the device XO had picked (a race)
    "HANDLE_INVALID": XoNotFound,
    "UUID_INVALID": XoNotFound,
    "VDI_IN_USE": XoVdiInUse,
    "SR_BACKEND_FAILURE_44": XoNoSpace,
}

_BY_MESSAGE_START: tuple[tuple[str, type[XoError]], ...] = (  # plain Errors of xo-server itself (admins read them)
    ("no allowed VBD devices", XoNoFreeDevice),  # createVbd: VM.get_allowed_VBD_devices is empty
    ("no connection found for object ", XoPoolDisconnected),  # getXapi(): the object's pool was lost meanwhile
)


def xapi_code_of(message: str, data: Any) -> str | None:
    """The XAPI code of an error: ``data.code`` when present, else the message prefix before ``(``."""
    if isinstance(data, dict) and isinstance(data.get("code"), str) and data["code"]:
        return str(data["code"])
    head, sep, _ = message.partition("(")
    if sep and head and head.replace("_", "").isalnum() and head.upper() == head:
        return head
    return None


def from_rpc_error(error: Any, method: str) -> XoError:
    """Build the XoError for a JSON-RPC ``error`` member returned by ``method``."""
    if not isinstance(error, dict):
        return XoError(f"XO answered {method} with a malformed error", method=method)
    code = error.get("code") if isinstance(error.get("code"), int) else None
    message = str(error.get("message") or "unknown error")[:500]
    data = error.get("data")
    xapi_code = xapi_code_of(message, data)
    by_message = next((cls for start, cls in _BY_MESSAGE_START if message.startswith(start)), None)
    cls = (_BY_XAPI_CODE.get(xapi_code or "") or by_message
           or (_BY_XO_CODE.get(code, XoError) if code is not None else XoError))
    return cls(f"XO {method} failed: {message}", rpc_code=code, xapi_code=xapi_code, method=method, data=data)


_BY_HTTP_STATUS: dict[int, type[XoError]] = {
    401: XoAuthError,
    403: XoAuthError,
    404: XoNotFound,
    422: XoInvalidParameters,
    503: XoUnavailable,
}


def from_rest_error(status: int, body: Any, what: str) -> XoError:
    """Build the XoError for a REST answer with HTTP ``status`` and JSON ``body`` (``{error, data?, info?}``)."""
    message = str(body.get("error") or "") if isinstance(body, dict) else ""
    message = (message or f"HTTP {status}")[:500]
    data = body.get("data") if isinstance(body, dict) else None
    xapi_code = xapi_code_of(message, None) if status >= 500 else None
    cls = _BY_XAPI_CODE.get(xapi_code or "") or _BY_HTTP_STATUS.get(status, XoError)
    return cls(f"XO {what} failed (HTTP {status}): {message}", xapi_code=xapi_code, method=what, data=data)
