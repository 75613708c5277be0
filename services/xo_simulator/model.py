"""The object store: XO objects by id, indexes by type/name/ref, filtered queries and change notifications.

The simulator keeps two: the truth (what XAPI knows) and XO's cache (what callers see, see cache.py).

Objects are copy-on-write: a stored dict is never mutated once stored, ``update`` stores a new dict, so
a snapshot can be handed out (to JSON encoding, to notifications) without copying. Callers MUST NOT
mutate what they get back. XO semantics (XAPI checks, errors) live in xapi.py, not here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .errors import no_such_object
from .matching import compile_filter
from .shapes import XoObject

Listener = Callable[[Mapping[str, XoObject], Mapping[str, XoObject]], None]
"""Called once per batch of changes with ({id: object} entered or updated, {id: last version} removed), either
possibly empty but not both; must not raise."""


class ObjectStore:
    """All simulated XO objects, in insertion order."""

    def __init__(self) -> None:
        self._objects: dict[str, XoObject] = {}
        self._by_type: dict[str, dict[str, XoObject]] = {}
        self._by_name: dict[tuple[str, str], set[str]] = {}
        self._by_ref: dict[str, str] = {}
        self._order: dict[str, int] = {}
        self._counter = itertools.count()
        self._listeners: list[Listener] = []
        self._entered: dict[str, XoObject] = {}
        self._exited: dict[str, XoObject] = {}
        self._batch_depth = 0

    # -- reads ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, obj_id: object) -> bool:
        return obj_id in self._objects

    def find(self, obj_id: str) -> XoObject | None:
        """Return the object with this id or XAPI ref, or None."""
        obj = self._objects.get(obj_id)
        if obj is None and obj_id.startswith("OpaqueRef:"):
            real_id = self._by_ref.get(obj_id)
            obj = self._objects.get(real_id) if real_id else None
        return obj

    def get(self, obj_id: str, *types: str) -> XoObject:
        """Return the object, raising XO ``no such object`` (code 1) if absent or not of one of ``types``."""
        obj = self.find(obj_id)
        if obj is None or (types and obj["type"] not in types):
            raise no_such_object(obj_id, (types[0] if len(types) == 1 else list(types)) if types else None)
        return obj

    def of_type(self, obj_type: str) -> Iterable[XoObject]:
        """Every object of a type, in insertion order (a live view: do not mutate the store while iterating)."""
        return self._by_type.get(obj_type, {}).values()

    def all(self) -> dict[str, XoObject]:
        """A shallow copy of the id -> object mapping (objects are shared, not copied)."""
        return dict(self._objects)

    def select(self, source: Mapping[str, Any] | str | None, limit: int | None = None) -> dict[str, XoObject]:
        """Return matching objects keyed by id, in insertion order, stopping after ``limit`` matches.

        Raises ValueError for an unparsable string filter.
        """
        result: dict[str, XoObject] = {}
        if limit is not None and limit <= 0:
            return result
        predicate = compile_filter(source)
        candidates = self._candidates(source) if isinstance(source, Mapping) else self._objects.values()
        for obj in candidates:
            if predicate(obj):
                result[obj["id"]] = obj
                if limit is not None and len(result) >= limit:
                    break
        return result

    def _candidates(self, source: Mapping[str, Any]) -> Iterable[XoObject]:
        for key in ("id", "uuid"):
            value = source.get(key)
            if isinstance(value, str):
                obj = self._objects.get(value)
                return [obj] if obj is not None else []
        obj_type = source.get("type")
        if not isinstance(obj_type, str):
            return self._objects.values()
        name = source.get("name_label")
        if isinstance(name, str):
            ids = sorted(self._by_name.get((obj_type, name), ()), key=self._order.__getitem__)
            return [self._objects[i] for i in ids]
        return self._by_type.get(obj_type, {}).values()

    # -- writes --------------------------------------------------------------------------------------
    def add(self, obj: XoObject) -> XoObject:
        """Store a new object; ValueError if its id exists."""
        obj_id = obj["id"]
        if obj_id in self._objects:
            raise ValueError(f"object {obj_id} already exists")
        self._order[obj_id] = next(self._counter)
        self._by_ref[obj["_xapiRef"]] = obj_id
        self._put(obj)
        return obj

    def put(self, obj: XoObject) -> XoObject:
        """Store ``obj`` as the current version of its id (added at the end when new); returns it."""
        obj_id = obj["id"]
        old = self._objects.get(obj_id)
        if old is None:
            self._order[obj_id] = next(self._counter)
        else:
            self._unindex_name(old)
            if old["_xapiRef"] != obj["_xapiRef"]:
                self._by_ref.pop(old["_xapiRef"], None)
        self._by_ref[obj["_xapiRef"]] = obj_id
        self._put(obj)
        return obj

    def update(self, obj_id: str, changes: Mapping[str, Any]) -> XoObject:
        """Store a new version of the object with ``changes`` applied; returns it."""
        old = self.get(obj_id)
        new = {**old, **changes}
        self._unindex_name(old)
        self._put(new)
        return new

    def remove(self, obj_id: str) -> XoObject:
        """Delete the object; returns its last version."""
        obj = self.get(obj_id)
        del self._objects[obj_id]
        del self._by_type[obj["type"]][obj_id]
        del self._order[obj_id]
        self._by_ref.pop(obj["_xapiRef"], None)
        self._unindex_name(obj)
        self._entered.pop(obj_id, None)
        self._exited[obj_id] = obj
        self._flush_unless_batched()
        return obj

    def clear(self) -> None:
        """Remove every object (one ``exit`` notification)."""
        with self.batch():
            for obj_id in list(self._objects):
                self.remove(obj_id)

    def _put(self, obj: XoObject) -> None:
        obj_id = obj["id"]
        self._objects[obj_id] = obj
        self._by_type.setdefault(obj["type"], {})[obj_id] = obj
        name = obj.get("name_label")
        if isinstance(name, str):
            self._by_name.setdefault((obj["type"], name), set()).add(obj_id)
        self._exited.pop(obj_id, None)
        self._entered[obj_id] = obj
        self._flush_unless_batched()

    def _unindex_name(self, obj: XoObject) -> None:
        name = obj.get("name_label")
        if isinstance(name, str):
            bucket = self._by_name.get((obj["type"], name))
            if bucket is not None:
                bucket.discard(obj["id"])
                if not bucket:
                    del self._by_name[(obj["type"], name)]

    # -- notifications -------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(entered, exited)`` after every change batch; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Coalesce the changes made inside into one ``enter`` and one ``exit`` notification."""
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            self._flush_unless_batched()

    def _flush_unless_batched(self) -> None:
        if self._batch_depth:
            return
        entered, exited = self._entered, self._exited
        if not entered and not exited:
            return
        self._entered, self._exited = {}, {}
        for listener in list(self._listeners):
            listener(entered, exited)
