"""DiskChanges (shared/xo/cache.py): whether XO may show a disk differently from a read taken earlier, from XO's
``all`` notifications alone, so that a job that waited re-reads only when it must."""

from __future__ import annotations

from typing import Any

from shared.xo.cache import DiskChanges

VDI = {"id": "v1", "type": "VDI", "name_label": "csi-a", "$SR": "sr1"}


def _changes(connected: list[bool], connections: list[int]) -> DiskChanges:
    return DiskChanges("csi-a", lambda: connected[0], lambda: connections[0])


def _all(kind: str, items: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "all", {"type": kind, "items": items}


def test_other_objects_change_nothing_and_the_disk_or_a_tracked_id_does() -> None:
    changes = _changes([True], [1])
    changes(*_all("enter", {"vm1": {"id": "vm1", "type": "VM"}, "v9": {**VDI, "id": "v9", "name_label": "csi-b"}}))
    changes(*_all("exit", {"vm2": 0}))
    assert not changes.changed
    changes(*_all("enter", {"v1": {**VDI, "name_description": "edited"}}))
    assert changes.changed

    renamed = _changes([True], [1])
    renamed.track(["v1"])
    renamed(*_all("enter", {"v1": {**VDI, "name_label": "renamed"}}))  # no longer carries the name: still counts
    assert renamed.changed


def test_an_exit_counts_even_when_it_came_before_the_id_was_tracked() -> None:
    changes = _changes([True], [1])
    changes(*_all("exit", {"v1": 0}))  # handled between the read's answer and track()
    assert not changes.changed
    changes.track(["v1"])
    assert changes.changed


def test_notifications_that_may_have_been_missed_count_as_a_change() -> None:
    connected, connections = [True], [1]
    changes = _changes(connected, connections)
    connected[0] = False  # the socket closed: what XO sent meanwhile is lost
    assert changes.changed
    connected[0], connections[0] = True, 2  # and another one opened since
    assert changes.changed


def test_the_callers_own_write_is_no_change_but_anything_else_on_that_object_is() -> None:
    changes = _changes([True], [1])
    changes.expect("v1", lambda obj: (obj.get("$SR"), obj.get("name_description")) == ("sr1", "marked"))
    changes(*_all("enter", {"v1": {**VDI, "name_description": "marked"}}))  # the mark the job wrote shows
    assert not changes.changed
    changes(*_all("enter", {"v1": {**VDI, "name_description": "marked", "$SR": "sr2"}}))  # then XO moved it
    assert changes.changed

    other = _changes([True], [1])
    other.track(["vbd1"])
    other.expect("v1", lambda obj: True)
    other(*_all("enter", {"vbd1": {"id": "vbd1", "type": "VBD", "attached": True}}))  # expect() covers v1 only
    assert other.changed
