"""A cache of XO's slowly changing objects the driver reads (SRs, VMs), kept current by XO's ``all``
notifications and reloaded when it is older than ``max_age_s`` or after a reconnect.

VDIs and VBDs are never cached: every decision about a disk re-reads XO.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from shared.xo.client import XoClient
from shared.xo.models import Sr, Vm, XoObject

M = TypeVar("M", bound=XoObject)
_MODELS: dict[str, type[XoObject]] = {"SR": Sr, "VM": Vm}


class Inventory:
    """Read-through cache; ``sr()``/``vm()`` fall back to XO on a miss."""

    def __init__(self, client: XoClient, *, max_age_s: float = 30.0) -> None:
        self._client = client
        self._max_age_s = max_age_s
        self._objects: dict[str, dict[str, XoObject]] = {kind: {} for kind in _MODELS}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()
        client.session.subscribe(self._on_notification)
        client.session.on_reconnect(self._invalidate)

    async def srs(self, *, tag: str | None = None) -> list[Sr]:
        await self._fresh()
        found = [obj for obj in self._objects["SR"].values() if isinstance(obj, Sr)]
        return [sr for sr in found if tag is None or tag in sr.tags]

    async def sr(self, sr_id: str) -> Sr | None:
        return await self._read_through("SR", Sr, sr_id, self._client.get_sr)

    async def vm(self, vm_id: str) -> Vm | None:
        return await self._read_through("VM", Vm, vm_id, self._client.get_vm)

    async def _read_through(self, kind: str, model: type[M], obj_id: str,
                            fetch: Callable[[str], Awaitable[M | None]]) -> M | None:
        """The cached object, else XO's (then cached); None when XO has none."""
        await self._fresh()
        cached = self._objects[kind].get(obj_id)
        if isinstance(cached, model):
            return cached
        found = await fetch(obj_id)
        if found is not None:
            self._objects[kind][found.id] = found
        return found

    def invalidate(self) -> None:
        """Force a reload on the next read (e.g. after an SR's usage changed by our own call)."""
        self._loaded_at = float("-inf")

    async def _invalidate(self) -> None:
        self.invalidate()

    async def _fresh(self) -> None:
        if time.monotonic() - self._loaded_at < self._max_age_s:
            return
        async with self._lock:
            if time.monotonic() - self._loaded_at < self._max_age_s:
                return
            started = time.monotonic()
            kinds = list(_MODELS)
            results = await asyncio.gather(*(self._client.get_objects({"type": kind}) for kind in kinds))
            for kind, objs in zip(kinds, results, strict=True):
                self._objects[kind] = {m.id: m for m in (_parse(kind, obj) for obj in objs) if m is not None}
            self._loaded_at = started

    def _on_notification(self, method: str, params: Any) -> None:
        if method != "all" or not isinstance(params, dict) or not isinstance(params.get("items"), dict):
            return
        if params.get("type") == "exit":
            # XO sends each removed object's value as 0 (not the object): forget the id whatever its kind.
            for obj_id in params["items"]:
                for objects in self._objects.values():
                    objects.pop(obj_id, None)
            return
        for obj_id, obj in params["items"].items():
            kind = obj.get("type") if isinstance(obj, dict) else None
            if kind in self._objects and (model := _parse(kind, obj)) is not None:
                self._objects[kind][obj_id] = model


def _parse(kind: str, obj: dict[str, Any]) -> XoObject | None:
    try:
        return _MODELS[kind].model_validate(obj)
    except ValidationError:
        return None
