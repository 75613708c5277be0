"""The XO simulator's object store: queries, limit, indexes and change notifications."""

from __future__ import annotations

import random
from typing import Any

import pytest

from services.xo_simulator import model
from services.xo_simulator.errors import XoApiError
from services.xo_simulator.matching import is_match
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


def _vbd(obj_id: str, vm: str, vdi: str, pool: str) -> dict[str, Any]:
    return {"id": obj_id, "uuid": obj_id, "type": "VBD", "VM": vm, "VDI": vdi, "$pool": pool,
            "_xapiRef": f"OpaqueRef:{obj_id}", "attached": False}


def test_filters_on_indexed_fields_answer_what_a_scan_answers_through_every_change() -> None:
    store = ObjectStore()
    rng = random.Random(7)
    for i in range(300):
        store.add(_vbd(f"b{i}", f"vm{i % 7}", f"vdi{i % 11}", f"p{i % 3}"))
    for step in range(600):  # moves, renames, removals, additions, batched or not
        obj_id = f"b{rng.randrange(320)}"
        if obj_id not in store:
            store.add(_vbd(obj_id, f"vm{rng.randrange(7)}", f"vdi{rng.randrange(11)}", f"p{rng.randrange(3)}"))
        elif step % 5 == 0:
            store.remove(obj_id)
        else:
            with store.batch():
                store.update(obj_id, {"VM": f"vm{rng.randrange(7)}", "VDI": None if step % 7 == 0 else "vdi3"})
    everything = list(store.all().values())
    for source in ({"type": "VBD", "VM": "vm3"}, {"type": "VBD", "VDI": "vdi3"}, {"type": "VBD", "VM": "vm1",
                   "VDI": "vdi3"}, {"type": "VBD", "$pool": "p2"}, {"type": "VBD", "VDI": "vdi3", "$pool": "p0"},
                   {"type": "VBD", "VM": "nobody"}, {"type": "SR", "VM": "vm3"}):
        expected = [obj["id"] for obj in everything if is_match(obj, source)]
        assert list(store.select(source)) == expected, source  # same objects, same (insertion) order
    assert [obj["id"] for obj in store.in_pool("p1")] == [obj["id"] for obj in everything if obj["$pool"] == "p1"]


def test_a_filter_on_an_indexed_field_looks_only_at_the_matching_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore()
    for i in range(10_000):  # an XO of real size: 10,000 VBDs
        store.add(_vbd(f"b{i}", f"vm{i % 2000}", f"vdi{i}", "p"))
    looked_at: list[str] = []
    real = model.compile_filter

    def counting(source: Any) -> Any:
        predicate = real(source)
        return lambda obj: looked_at.append(obj["id"]) or predicate(obj)

    monkeypatch.setattr(model, "compile_filter", counting)
    assert list(store.select({"type": "VBD", "VDI": "vdi42"})) == ["b42"]
    assert list(store.select({"type": "VBD", "VM": "vm7"})) == [f"b{i}" for i in range(7, 10_000, 2000)]
    assert list(store.select({"type": "VBD", "id": "b9"})) == ["b9"]
    assert looked_at == ["b42", *(f"b{i}" for i in range(7, 10_000, 2000)), "b9"]
