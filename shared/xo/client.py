"""XoClient: the typed XO calls the driver needs, over one RpcSession.

Every call is bounded (the session's timeout, or an explicit one for long calls such as vdi.migrate).
Raises only the XoError tree (shared/xo/errors.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from shared.backoff import Backoff
from shared.config import XoSettings
from shared.xo.errors import XoError, XoNotFound
from shared.xo.models import Sr, Vbd, Vdi, Vm, XoObject
from shared.xo.transport import Credentials, RpcSession, WebSocketConnector, api_url, tls_context

T = TypeVar("T")
M = TypeVar("M", bound=XoObject)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class XoClient:
    """Typed XO JSON-RPC methods. Lookups return models; ``None``/``[]`` when nothing matches."""

    def __init__(self, session: RpcSession) -> None:
        self._session = session

    @classmethod
    def from_settings(cls, settings: XoSettings) -> XoClient:
        """Build a client (no I/O yet: the socket opens on the first call)."""
        settings.require_credentials()
        url = api_url(settings.url)
        connector = WebSocketConnector(
            url, ssl_context=tls_context(settings.ca_file, settings.insecure), max_message_bytes=MAX_MESSAGE_BYTES
        )
        credentials = Credentials(
            token=settings.token.get_secret_value() if settings.token else None,
            username=settings.username,
            password=settings.password.get_secret_value() if settings.password else None,
        )
        session = RpcSession(
            connector, credentials, timeout_s=settings.timeout_s, connect_timeout_s=settings.connect_timeout_s
        )
        return cls(session)

    @property
    def session(self) -> RpcSession:
        return self._session

    async def close(self) -> None:
        await self._session.close()

    # -- reads ---------------------------------------------------------------------------------

    async def get_objects(self, filter: dict[str, Any], *, limit: int | None = None) -> list[dict[str, Any]]:
        """``xo.getAllObjects`` with an object filter (exact match; arrays mean contains-all)."""
        params: dict[str, Any] = {"filter": filter}
        if limit is not None:
            params["limit"] = limit
        result = await self._session.call("xo.getAllObjects", params, idempotent=True)
        if not isinstance(result, dict):
            raise XoError("XO xo.getAllObjects returned something other than an object map", method="xo.getAllObjects")
        return [obj for obj in result.values() if isinstance(obj, dict)]

    async def ping(self) -> None:
        """One cheap signed-in call; raises XoUnavailable/XoAuthError when XO cannot serve us."""
        await self.get_objects({"type": "pool"}, limit=1)

    async def find_vdis(self, *, name_label: str | None = None, sr_id: str | None = None) -> list[Vdi]:
        """VDIs (type ``VDI``, snapshots excluded) with this exact name and/or on this SR (every VDI without either).
        XoError when XO sends one we cannot read."""
        query: dict[str, Any] = {"type": "VDI"}
        if name_label is not None:
            query["name_label"] = name_label
        if sr_id is not None:
            query["$SR"] = sr_id
        return await self._typed(Vdi, query)

    async def get_vdi(self, vdi_id: str) -> Vdi | None:
        return await self._one(Vdi, {"type": "VDI", "id": vdi_id})

    async def find_srs(self, *, tag: str | None = None) -> list[Sr]:
        """SRs carrying ``tag`` (all SRs when None)."""
        query: dict[str, Any] = {"type": "SR"}
        if tag is not None:
            query["tags"] = [tag]
        return await self._typed(Sr, query)

    async def get_sr(self, sr_id: str) -> Sr | None:
        return await self._one(Sr, {"type": "SR", "id": sr_id})

    async def get_vm(self, vm_id: str) -> Vm | None:
        return await self._one(Vm, {"type": "VM", "id": vm_id})

    async def find_vbds(self, *, vm_id: str | None = None, vdi_id: str | None = None) -> list[Vbd]:
        """VBDs of a VM and/or a VDI."""
        query: dict[str, Any] = {"type": "VBD"}
        if vm_id is not None:
            query["VM"] = vm_id
        if vdi_id is not None:
            query["VDI"] = vdi_id
        return await self._typed(Vbd, query)

    # -- writes --------------------------------------------------------------------------------

    async def create_disk(self, name: str, size_bytes: int, sr_id: str) -> str:
        """``disk.create``; returns the new VDI UUID. Not idempotent: callers look up by name first."""
        result = await self._session.call("disk.create", {"name": name, "size": size_bytes, "sr": sr_id})
        return _expect_str(result, "disk.create")

    async def set_vdi(
        self,
        vdi_id: str,
        *,
        name_label: str | None = None,
        name_description: str | None = None,
        size_bytes: int | None = None,
    ) -> None:
        """``vdi.set``: rename, describe or grow (size only grows)."""
        params: dict[str, Any] = {"id": vdi_id}
        if name_label is not None:
            params["name_label"] = name_label
        if name_description is not None:
            params["name_description"] = name_description
        if size_bytes is not None:
            params["size"] = size_bytes
        await self._session.call("vdi.set", params, idempotent=True)

    async def delete_vdi(self, vdi_id: str) -> None:
        """``vdi.delete``; an already-deleted VDI counts as success. Attached -> XoVdiInUse."""
        try:
            await self._session.call("vdi.delete", {"id": vdi_id}, idempotent=True)
        except XoNotFound:
            return

    async def migrate_vdi(self, vdi_id: str, sr_id: str, *, timeout_s: float) -> str:
        """``vdi.migrate`` to ``sr_id``; returns the VDI UUID afterwards (it changes on a copy).

        XO before 5.104.1 returns ``true``: the copy is then found by name on the target SR.
        """
        before = await self.get_vdi(vdi_id)
        result = await self._session.call("vdi.migrate", {"id": vdi_id, "sr_id": sr_id}, timeout_s=timeout_s)
        if isinstance(result, str) and result:
            return result
        if result is True and before is not None:
            copies = await self.find_vdis(name_label=before.name_label, sr_id=sr_id)
            if len(copies) == 1:
                return copies[0].id
        raise XoError(f"XO vdi.migrate returned {type(result).__name__}, not the new VDI UUID", method="vdi.migrate")

    async def attach_disk(self, vm_id: str, vdi_id: str, *, read_only: bool = False) -> None:
        """``vm.attachDisk`` (creates the VBD and plugs it on a running VM). Not idempotent."""
        await self._session.call("vm.attachDisk", {"vm": vm_id, "vdi": vdi_id, "mode": "RO" if read_only else "RW"})

    async def connect_vbd(self, vbd_id: str) -> None:
        await self._session.call("vbd.connect", {"id": vbd_id})

    async def delete_vbd(self, vbd_id: str) -> None:
        """``vbd.delete`` (unplug then destroy; the VDI stays). Already gone counts as success."""
        try:
            await self._session.call("vbd.delete", {"id": vbd_id}, idempotent=True)
        except XoNotFound:
            return

    # -- waiting -------------------------------------------------------------------------------

    async def wait_until(
        self, check: Callable[[], Awaitable[T | None]], *, timeout_s: float, max_interval_s: float = 0.5
    ) -> T | None:
        """Re-run ``check`` after each XO object notification (or a capped backoff) until it returns
        something other than None; returns None when ``timeout_s`` passes first."""
        changed = asyncio.Event()
        unsubscribe = self._session.subscribe(lambda method, _params: changed.set() if method == "all" else None)
        polls = Backoff(start_s=0.005, cap_s=max_interval_s, jitter=False).delays()
        interval_s = next(polls)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    changed.clear()
                    result = await check()
                    if result is not None:
                        return result
                    try:
                        async with asyncio.timeout(interval_s):
                            await changed.wait()
                    except TimeoutError:
                        interval_s = next(polls)
        except TimeoutError:
            return None
        finally:
            unsubscribe()

    # -- helpers -------------------------------------------------------------------------------

    async def _typed(self, model: type[M], query: dict[str, Any]) -> list[M]:
        return [_parse(model, obj) for obj in await self.get_objects(query)]

    async def _one(self, model: type[M], query: dict[str, Any]) -> M | None:
        found = await self.get_objects(query, limit=1)
        return _parse(model, found[0]) if found else None


def _parse(model: type[M], obj: dict[str, Any]) -> M:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors()[:3])
        raise XoError(f"XO sent a {model.__name__} object we cannot read (fields: {fields})") from exc


def _expect_str(result: Any, method: str) -> str:
    if isinstance(result, str) and result:
        return result
    raise XoError(f"XO {method} returned {type(result).__name__}, expected a UUID string", method=method)
