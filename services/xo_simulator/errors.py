"""Errors the simulator sends to JSON-RPC clients, shaped as xo-server sends them.

SimError
 +-- XoApiError   an xo-common api error: {code, message, data?} (codes 0..28, see XO-API.md §5), sent to everyone
 +-- XapiError    an XAPI failure: for an admin code -32000, message "CODE(p1, p2)", data.code = CODE
 +-- PlainError   a plain JS Error: -32000 with the message for an admin

Only admins see the last two: anyone else (a non-admin user, or a socket not signed in) gets json-rpc-peer's
``{code: -32000, message: "unknown error from the peer"}`` without data (XO-STREAMS-AND-CACHE §E1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

UNKNOWN_PEER_ERROR = {"code": -32000, "message": "unknown error from the peer"}


class SimError(Exception):
    """Base of every error the simulator reports to a caller."""

    def to_json(self, *, is_admin: bool) -> dict[str, Any]:
        """Return the JSON-RPC ``error`` member for this error, as a caller with or without admin sees it."""
        raise NotImplementedError


class XoApiError(SimError):
    """An xo-common API error with a numeric XO code."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self, *, is_admin: bool) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class XapiError(SimError):
    """An XAPI error (``OTHER_OPERATION_IN_PROGRESS``, ``SR_BACKEND_FAILURE_44`` ...), never translated by XO."""

    def __init__(self, code: str, params: Sequence[str] = (), *, method: str = "") -> None:
        self.code = code
        self.params = [str(p) for p in params]
        self.method = method
        super().__init__(f"{code}({', '.join(self.params)})")

    def to_json(self, *, is_admin: bool) -> dict[str, Any]:
        if not is_admin:
            return dict(UNKNOWN_PEER_ERROR)
        message = str(self)
        return {
            "code": -32000,
            "message": message,
            "data": {
                "code": self.code,
                "params": self.params,
                "name": "XapiError",
                "message": message,
                "call": {"method": self.method, "params": "* obfuscated *", "duration": 0},
            },
        }


class PlainError(SimError):
    """A plain Error thrown by xo-server code (not an XO api error, not XAPI)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self, *, is_admin: bool) -> dict[str, Any]:
        if not is_admin:
            return dict(UNKNOWN_PEER_ERROR)
        return {"code": -32000, "message": self.message, "data": {"name": "Error", "message": self.message}}


def no_such_object(obj_id: str, obj_type: str | list[str] | None = None) -> XoApiError:
    """Code 1: the id does not resolve to an object of the expected type(s).

    Like XO, a list of types is sent as a list in ``data.type`` and joined with commas in the message.
    """
    shown = ",".join(obj_type) if isinstance(obj_type, list) else obj_type
    return XoApiError(1, f"no such {shown or 'object'} {obj_id}", {"id": obj_id, "type": obj_type})


def unauthorized(permission: str | None, obj_id: str | None = None, obj_type: str | None = None) -> XoApiError:
    """Code 2: the socket is not signed in, or its user lacks ``permission`` on the object."""
    data: dict[str, Any] = {"object": {"id": obj_id, "type": obj_type} if obj_id is not None else {}}
    if permission is not None:  # JSON drops xo-common's undefined permission
        data["permission"] = permission
    return XoApiError(2, "not enough permissions", data)


def invalid_credentials() -> XoApiError:
    """Code 3, without data, as XO sends it for any bad token or password."""
    return XoApiError(3, "invalid credentials")


def invalid_parameters(errors: list[dict[str, Any]] | None = None, message: str = "invalid parameters") -> XoApiError:
    """Code 10: with ajv-like ``errors`` for a schema failure; with data ``{}`` when a method throws it with a
    message only (xo-common sets ``errors: undefined``, which JSON drops)."""
    return XoApiError(10, message, {"errors": errors} if errors is not None else {})


def vm_bad_power_state(vm_id: str, expected: str, actual: str) -> XoApiError:
    """Code 13, the XO translation of XAPI VM_BAD_POWER_STATE."""
    data = {"objectId": vm_id, "expected": expected, "actual": actual}
    return XoApiError(13, f"VM state is {actual} but should be {expected}", data)


def vdi_in_use(vdi_id: str, operation: str) -> XoApiError:
    """Code 17, the XO translation of XAPI VDI_IN_USE."""
    return XoApiError(17, "VDI in use", {"objectId": vdi_id, "operation": operation})


def backend_failure(number: int, text: str) -> XapiError:
    """An SM failure such as ``SR_BACKEND_FAILURE_44(, There is insufficient space, )``."""
    return XapiError(f"SR_BACKEND_FAILURE_{number}", ["", text, ""])


def handle_invalid(cls: str, handle: str) -> XapiError:
    """XAPI HANDLE_INVALID(<class>, <ref>): the object is gone on the XAPI side."""
    return XapiError("HANDLE_INVALID", [cls, handle])


def no_connection(obj_id: str) -> PlainError:
    """xo-server's getXapi() for an object of a pool it has no connection to."""
    return PlainError(f"no connection found for object {obj_id}")


def other_operation_in_progress(cls: str, ref: str) -> XapiError:
    """XAPI OTHER_OPERATION_IN_PROGRESS(<class>, <ref>)."""
    return XapiError("OTHER_OPERATION_IN_PROGRESS", [cls, ref])
