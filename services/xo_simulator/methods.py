"""The XO JSON-RPC methods the simulator serves: their parameter schemas and their XO-level behaviour.

XAPI-level checks live in xapi.py and migration.py; framing and dispatch live in rpc.py.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.logging import get_logger

from .auth import Authenticator
from .errors import SimError, invalid_parameters
from .migration import Migrator
from .params import Param, Schema, size_param
from .xapi import Xapi

log = get_logger(__name__)
SERVER_VERSION = "5.180.0"

STR = Param("string")
OPT_STR = Param("string", optional=True)
OPT_STR0 = Param("string0", optional=True)
OPT_BOOL = Param("boolean", optional=True)


class Session(Protocol):
    """What a method may know about its caller: the signed-in user, if any."""

    user: dict[str, Any] | None


Handler = Callable[[Session, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    """An API method: ``schema`` None means no validation; ``permission`` None means callable before sign-in."""

    handler: Handler
    schema: Schema | None
    permission: str | None = "admin"


class Api:
    """Implements the methods over one simulator's state."""

    def __init__(self, xapi: Xapi, migrator: Migrator, auth: Authenticator) -> None:
        self.xapi = xapi
        self.store = xapi.store
        self.migrator = migrator
        self.auth = auth
        self._one_shots: dict[str, str] = {}

    def methods(self) -> dict[str, Method]:
        """The method table, by JSON-RPC method name."""
        return {
            "session.signIn": Method(self._sign_in, None, None),
            "session.signInWithToken": Method(self._sign_in, {"token": STR}, None),
            "session.signInWithPassword": Method(self._sign_in, {"email": STR, "password": STR}, None),
            "session.getUser": Method(self._get_user, {}, ""),
            "system.getServerVersion": Method(self._server_version, {}, None),
            "server.getAll": Method(self._servers, {}),
            "xo.getAllObjects": Method(self._get_all_objects, {
                "filter": Param("filter", optional=True), "limit": Param("integer", optional=True),
                "ndjson": OPT_BOOL}, ""),
            "disk.create": Method(self._disk_create, {
                "name": STR, "size": Param("size"), "sr": STR, "vm": OPT_STR, "bootable": OPT_BOOL,
                "mode": OPT_STR, "position": OPT_STR}),
            "vdi.set": Method(self._vdi_set, {
                "id": STR, "name_label": OPT_STR, "name_description": OPT_STR0,
                "size": Param("size", optional=True), "cbt": OPT_BOOL}),
            "vdi.delete": Method(self._vdi_delete, {"id": STR}),
            "vdi.migrate": Method(self._vdi_migrate, {"id": STR, "sr_id": STR, "resourceSet": OPT_STR}),
            "vm.attachDisk": Method(self._attach_disk, {
                "vm": STR, "vdi": STR, "mode": OPT_STR, "position": OPT_STR, "bootable": OPT_BOOL}),
            "vbd.connect": Method(self._vbd_connect, {"id": STR}),
            "vbd.disconnect": Method(self._vbd_disconnect, {"id": STR}),
            "vbd.delete": Method(self._vbd_delete, {"id": STR}),
        }

    def pop_one_shot(self, token: str) -> str | None:
        """The NDJSON body behind a ``$getFrom`` URL, served once."""
        return self._one_shots.pop(token, None)

    # -- session / system ----------------------------------------------------------------------------
    async def _sign_in(self, session: Session, params: dict[str, Any]) -> Any:
        session.user = self.auth.sign_in(params)
        return session.user

    async def _get_user(self, session: Session, params: dict[str, Any]) -> Any:
        return session.user

    async def _server_version(self, session: Session, params: dict[str, Any]) -> Any:
        return SERVER_VERSION

    async def _servers(self, session: Session, params: dict[str, Any]) -> Any:
        """XO's connections to its pools (admin only): one server per pool, ``connected``, as xo-server shows
        them (``getAllXenServers``: no password; ``poolId`` only while connected)."""
        servers = []
        for pool in self.store.of_type("pool"):
            master = self.store.find(pool["master"]) if pool.get("master") else None
            servers.append({"id": f"server-{pool['id']}", "label": pool["name_label"],
                            "host": master["address"] if master else pool["name_label"], "username": "root",
                            "enabled": True, "readOnly": False, "allowUnauthorized": False,
                            "status": "connected", "poolId": pool["id"]})
        return servers

    # -- objects -------------------------------------------------------------------------------------
    async def _get_all_objects(self, session: Session, params: dict[str, Any]) -> Any:
        try:
            objects = self.store.select(params.get("filter"), params.get("limit"))
        except ValueError as exc:
            raise invalid_parameters([{"instancePath": "/filter", "message": str(exc)}], str(exc)) from exc
        if params.get("ndjson"):
            token = secrets.token_urlsafe(24)
            self._one_shots[token] = "".join(json.dumps(obj) + "\n" for obj in objects.values())
            return {"$getFrom": f"/api/{token}"}
        return objects

    # -- disks ---------------------------------------------------------------------------------------
    async def _disk_create(self, session: Session, params: dict[str, Any]) -> Any:
        size = size_param("size", params["size"])
        read_only = _is_read_only(params.get("mode"))
        sr = self.store.get(params["sr"], "SR")
        vm = self.store.get(params["vm"], "VM") if "vm" in params else None
        vdi = await self.xapi.create_vdi(sr["id"], name_label=params["name"], size=size)
        if vm is None:
            return vdi["id"]
        try:
            vbd = self.xapi.create_vbd(vm["id"], vdi["id"], position=params.get("position"),
                                       bootable=params.get("bootable", False), read_only=read_only)
        except SimError:
            await self.xapi.destroy_vdi(vdi["id"])
            raise
        if vm["power_state"] == "Running":
            try:
                await self.xapi.connect(vbd["id"])
            except SimError as exc:  # disk.create logs plug errors and does not throw (XO behaviour)
                log.warning("disk_create_plug_failed", vbd=vbd["id"], error=str(exc))
        return vdi["id"]

    async def _vdi_set(self, session: Session, params: dict[str, Any]) -> Any:
        vdi = self.store.get(params["id"], "VDI", "VDI-snapshot")
        if "size" in params:
            size = size_param("size", params["size"])
            if size < vdi["size"]:
                raise invalid_parameters(message=f"cannot set new size ({size}) below the current size ({vdi['size']})")
            await self.xapi.resize_vdi(vdi["id"], size)
        changes: dict[str, Any] = {key: params[key] for key in ("name_label", "name_description") if key in params}
        if "cbt" in params:
            changes["cbt_enabled"] = params["cbt"]
        if changes:
            self.store.update(vdi["id"], changes)
        return None

    async def _vdi_delete(self, session: Session, params: dict[str, Any]) -> Any:
        await self.xapi.destroy_vdi(self.store.get(params["id"], "VDI", "VDI-snapshot")["id"])
        return None

    async def _vdi_migrate(self, session: Session, params: dict[str, Any]) -> Any:
        vdi = self.store.get(params["id"], "VDI")
        sr = self.store.get(params["sr_id"], "SR")
        return await self.migrator.migrate(vdi["id"], sr["id"])

    # -- VBDs ----------------------------------------------------------------------------------------
    async def _attach_disk(self, session: Session, params: dict[str, Any]) -> Any:
        read_only = _is_read_only(params.get("mode"))
        vm = self.store.get(params["vm"], "VM")
        vdi = self.store.get(params["vdi"], "VDI")
        vbd = self.xapi.create_vbd(vm["id"], vdi["id"], position=params.get("position"),
                                   bootable=params.get("bootable", False), read_only=read_only)
        if vm["power_state"] == "Running":
            await self.xapi.connect(vbd["id"])  # awaited and thrown since XO 5.113; the VBD stays
        return None

    async def _vbd_connect(self, session: Session, params: dict[str, Any]) -> Any:
        await self.xapi.connect(self.store.get(params["id"], "VBD")["id"])
        return None

    async def _vbd_disconnect(self, session: Session, params: dict[str, Any]) -> Any:
        await self.xapi.unplug(self.store.get(params["id"], "VBD")["id"])
        return None

    async def _vbd_delete(self, session: Session, params: dict[str, Any]) -> Any:
        vbd = self.store.get(params["id"], "VBD")
        if vbd["attached"]:
            try:
                await self.xapi.unplug(vbd["id"])
            except SimError as exc:  # vbd.delete ignores unplug errors (XO behaviour)
                log.debug("vbd_delete_unplug_failed", vbd=vbd["id"], error=str(exc))
        await self.xapi.destroy_vbd(vbd["id"])
        return None


def _is_read_only(mode: str | None) -> bool:
    if mode not in (None, "RW", "RO"):
        raise invalid_parameters([{"instancePath": "/mode", "message": "must be equal to one of the allowed values"}])
    return mode == "RO"
