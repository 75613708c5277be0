"""XO's REST API under ``/rest/v0``, the part that moves disk content (XO-STREAMS-AND-CACHE §A5, XO-API §2).

Routes: ``POST /vdis`` (create an empty VDI), ``GET|DELETE /vdis/{id}``, ``GET|PUT /vdis/{id}.{vhd|raw}``
(export/import content). Authentication, error statuses and bodies are XO's. Byte-level work is content.py's.
Ids resolve through ``RestApi.view`` (XO's object cache), XAPI-level checks read ``RestApi.truth``.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from aiohttp import web

from shared.logging import get_logger
from shared.vhd import VhdError

from . import content, control_domain, streams
from .errors import PlainError, SimError, XapiError, XoApiError, invalid_credentials, invalid_parameters, unauthorized
from .faults import FaultRule
from .model import ObjectStore
from .shapes import XoObject

if TYPE_CHECKING:
    from .server import Simulator

log = get_logger(__name__)
PREFIX = "/rest/v0"
FORMATS = ("vhd", "raw")
WWW_AUTHENTICATE = 'Basic realm="xo"'
XAPI_INFO = "This is a XenServer/XCP-ng error, not an XO error"
NO_LENGTH = "Trying to import a VDI without a length field. Please report this error to the Xen Orchestra team."
MULTIPLE_AUTH = "Having multiple authentication methods is not supported"
# generic-error-handler.middleware.mts: XO api error code -> HTTP status; anything else is 500.
STATUS_BY_CODE = {0: 501, 1: 404, 2: 403, 3: 401, 5: 403, 10: 422, 16: 409, 25: 409, 26: 403, 28: 503}
MAX_JSON_BYTES = 1024 * 1024

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, sim: Simulator) -> None:
    """Mount the REST routes for ``sim`` on ``app``."""
    rest = RestApi(sim)
    app.router.add_post(f"{PREFIX}/vdis", rest.wrap(rest.create_vdi))
    app.router.add_get(f"{PREFIX}/vdis/{{ref}}", rest.wrap(rest.get_vdi))
    app.router.add_put(f"{PREFIX}/vdis/{{ref}}", rest.wrap(rest.import_content))
    app.router.add_delete(f"{PREFIX}/vdis/{{ref}}", rest.wrap(rest.delete_vdi))


class RestAnswer(Exception):
    """An answer outside XO's error mapping: 400 (two authentication methods, bad JSON), 404 (no such route)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RestApi:
    """Route handlers over one simulator's state."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    # -- hooks -----------------------------------------------------------------------------------------------
    @property
    def view(self) -> ObjectStore:
        """Where REST resolves ids: XO's object cache (an id it does not show answers 404, a VDI POSTed a moment
        ago included, and every object of a pool XO lost)."""
        return self.sim.cache

    @property
    def truth(self) -> ObjectStore:
        """What XAPI knows: an object the cache still shows but XAPI destroyed fails with HANDLE_INVALID."""
        return self.sim.xapi.store

    def wrap(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Authenticate, run ``handler(request, user)``, and answer errors as XO's REST error handler does."""

        async def route(request: web.Request) -> web.StreamResponse:
            try:
                user = self.authenticate(request)
                return await handler(request, user)
            except RestAnswer as exc:
                return _json(exc.status, {"error": str(exc)})
            except SimError as exc:
                return error_response(exc)
            except Dropped:
                return web.Response(status=500)

        return route

    # -- authentication --------------------------------------------------------------------------------------
    def authenticate(self, request: web.Request) -> dict[str, Any]:
        """The user of a token cookie (``authenticationToken``, else ``token``) or of HTTP Basic credentials.

        Both at once: 400. None or bad: invalid credentials (401). A non-admin: 403 (this simulator gives
        users no ACL v2 privileges, so only admins pass the routes' ACL checks).
        """
        token = request.cookies.get("authenticationToken") or request.cookies.get("token")
        authorization = request.headers.get("Authorization")
        if token and authorization is not None:
            raise RestAnswer(400, MULTIPLE_AUTH)
        if token:
            credentials: dict[str, Any] = {"token": token}
        elif authorization is not None:
            credentials = _basic_credentials(authorization)
        else:
            raise invalid_credentials()
        try:
            user, _expiry = self.sim.api.auth.sign_in(credentials)
        except SimError as exc:
            raise invalid_credentials() from exc
        if user.get("permission", "admin") != "admin":
            raise unauthorized("admin")
        return user

    # -- VDIs ------------------------------------------------------------------------------------------------
    async def create_vdi(self, request: web.Request, user: dict[str, Any]) -> web.StreamResponse:
        """``POST /vdis {srId, virtual_size, name_label?, name_description?, tags?}``: 201 ``{id}`` + Location."""
        body = await _json_body(request)
        sr = self.view.get(_field(body, "srId", str), "SR")
        self._inject(request, streams.CREATE)
        size = _field(body, "virtual_size", int)
        if size < 0:
            raise invalid_parameters([{"instancePath": "/virtual_size", "message": "must be >= 0"}])
        tags = _field(body, "tags", list, required=False) or []
        if not all(isinstance(tag, str) for tag in tags):
            raise invalid_parameters([{"instancePath": "/tags", "message": "must be an array of strings"}])
        vdi = await self.sim.xapi.create_vdi(
            sr["id"], name_label=_field(body, "name_label", str, required=False) or "", size=size,
            name_description=_field(body, "name_description", str, required=False) or "", tags=tags)
        location = f"{PREFIX}/vdis/{vdi['id']}"
        return _json(201, {"id": vdi["id"]}, headers={"Location": location})

    async def get_vdi(self, request: web.Request, user: dict[str, Any]) -> web.StreamResponse:
        """``GET /vdis/{id}``: the XO object; ``GET /vdis/{id}.{vhd|raw}``: its content (200, chunked)."""
        vdi_id, fmt = _split(request.match_info["ref"])
        vdi = self.view.get(vdi_id, "VDI")
        if fmt is None:
            self._inject(request, streams.GET)
            return _json(200, vdi)
        kind = _format(fmt)
        rule = self._inject(request, streams.EXPORT)
        return await self._export(request, self._readable(vdi), kind, rule)

    async def delete_vdi(self, request: web.Request, user: dict[str, Any]) -> web.StreamResponse:
        """``DELETE /vdis/{id}``: VDI.destroy (VDI_IN_USE as a XAPI error while attached); 204."""
        vdi_id, fmt = _split(request.match_info["ref"])
        vdi = self.view.get(vdi_id, "VDI")
        if fmt is not None:
            raise RestAnswer(404, f"Cannot DELETE {request.path}")
        self._inject(request, streams.DELETE)
        self._xapi_vdi(vdi)
        await self.sim.xapi.destroy_vdi(vdi["id"])
        return web.Response(status=204)

    async def import_content(self, request: web.Request, user: dict[str, Any]) -> web.StreamResponse:
        """``PUT /vdis/{id}.{vhd|raw}`` with an exact Content-Length: write the body into the VDI; 204.

        No Content-Length: 500 with XO's message. A body larger than the VDI, short, or not a valid VHD: 500
        ``VDI_IO_ERROR`` (blocks already written stay: XO does not roll back).
        """
        vdi_id, fmt = _split(request.match_info["ref"])
        vdi = self.view.get(vdi_id, "VDI")
        if fmt is None:
            raise RestAnswer(404, f"Cannot PUT {request.path}")
        kind = _format(fmt)
        length = request.content_length
        if length is None:
            raise PlainError(NO_LENGTH)
        rule = self._inject(request, streams.IMPORT)
        vdi = self._writable(vdi, "import")
        path = self._backing(vdi)
        self.sim.xapi.lock(vdi["id"])
        try:
            with (control_domain.plugged(self.sim.xapi, vdi["id"], read_only=False) as dom0_vbd,
                  streams.StreamWatch(self.sim, streams.IMPORT, vdi["id"], vdi["$pool"], rule, dom0_vbd) as watch):
                chunks = watch.counted(request.content.iter_any())
                if kind == "vhd":
                    blocks = await content.import_vhd(path, vdi["size"], chunks)
                else:
                    await content.import_raw(path, vdi["size"], length, chunks)
                    blocks = None
        except (VhdError, content.ContentError) as exc:
            raise XapiError("VDI_IO_ERROR", [str(exc)], method="VDI.import_raw_vdi") from exc
        except ConnectionError as exc:  # the client dropped the connection mid-body; what was written stays
            log.info("vdi_import_aborted", vdi=vdi["id"], format=kind, reason=str(exc))
            raise XapiError("VDI_IO_ERROR", ["the connection closed before the end of the body"],
                            method="VDI.import_raw_vdi") from exc
        except streams.StreamCut as cut:  # what was written before stays (XO does not roll back)
            log.info("vdi_import_cut", vdi=vdi["id"], format=kind, reason=str(cut))
            if cut.drops_connection or cut.rule is None:
                _drop(request)
            raise cut.rule.to_error(streams.IMPORT) from cut
        finally:
            self.sim.xapi.unlock(vdi["id"])
        log.debug("vdi_content_imported", vdi=vdi["id"], format=kind, length=length, blocks=blocks)
        return web.Response(status=204)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _inject(self, request: web.Request, method: str) -> FaultRule | None:
        """Count the call and apply a fault rule naming ``method`` (streams.py): an error rule raises its error, a
        drop_socket rule cuts the connection; a rule with ``after_bytes`` is returned for the stream to apply."""
        self.sim.stats.calls[method] += 1
        rule = streams.pick(self.sim, method)
        if rule is None or rule.after_bytes is not None:
            return rule
        if rule.kind == "drop_socket":
            _drop(request)
        raise rule.to_error(method)

    def _xapi_vdi(self, vdi: XoObject) -> XoObject:
        current = self.truth.find(vdi["id"])
        if current is None:
            raise XapiError("HANDLE_INVALID", ["VDI", vdi["_xapiRef"]])
        return current

    def _writable(self, vdi: XoObject, operation: str) -> XoObject:
        """XAPI's view of the VDI, refusing it while another operation runs or while it is attached.

        XAPI attaches the VDI to its control domain to stream it; whether it lets that happen while a VM has it
        plugged is not visible from XO: the simulator takes the harsher reading and refuses (VDI_IN_USE).
        """
        current = self._xapi_vdi(vdi)
        self.sim.xapi.ensure_idle(current)
        if self.sim.xapi.is_attached(current):
            raise XapiError("VDI_IN_USE", [current["_xapiRef"], operation])
        return current

    def _readable(self, vdi: XoObject) -> XoObject:
        """``_writable`` for an export, which attaches the VDI read-only: other exports may run (their read-only
        VBDs of a control domain share it), anything else plugged refuses it."""
        current = self._xapi_vdi(vdi)
        self.sim.xapi.ensure_idle(current)
        if not control_domain.read_only_by_control_domains(self.sim.xapi, current):
            raise XapiError("VDI_IN_USE", [current["_xapiRef"], "export"])
        return current

    def _backing(self, vdi: XoObject) -> Path | None:
        data = self.sim.data
        return data.path(vdi["$SR"], vdi["id"]) if data is not None else None

    async def _export(self, request: web.Request, vdi: XoObject, fmt: str,
                      rule: FaultRule | None) -> web.StreamResponse:
        """Stream the VDI out, plugged read-only into a control domain for the duration (control_domain.py)."""
        with control_domain.plugged(self.sim.xapi, vdi["id"], read_only=True) as dom0_vbd:
            watch = streams.StreamWatch(self.sim, streams.EXPORT, vdi["id"], vdi["$pool"], rule, dom0_vbd)
            return await self._send(request, vdi, fmt, watch)

    async def _send(self, request: web.Request, vdi: XoObject, fmt: str,
                    watch: streams.StreamWatch) -> web.StreamResponse:
        path = self._backing(vdi)
        source = (content.export_vhd(path, vdi["size"], _uuid_bytes(vdi["id"])) if fmt == "vhd"
                  else content.export_raw(path, vdi["size"]))
        try:
            with watch:
                async with aclosing(source) as chunks:
                    try:
                        first = await anext(chunks)
                    except content.ContentError as exc:
                        raise XapiError("VDI_IO_ERROR", [str(exc)], method="VDI.export_raw_vdi") from exc
                    # From here on a failure can only cut the chunked body (XO destroys the stream): the client
                    # sees a truncated transfer, never a success.
                    response = web.StreamResponse(status=200, headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Disposition": f"attachment; filename={vdi['id']}.{fmt}"})
                    response.enable_chunked_encoding()
                    await response.prepare(request)
                    await response.write(first)
                    await watch.passed(len(first))
                    async for chunk in chunks:
                        await response.write(chunk)
                        await watch.passed(len(chunk))
                await response.write_eof()
        except ConnectionError:  # the client went away (closed or cancelled its download): nothing to answer
            log.info("vdi_export_aborted", vdi=vdi["id"], format=fmt, bytes=watch.bytes)
            return response
        except streams.StreamCut as cut:  # the body stops short: the client sees a truncated transfer
            log.info("vdi_export_cut", vdi=vdi["id"], format=fmt, bytes=watch.bytes, reason=str(cut))
            _drop(request)
        log.debug("vdi_content_exported", vdi=vdi["id"], format=fmt, bytes=watch.bytes)
        return response


def error_response(exc: SimError) -> web.Response:
    """XO's REST error answer: ``{error, data?, info?}`` with the status of generic-error-handler.middleware."""
    if isinstance(exc, XoApiError):
        if exc.code == 17 and isinstance(exc.data, dict):  # REST does not translate XAPI's VDI_IN_USE
            message = f"VDI_IN_USE({exc.data.get('objectId')}, {exc.data.get('operation')})"
            return _json(500, {"error": message, "info": XAPI_INFO})
        status = STATUS_BY_CODE.get(exc.code, 500)
        body: dict[str, Any] = {"error": exc.message}
        if exc.data is not None:
            body["data"] = exc.data
        headers = {"WWW-Authenticate": WWW_AUTHENTICATE} if status == 401 else None
        return _json(status, body, headers=headers)
    if isinstance(exc, XapiError):
        return _json(500, {"error": str(exc), "info": XAPI_INFO})
    return _json(500, {"error": str(exc)})


class Dropped(Exception):
    """The connection was cut on purpose (``_drop``): the route answers nothing more."""


def _drop(request: web.Request) -> NoReturn:
    """Cut the TCP connection without an answer (a broken transfer, as the client sees it); Dropped ends the
    handler (the route returns a response aiohttp cannot send, which it takes quietly)."""
    if request.transport is not None:
        request.transport.abort()
    raise Dropped()


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _basic_credentials(header: str) -> dict[str, Any]:
    # XO does not check the scheme word: anything that is not a base64 "user:password" pair fails.
    _, _, encoded = header.strip().partition(" ")
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise invalid_credentials() from exc
    email, sep, password = decoded.partition(":")
    if not sep:
        raise invalid_credentials()
    return {"email": email, "password": password}


def _split(ref: str) -> tuple[str, str | None]:
    vdi_id, dot, fmt = ref.partition(".")
    return vdi_id, fmt if dot else None


def _format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise invalid_parameters([{"instancePath": "/format", "message": "must be equal to one of the allowed "
                                   f"values: {', '.join(FORMATS)}"}], f"invalid format {fmt!r}")
    return fmt


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise invalid_parameters(message="request body too large")
    try:
        body = json.loads(await request.text())
    except ValueError as exc:
        raise RestAnswer(400, f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise invalid_parameters([{"instancePath": "", "message": "must be object"}])
    return body


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise invalid_parameters([{"instancePath": f"/{name}", "message": "is required"}],
                                     f"'{name}' is required")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise invalid_parameters([{"instancePath": f"/{name}", "message": f"must be {kind.__name__}"}],
                                 f"invalid '{name}'")
    return value


def _uuid_bytes(vdi_id: str) -> bytes:
    try:
        return uuid.UUID(vdi_id).bytes
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_OID, vdi_id).bytes
