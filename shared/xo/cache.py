"""Waiting until XO's object cache shows a state: after our own writes (read-your-writes) and for plugs.

XO answers ``vdi.set``, ``vdi.delete``, ``vbd.*`` and ``vm.attachDisk`` before its object cache (what
``xo.getAllObjects`` and the ``all`` notifications show) has caught up: XAPI events reach it ~200 ms later or
more. A decision taken from a read right after such a call may see the world before the call. So a write
opens a ``Watch`` *before* the call, then ``settle`` waits until the state it expects is visible: from the
notifications themselves (they carry whole objects; no read per notification, whatever the notification rate),
and from a re-read on a capped cadence in case a notification was missed (reconnect) or never sent (no change).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

Obj = dict[str, Any]
FIRST_RECHECK_S = 0.25
"""First re-read after the call: XO's event loop polls XAPI every 200 ms at best, so earlier reads are wasted."""
MAX_RECHECK_S = 2.0


class Expectation(Protocol):
    """A state of XO's cache to wait for."""

    def relevant(self, obj_id: str, obj: Obj | None) -> bool:
        """Whether a notification item (``obj`` None: the id left the cache) may bear on this state."""

    def met(self, items: Mapping[str, Obj | None]) -> tuple[bool, Obj | None]:
        """(met, the object that meets it) from the latest items seen."""

    async def reread(self, read: Reader) -> tuple[bool, Obj | None]:
        """(met, object) from a fresh read of XO."""


Reader = Callable[[Mapping[str, Any]], Awaitable[list[Obj]]]
"""``xo.getAllObjects`` with an object filter, returning the matching objects."""


def changed_objects(method: str, params: Any) -> Iterator[tuple[str, Obj | None]]:
    """The items of an ``all`` notification as (id, object), the object None when the id left the cache (``exit``
    items carry ``0``, not the object); nothing for any other notification."""
    items = params.get("items") if method == "all" and isinstance(params, dict) else None
    if not isinstance(items, dict):
        return
    gone = params.get("type") == "exit"
    for obj_id, value in items.items():
        yield str(obj_id), None if gone or not isinstance(value, dict) else value


@dataclass(frozen=True)
class ObjectState:
    """Object ``obj_id`` as ``accepts`` wants it (``accepts(None)``: the object is gone from the cache)."""

    obj_id: str
    accepts: Callable[[Obj | None], bool]

    def relevant(self, obj_id: str, obj: Obj | None) -> bool:
        return obj_id == self.obj_id

    def met(self, items: Mapping[str, Obj | None]) -> tuple[bool, Obj | None]:
        if self.obj_id in items and self.accepts(items[self.obj_id]):
            return True, items[self.obj_id]
        return False, None

    async def reread(self, read: Reader) -> tuple[bool, Obj | None]:
        obj = next((o for o in await read({"id": self.obj_id}) if o.get("id") == self.obj_id), None)
        return self.accepts(obj), obj


@dataclass(frozen=True)
class MatchState:
    """Some object whose fields equal ``fields`` (an exact-match filter) and that ``accepts`` accepts."""

    fields: Mapping[str, Any]
    accepts: Callable[[Obj], bool]

    def _matches(self, obj: Obj | None) -> bool:
        return obj is not None and all(obj.get(key) == value for key, value in self.fields.items())

    def relevant(self, obj_id: str, obj: Obj | None) -> bool:
        return self._matches(obj)

    def met(self, items: Mapping[str, Obj | None]) -> tuple[bool, Obj | None]:
        for obj in items.values():
            if obj is not None and self._matches(obj) and self.accepts(obj):
                return True, obj
        return False, None

    async def reread(self, read: Reader) -> tuple[bool, Obj | None]:
        for obj in await read(self.fields):
            if self.accepts(obj):
                return True, obj
        return False, None


class CopyOver:
    """A notification subscriber: ``over`` is set once XO's cache showed VDI ``vdi_id`` under XAPI's ``copy``
    operation (VDI.copy, which vdi.migrate of a detached disk runs) and then without it, or gone. XO answers
    vdi.migrate only after more XAPI calls (the VBDs moved to the copy, the source destroyed): the copy's I/O is over
    from that notification on. A copy shorter than XO's cache lag may never show; ``over`` then stays unset."""

    def __init__(self, vdi_id: str) -> None:
        self.vdi_id = vdi_id
        self.over = asyncio.Event()
        self._copying = False

    def __call__(self, method: str, params: Any) -> None:
        for obj_id, obj in changed_objects(method, params):
            if obj_id != self.vdi_id:
                continue
            operations = obj.get("current_operations") if obj is not None else None
            if isinstance(operations, dict) and "copy" in operations.values():
                self._copying = True
            elif self._copying:
                self.over.set()


class Watch:
    """Collects the notification items an expectation cares about, from the moment it is subscribed.

    Keeps only relevant items (the latest per id), so a long wait under a storm of unrelated notifications
    holds no more than what it waits for.
    """

    def __init__(self, expectation: Expectation) -> None:
        self.expectation = expectation
        self.items: dict[str, Obj | None] = {}
        self.changed = asyncio.Event()

    def __call__(self, method: str, params: Any) -> None:
        for obj_id, obj in changed_objects(method, params):
            if self.expectation.relevant(obj_id, obj):
                self.items[obj_id] = obj
                self.changed.set()

    async def settle(self, read: Reader, *, timeout_s: float) -> tuple[bool, Obj | None]:
        """Wait until the expectation is met (from notifications, else re-reads on a capped cadence).

        Returns (True, object) once met, (False, last object read) when ``timeout_s`` passes first.
        """
        interval_s = FIRST_RECHECK_S
        last: Obj | None = None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    met, obj = self.expectation.met(self.items)
                    if met:
                        return True, obj
                    self.changed.clear()
                    try:
                        async with asyncio.timeout(interval_s):
                            await self.changed.wait()
                    except TimeoutError:
                        met, last = await self.expectation.reread(read)
                        if met:
                            return True, last
                        interval_s = min(interval_s * 2, MAX_RECHECK_S)
        except TimeoutError:
            return False, last


class DiskChanges:
    """Whether XO may show a disk differently from a read taken when this started (``XoClient.noting_changes``).

    ``changed`` turns True once an ``all`` notification shows a VDI named ``name`` or an id passed to ``track``
    (entering, changed, or leaving the cache), or once notifications may have been missed: the socket closed
    or another was opened since. Otherwise a new read would show what the old one did (reads and notifications
    both show XO's cache), so it can be skipped. Exits carry only ids: every one is kept, so that an exit handled
    before ``track`` still counts.
    """

    def __init__(self, name: str, connected: Callable[[], bool], connections: Callable[[], int]) -> None:
        self._name = name
        self._connected = connected
        self._connections = connections
        self._opened = connections()
        self._tracked: set[str] = set()
        self._exited: set[str] = set()
        self._expected: dict[str, Callable[[Obj], bool]] = {}
        self._seen = False

    def track(self, object_ids: Iterable[str]) -> None:
        """Count changes to these objects too (the VDIs just read, whatever their name becomes; their VBDs)."""
        self._tracked.update(object_ids)

    def expect(self, object_id: str, unchanged: Callable[[Obj], bool]) -> None:
        """From now on, a notification showing ``object_id`` as ``unchanged`` accepts is no change: the caller's own
        write to it (e.g. a mark on the disk), which would otherwise count as one."""
        self._expected[object_id] = unchanged

    @property
    def changed(self) -> bool:
        return (self._seen or not self._tracked.isdisjoint(self._exited) or not self._connected()
                or self._connections() != self._opened)

    def __call__(self, method: str, params: Any) -> None:
        for obj_id, obj in changed_objects(method, params):
            if obj is None:
                self._exited.add(obj_id)
            elif obj_id in self._expected and self._expected[obj_id](obj):
                continue
            elif obj_id in self._tracked or (obj.get("type") == "VDI" and obj.get("name_label") == self._name):
                self._seen = True
