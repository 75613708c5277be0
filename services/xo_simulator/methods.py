"""The XO JSON-RPC methods the simulator serves: their parameter schemas, resolve entries and XO-level behaviour.

A method receives objects resolved through XO's cache (access.py) and acts on XAPI's truth through
xapi.py and migration.py by handle, as xo-server passes ``_xapiRef``: the cache may still show what XAPI
destroyed (HANDLE_INVALID) or not show yet what XAPI made (code 1). Only disk.create and vdi.migrate wait
for the cache (``barrier``); every other write returns before the cache shows its effect.
Framing and dispatch live in rpc.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.logging import get_logger

from .access import Resolve
from .auth import Authenticator
from .cache import CacheMirror
from .errors import PlainError, SimError, XapiError, invalid_parameters, no_connection
from .migration import Migrator
from .params import Param, Schema, size_param
from .retry import RetryPolicy, has_xo_code
from .shapes import XoObject
from .xapi import Xapi

log = get_logger(__name__)
SERVER_VERSION = "5.180.0"
# XO's VBD creation without a position asks XAPI for the VM's allowed devices, then for its power state, then
# creates the VBD (@xen-orchestra/xapi vbd.mjs): two XAPI round trips in which another attach to the same VM can
# take the chosen device, and that VBD.create fails with DEVICE_ALREADY_EXISTS.
XAPI_ROUND_TRIP_S = 0.002

STR = Param("string")
OPT_STR = Param("string", optional=True)
OPT_STR0 = Param("string0", optional=True)
OPT_BOOL = Param("boolean", optional=True)
VDI_TYPES = ("VDI", "VDI-snapshot")


class Session(Protocol):
    """What a method may know about its caller: the signed-in user and when its token expires."""

    user: dict[str, Any] | None
    expires_at_s: float | None


Handler = Callable[[Session, dict[str, Any], dict[str, XoObject]], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    """An API method: ``schema`` None means no validation; ``permission`` None means callable before sign-in,
    ``""`` any signed-in user; ``resolve`` lists its object parameters (access.py)."""

    handler: Handler
    schema: Schema | None
    permission: str | None = ""
    resolve: Sequence[Resolve] = ()


class Api:
    """Implements the methods over one simulator's truth (xapi, migrator) and cache (mirror)."""

    def __init__(self, xapi: Xapi, migrator: Migrator, auth: Authenticator, mirror: CacheMirror,
                 *, destroy_retry_delay_s: float = 5.0) -> None:
        self.xapi = xapi
        self.migrator = migrator
        self.auth = auth
        self.mirror = mirror
        self.cache = mirror.cache
        self.destroy_retry = RetryPolicy(has_xo_code(17), destroy_retry_delay_s)
        self._one_shots: dict[str, str] = {}

    def methods(self) -> dict[str, Method]:
        """The method table, by JSON-RPC method name."""
        vdi = Resolve("vdi", "id", VDI_TYPES)
        vbd = Resolve("vbd", "id", ("VBD",))
        return {
            "session.signIn": Method(self._sign_in, None, None),
            "session.signInWithToken": Method(self._sign_in, {"token": STR}, None),
            "session.signInWithPassword": Method(self._sign_in, {"email": STR, "password": STR}, None),
            "session.getUser": Method(self._get_user, {}),
            "system.getServerVersion": Method(self._server_version, {}, None),
            "server.getAll": Method(self._servers, {}),
            "token.create": Method(self._token_create, {
                "description": OPT_STR, "client": Param("object", optional=True),
                "expiresIn": Param("number_or_string", optional=True)}),
            "xo.getAllObjects": Method(self._get_all_objects, {
                "filter": Param("filter", optional=True), "limit": Param("number", optional=True),
                "ndjson": OPT_BOOL}),
            "disk.create": Method(self._disk_create, {
                "name": STR, "size": Param("size"), "sr": STR, "vm": OPT_STR, "bootable": OPT_BOOL,
                "mode": OPT_STR, "position": OPT_STR},
                resolve=(Resolve("vm", "vm", ("VM",)), Resolve("sr", "sr", ("SR",)))),
            "vdi.set": Method(self._vdi_set, {
                "id": STR, "name_label": OPT_STR, "name_description": OPT_STR0,
                "size": Param("size", optional=True), "cbt": OPT_BOOL}, resolve=(vdi,)),
            "vdi.delete": Method(self._vdi_delete, {"id": STR}, resolve=(vdi,)),
            "vdi.migrate": Method(self._vdi_migrate, {"id": STR, "sr_id": STR, "resourceSet": OPT_STR},
                                  resolve=(vdi, Resolve("sr", "sr_id", ("SR",), same_pool_as="vdi"))),
            "vm.attachDisk": Method(self._attach_disk, {
                "vm": STR, "vdi": STR, "mode": OPT_STR, "position": OPT_STR, "bootable": OPT_BOOL},
                resolve=(Resolve("vm", "vm", ("VM",)), Resolve("vdi", "vdi", ("VDI",)))),
            "vbd.connect": Method(self._vbd_connect, {"id": STR}, resolve=(vbd,)),
            "vbd.disconnect": Method(self._vbd_disconnect, {"id": STR}, resolve=(vbd,)),
            "vbd.delete": Method(self._vbd_delete, {"id": STR}, resolve=(vbd,)),
        }

    def pop_one_shot(self, token: str) -> str | None:
        """The NDJSON body behind a ``$getFrom`` URL, served once."""
        return self._one_shots.pop(token, None)

    def _connected(self, obj: XoObject) -> None:
        """xo-server's getXapi(obj): a plain error when XO has no connection to the object's pool."""
        if not self.mirror.is_connected(obj["$pool"]):
            raise no_connection(obj["id"])

    # -- session / system ----------------------------------------------------------------------------
    async def _sign_in(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        session.user, session.expires_at_s = self.auth.sign_in(params)
        return session.user

    async def _get_user(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        return session.user

    async def _server_version(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        return SERVER_VERSION

    async def _servers(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        """XO's connections to its pools (admin only): one server per pool, as xo-server shows them
        (``getAllXenServers``: no password; ``connecting`` while XO has lost the pool, ``poolId`` only while
        connected)."""
        servers = []
        for pool in self.mirror.truth.of_type("pool"):
            master = self.mirror.truth.find(pool["master"]) if pool.get("master") else None
            server: dict[str, Any] = {
                "id": f"server-{pool['id']}", "label": pool["name_label"],
                "host": master["address"] if master else pool["name_label"], "username": "root", "enabled": True,
                "readOnly": False, "allowUnauthorized": False, "status": "connected"}
            if self.mirror.is_connected(pool["id"]):
                server["poolId"] = pool["id"]
            else:
                server["status"] = "connecting"
            servers.append(server)
        return servers

    async def _token_create(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        if session.user is None:
            raise PlainError("not signed in")
        return self.auth.create_token(session.user["email"], params)

    # -- objects -------------------------------------------------------------------------------------
    async def _get_all_objects(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        limit = params.get("limit")
        try:
            # xo-server counts down ``limit-- <= 0``: a fractional limit keeps ceil(limit) objects.
            found = self.cache.select(params.get("filter"), None if limit is None else max(0, math.ceil(limit)))
        except ValueError as exc:
            raise invalid_parameters([{"instancePath": "/filter", "message": str(exc)}], str(exc)) from exc
        if params.get("ndjson"):
            token = secrets.token_urlsafe(24)
            self._one_shots[token] = "".join(json.dumps(obj) + "\n" for obj in found.values())
            return {"$getFrom": f"/api/{token}"}
        return found

    # -- disks ---------------------------------------------------------------------------------------
    async def _disk_create(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        size = size_param("size", params["size"])
        read_only = _is_read_only(params.get("mode"))
        sr, vm = objects["sr"], objects.get("vm")
        self._connected(sr)
        vdi = await self.xapi.create_vdi(sr["_xapiRef"], name_label=params["name"], size=size)
        await self.mirror.barrier(sr["$pool"])  # _getOrWaitObject: the new VDI is in the cache
        if vm is None:
            return vdi["id"]
        self._connected(vm)
        try:
            vbd = self.xapi.create_vbd(vm["_xapiRef"], vdi["id"], position=params.get("position"),
                                       bootable=params.get("bootable", False), read_only=read_only)
        except SimError:
            await self.xapi.destroy_vdi(vdi["id"])
            raise
        if vm["power_state"] == "Running":  # XO decides from its cache
            try:
                await self.xapi.connect(vbd["id"])
            except SimError as exc:  # disk.create logs plug errors and does not throw (XO behaviour)
                log.warning("disk_create_plug_failed", vbd=vbd["id"], error=str(exc))
        return vdi["id"]

    async def _vdi_set(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        vdi = objects["vdi"]
        self._connected(vdi)
        if "size" in params:
            size = size_param("size", params["size"])
            if size < vdi["size"]:  # compared with the cached size, as XO does
                raise invalid_parameters(message=f"cannot set new size ({size}) below the current size ({vdi['size']})")
            await self.xapi.resize_vdi(vdi["_xapiRef"], size)
        # xo-server's vdi.set: one XAPI call per field, in this order (cbt, then VDI.set_name_label, then
        # VDI.set_name_description): not atomic, the cache may show the new name before the new description.
        changes = [("cbt_enabled", params["cbt"])] if "cbt" in params else []
        changes += [(key, params[key]) for key in ("name_label", "name_description") if key in params]
        for index, (field, value) in enumerate(changes):
            if index:
                await asyncio.sleep(0)  # the next XAPI round trip: other calls and the cache go on in between
            self.xapi.set_vdi_fields(vdi["_xapiRef"], {field: value})
        return None

    async def _vdi_delete(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        vdi = objects["vdi"]
        self._connected(vdi)
        try:  # VDI_destroy retries on VDI_IN_USE (a dom0 race workaround), so an attached disk answers late
            await self.destroy_retry.run(lambda: self.xapi.destroy_vdi(vdi["_xapiRef"]))
        except XapiError as exc:
            if exc.code != "HANDLE_INVALID":
                raise
            log.debug("vdi_delete_already_gone", vdi=vdi["id"])  # XO takes HANDLE_INVALID as destroyed
        return None

    async def _vdi_migrate(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        vdi = objects["vdi"]
        self._connected(vdi)
        return await self.migrator.migrate(vdi["_xapiRef"], objects["sr"]["_xapiRef"])

    # -- VBDs ----------------------------------------------------------------------------------------
    async def _attach_disk(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        read_only = _is_read_only(params.get("mode"))
        vm, vdi = objects["vm"], objects["vdi"]
        self._connected(vm)
        if vdi["$pool"] != vm["$pool"]:  # createVbd looks the VDI up in the VM's pool (xen-api getObject)
            raise PlainError(f"no object with UUID or opaque ref: {vdi['id']}")
        position = params.get("position")
        if position is None:  # VM.get_allowed_VBD_devices, VM.power_state, then VBD.create with that device
            position = self.xapi.free_position(vm["_xapiRef"])
            await asyncio.sleep(2 * XAPI_ROUND_TRIP_S)
        vbd = self.xapi.create_vbd(vm["_xapiRef"], vdi["_xapiRef"], position=position,
                                   bootable=params.get("bootable", False), read_only=read_only)
        if vm["power_state"] == "Running":  # XO decides from its cache
            await self.xapi.connect(vbd["id"])  # awaited and thrown since XO 5.113; the VBD stays
        return None

    async def _vbd_connect(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        self._connected(objects["vbd"])
        await self.xapi.connect(objects["vbd"]["_xapiRef"])
        return None

    async def _vbd_disconnect(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        self._connected(objects["vbd"])
        await self.xapi.unplug(objects["vbd"]["_xapiRef"])
        return None

    async def _vbd_delete(self, session: Session, params: dict[str, Any], objects: dict[str, XoObject]) -> Any:
        vbd = objects["vbd"]
        self._connected(vbd)
        try:
            await self.xapi.unplug(vbd["_xapiRef"])
        except SimError as exc:  # VBD_destroy unplugs first and ignores unplug errors (XO behaviour)
            log.debug("vbd_delete_unplug_failed", vbd=vbd["id"], error=str(exc))
        await self.xapi.destroy_vbd(vbd["_xapiRef"])
        return None


def _is_read_only(mode: str | None) -> bool:
    if mode not in (None, "RW", "RO"):
        raise invalid_parameters([{"instancePath": "/mode", "message": "must be equal to one of the allowed values"}])
    return mode == "RO"
