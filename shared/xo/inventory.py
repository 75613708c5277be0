"""A cache of XO's slowly changing objects the driver reads (SRs, VMs), kept current by XO's ``all`` notifications.

Each kind is loaded in full once (``warm()`` at start, else at its first read) and again, before the read that
needs it, after ``invalidate()`` or when the socket to XO closed (notifications were missed: the load reconnects).
``usage_changed()`` (our own call changed an SR's usage) reloads the SRs only before a read that decides from
their usage (placement, capacity); a read of where an SR is (``sr(..., usage=False)``: an attach's "is it usable
from this host") goes on from the cache, as an SR's pool, host and sharing never change with its usage.
Every ``max_age_s`` it is also reloaded as a safety net, in the background: the notifications keep it current
meanwhile, so no request waits for a list of thousands of VMs. VDIs and VBDs are never cached: every decision
about a disk re-reads XO.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from shared.logging import get_logger
from shared.xo.cache import changed_objects
from shared.xo.client import XoClient
from shared.xo.errors import XoError
from shared.xo.models import Sr, Vm, XoObject

log = get_logger(__name__)
M = TypeVar("M", bound=XoObject)
_MODELS: dict[str, type[XoObject]] = {"SR": Sr, "VM": Vm}
_NEVER = float("-inf")


class Inventory:
    """Read-through cache; ``sr()``/``vm()`` fall back to XO on a miss."""

    def __init__(self, client: XoClient, *, max_age_s: float = 300.0) -> None:
        self._client = client
        self._max_age_s = max_age_s
        self._objects: dict[str, dict[str, XoObject]] = {kind: {} for kind in _MODELS}
        self._loaded_at = dict.fromkeys(_MODELS, _NEVER)  # _NEVER: must load before the next read
        self._epoch = dict.fromkeys(_MODELS, 0)  # bumped by invalidate()
        self._usage_epoch = 0  # bumped by usage_changed()
        self._usage_loaded = 0  # the usage epoch the SRs were last loaded at
        self._locks = {kind: asyncio.Lock() for kind in _MODELS}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        client.session.subscribe(self._on_notification)
        client.session.on_reconnect(self._invalidate)

    async def srs(self, *, tag: str | None = None) -> list[Sr]:
        """The SRs (tagged ``tag``), with current usage (placement and capacity decide from it)."""
        await self._fresh("SR", usage=True)
        found = [obj for obj in self._objects["SR"].values() if isinstance(obj, Sr)]
        return [sr for sr in found if tag is None or tag in sr.tags]

    async def sr(self, sr_id: str, *, usage: bool = True) -> Sr | None:
        """One SR; ``usage=False`` when only where it is matters (its pool, host, sharing): no reload after
        ``usage_changed()``."""
        return await self._read_through("SR", Sr, sr_id, self._client.get_sr, usage=usage)

    async def vm(self, vm_id: str) -> Vm | None:
        return await self._read_through("VM", Vm, vm_id, self._client.get_vm)

    async def warm(self, *kinds: str) -> None:
        """Load ``kinds`` (default: every kind) now (at start, so that no request pays for it); logs and returns
        when XO cannot be read yet (the first read loads then)."""
        kinds = kinds or tuple(_MODELS)
        started = time.perf_counter()
        try:
            for kind in kinds:
                await self._fresh(kind)
        except XoError as exc:
            log.warning("inventory_not_loaded", error=exc.message)
            return
        log.info("inventory_loaded", duration_ms=round((time.perf_counter() - started) * 1000, 1),
                 **{kind.lower() + "s": len(self._objects[kind]) for kind in kinds})

    async def close(self) -> None:
        """Stop the background reloads."""
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_through(self, kind: str, model: type[M], obj_id: str,
                            fetch: Callable[[str], Awaitable[M | None]], *, usage: bool = False) -> M | None:
        """The cached object, else XO's (then cached); None when XO has none."""
        await self._fresh(kind, usage=usage)
        cached = self._objects[kind].get(obj_id)
        if isinstance(cached, model):
            return cached
        found = await fetch(obj_id)
        if found is not None:
            self._objects[kind][found.id] = found
        return found

    def invalidate(self, *kinds: str) -> None:
        """Reload ``kinds`` (default: all) before their next read, e.g. ``"SR"`` after our own call changed an
        SR's usage."""
        for kind in kinds or tuple(_MODELS):
            self._loaded_at[kind] = _NEVER
            self._epoch[kind] += 1

    def usage_changed(self) -> None:
        """Our own call changed an SR's usage (a disk created, deleted or grown): reload the SRs before the next
        read that needs their usage; reads of where an SR is go on from the cache."""
        self._usage_epoch += 1

    async def _invalidate(self) -> None:
        self.invalidate()  # after a (re)connection: notifications may have been missed

    def _stale(self, kind: str, usage: bool) -> bool:
        return (self._loaded_at[kind] == _NEVER or not self._client.session.is_connected
                or (usage and kind == "SR" and self._usage_loaded != self._usage_epoch))

    async def _fresh(self, kind: str, *, usage: bool = False) -> None:
        if self._stale(kind, usage):
            async with self._locks[kind]:
                if self._stale(kind, usage):  # else loaded meanwhile
                    await self._load(kind)
        elif time.monotonic() - self._loaded_at[kind] >= self._max_age_s and kind not in self._refreshing:
            task = asyncio.create_task(self._refresh(kind), name=f"inventory-refresh-{kind}")
            self._refreshing[kind] = task
            task.add_done_callback(lambda _: self._refreshing.pop(kind, None))

    async def _refresh(self, kind: str) -> None:
        try:
            async with self._locks[kind]:
                await self._load(kind)
        except XoError as exc:  # reads go on with what notifications keep current; the next read tries again
            log.warning("inventory_refresh_failed", kind=kind, error=exc.message)

    async def _load(self, kind: str) -> None:
        await self._client.session.ensure_connected()  # a reconnection invalidates before the read, not during it
        epoch, usage_epoch, started = self._epoch[kind], self._usage_epoch, time.monotonic()
        objs = await self._client.get_objects({"type": kind})
        self._objects[kind] = {m.id: m for m in (_parse(kind, obj) for obj in objs) if m is not None}
        if self._epoch[kind] == epoch:  # else invalidated while reading: load again before the next read
            self._loaded_at[kind] = started
        if kind == "SR":  # a usage change while reading may be missing from what was read: stays stale
            self._usage_loaded = usage_epoch

    def _on_notification(self, method: str, params: Any) -> None:
        for obj_id, obj in changed_objects(method, params):
            if obj is None:  # left the cache (its value is 0, not the object): forget the id whatever its kind
                for objects in self._objects.values():
                    objects.pop(obj_id, None)
                continue
            kind = obj.get("type")
            # a kind never loaded (the migrator reads SRs only) or to be reloaded anyway: nothing to parse or keep
            if kind in self._objects and self._loaded_at[kind] != _NEVER and (model := _parse(kind, obj)) is not None:
                self._objects[kind][obj_id] = model


def _parse(kind: str, obj: dict[str, Any]) -> XoObject | None:
    try:
        return _MODELS[kind].model_validate(obj)
    except ValidationError:
        return None
