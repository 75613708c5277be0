"""The XO simulator's object store: queries, limit, indexes and change notifications."""

from __future__ import annotations

from typing import Any

import pytest

from services.xo_simulator.errors import XoApiError
from services.xo_simulator.model import ObjectStore


def _obj(obj_id: str, obj_type: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"id": obj_id, "uuid": obj_id, "type": obj_type, "name_label": name,
            "_xapiRef": f"OpaqueRef:{obj_id}", **extra}


@pytest.fixture
def store() -> ObjectStore:
    s = ObjectStore()
    for i in range(5):
        s.add(_obj(f"v{i}", "VDI", "same" if i % 2 == 0 else f"disk{i}", tags=["t"] if i < 3 else []))
    s.add(_obj("sr", "SR", "same"))
    return s


def test_select_by_type_name_and_limit_keeps_insertion_order(store: ObjectStore) -> None:
    assert list(store.select({"type": "VDI", "name_label": "same"})) == ["v0", "v2", "v4"]
    assert list(store.select({"type": "VDI", "tags": ["t"]}, limit=2)) == ["v0", "v1"]
    assert store.select({"type": "VDI"}, limit=0) == {}
    assert list(store.select({"name_label": "same"})) == ["v0", "v2", "v4", "sr"]
    assert list(store.select({"id": "v3", "type": "VDI"})) == ["v3"]
    assert store.select({"id": "v3", "type": "SR"}) == {}


def test_name_index_follows_renames(store: ObjectStore) -> None:
    store.update("v1", {"name_label": "same"})
    assert list(store.select({"type": "VDI", "name_label": "same"})) == ["v0", "v1", "v2", "v4"]
    assert store.select({"type": "VDI", "name_label": "disk1"}) == {}


def test_update_is_copy_on_write(store: ObjectStore) -> None:
    before = store.get("v0")
    after = store.update("v0", {"name_label": "new"})
    assert before["name_label"] == "same" and after["name_label"] == "new"
    assert store.find(before["_xapiRef"]) is after  # refs resolve too


def test_get_raises_no_such_object_with_type(store: ObjectStore) -> None:
    with pytest.raises(XoApiError) as info:
        store.get("v0", "SR")
    assert (info.value.code, info.value.data) == (1, {"id": "v0", "type": "SR"})


def test_batch_coalesces_notifications_and_drops_enter_of_removed_objects(store: ObjectStore) -> None:
    events: list[tuple[str, list[str]]] = []
    store.subscribe(lambda entered, exited: events.extend(
        (kind, list(items)) for kind, items in (("enter", entered), ("exit", exited)) if items))
    with store.batch():
        store.add(_obj("tmp", "VDI", "x"))
        store.update("v0", {"name_label": "y"})
        store.remove("tmp")
        store.remove("v1")
    assert events == [("enter", ["v0"]), ("exit", ["tmp", "v1"])]
    store.update("v2", {"size": 1})
    assert events[-1] == ("enter", ["v2"])
