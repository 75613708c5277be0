"""The object store: XO objects by id, indexes by type/pool/ref and by the fields object filters name, filtered
queries and change notifications.

The simulator keeps two: the truth (what XAPI knows) and XO's cache (what callers see, see cache.py). Both hold
tens of thousands of objects in a generated topology (generated.py), so a filter naming an id or one of
``INDEXED_FIELDS`` reads an index, never a scan of its type, and every write costs O(1) index work.

Objects are copy-on-write: a stored dict is never mutated once stored, ``update`` stores a new dict, so
a snapshot can be handed out (to JSON encoding, to notifications) without copying. Callers MUST NOT
mutate what they get back. XO semantics (XAPI checks, errors) live in xapi.py, not here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import no_such_object
from .matching import compile_filter
from .shapes import XoObject

INDEXED_FIELDS = ("name_label", "$SR", "VM", "VDI", "$container")
"""String fields of exact-match object filters served from an index (per type): a VDI's name and SR, a VBD's VM
and VDI, a VM's host."""

Listener = Callable[[Mapping[str, XoObject], Mapping[str, XoObject]], None]
"""Called once per batch of changes with ({id: object} entered or updated, {id: last version} removed), either
possibly empty but not both; must not raise."""


class ObjectStore:
    """All simulated XO objects, in insertion order."""

    def __init__(self) -> None:
        self._objects: dict[str, XoObject] = {}
        self._by_type: dict[str, dict[str, XoObject]] = {}
        self._by_pool: dict[str, dict[str, None]] = {}
        self._by_field: dict[tuple[str, str, str], dict[str, None]] = {}  # (type, field, value) -> ids
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

    def of_type(self, obj_type: str) -> Collection[XoObject]:
        """Every object of a type, in insertion order (a live view: do not mutate the store while iterating)."""
        return self._by_type.get(obj_type, {}).values()

    def in_pool(self, pool_id: str) -> list[XoObject]:
        """Every object of a pool (its ``$pool``), in insertion order."""
        return self._ordered(self._by_pool.get(pool_id, {}))

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
        buckets: list[dict[str, None]] = [
            self._by_field.get((obj_type, key, value), {})
            for key in INDEXED_FIELDS if isinstance(value := source.get(key), str)
        ]
        pool = source.get("$pool")
        if isinstance(pool, str):
            buckets.append(self._by_pool.get(pool, {}))
        if buckets:
            smallest = min(buckets, key=len)
            return self._ordered(smallest)
        return self._by_type.get(obj_type, {}).values()

    def _ordered(self, ids: Iterable[str]) -> list[XoObject]:
        return [self._objects[i] for i in sorted(ids, key=self._order.__getitem__)]

    # -- writes --------------------------------------------------------------------------------------
    def add(self, obj: XoObject) -> XoObject:
        """Store a new object; ValueError if its id exists."""
        obj_id = obj["id"]
        if obj_id in self._objects:
            raise ValueError(f"object {obj_id} already exists")
        self._order[obj_id] = next(self._counter)
        self._by_ref[obj["_xapiRef"]] = obj_id
        self._put(obj, None)
        return obj

    def put(self, obj: XoObject) -> XoObject:
        """Store ``obj`` as the current version of its id (added at the end when new); returns it."""
        obj_id = obj["id"]
        old = self._objects.get(obj_id)
        if old is None:
            self._order[obj_id] = next(self._counter)
        elif old["_xapiRef"] != obj["_xapiRef"]:
            self._by_ref.pop(old["_xapiRef"], None)
        self._by_ref[obj["_xapiRef"]] = obj_id
        self._put(obj, old)
        return obj

    def update(self, obj_id: str, changes: Mapping[str, Any]) -> XoObject:
        """Store a new version of the object with ``changes`` applied; returns it."""
        old = self.get(obj_id)
        new = {**old, **changes}
        self._put(new, old)
        return new

    def remove(self, obj_id: str) -> XoObject:
        """Delete the object; returns its last version."""
        obj = self.get(obj_id)
        del self._objects[obj_id]
        del self._by_type[obj["type"]][obj_id]
        del self._order[obj_id]
        self._by_ref.pop(obj["_xapiRef"], None)
        self._reindex(obj, None)
        self._entered.pop(obj_id, None)
        self._exited[obj_id] = obj
        self._flush_unless_batched()
        return obj

    def clear(self) -> None:
        """Remove every object (one ``exit`` notification)."""
        with self.batch():
            for obj_id in list(self._objects):
                self.remove(obj_id)

    def _put(self, obj: XoObject, old: XoObject | None) -> None:
        obj_id = obj["id"]
        self._objects[obj_id] = obj
        self._by_type.setdefault(obj["type"], {})[obj_id] = obj
        self._reindex(old, obj)
        self._exited.pop(obj_id, None)
        self._entered[obj_id] = obj
        self._flush_unless_batched()

    def _reindex(self, old: XoObject | None, new: XoObject | None) -> None:
        """Move one object's entries in the pool and field indexes from ``old`` to ``new`` (either may be None)."""
        _move(self._by_pool, _pool_key(old), _pool_key(new), (new or old or {}).get("id"))
        for field in INDEXED_FIELDS:
            _move(self._by_field, _field_key(old, field), _field_key(new, field), (new or old or {}).get("id"))

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


K = TypeVar("K")


def _move(index: dict[K, dict[str, None]], before: K | None, after: K | None, obj_id: str | None) -> None:
    if before == after or obj_id is None:
        return
    if before is not None and (bucket := index.get(before)) is not None:
        bucket.pop(obj_id, None)
        if not bucket:
            del index[before]
    if after is not None:
        index.setdefault(after, {})[obj_id] = None


def _pool_key(obj: XoObject | None) -> str | None:
    value = obj.get("$pool") if obj is not None else None
    return value if isinstance(value, str) else None


def _field_key(obj: XoObject | None, field: str) -> tuple[str, str, str] | None:
    """Where ``obj`` sits in the index of ``field``: (type, field, value); None without a string value there."""
    value = obj.get(field) if obj is not None else None
    return (obj["type"], field, value) if obj is not None and isinstance(value, str) else None
