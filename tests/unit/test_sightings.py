"""After a migration job, the attach goes on from the disk XO's notifications showed, but only when they are as
conclusive as a lookup by name would be; otherwise it reads XO (``disk_after`` answers None)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.csi_frontend.disks import Disk
from services.csi_frontend.sightings import VdiSightings, disk_after
from shared import vdi_metadata
from shared.messages import MigrationFinished
from shared.volume_id import by_name
from shared.xo.models import Vdi

INFO = 'csi:info: {"migrating":{},"srsWithTag":"k8s"}'
MARKED = 'csi:info: {"migrating":{"inProgressToSRUUID":"sr-b"},"srsWithTag":"k8s"}'
Handler = Callable[[str, Any], None]


class FakeSession:
    def __init__(self) -> None:
        self.handlers: list[Handler] = []

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        self.handlers.append(handler)
        return lambda: self.handlers.remove(handler)

    def notify(self, items: dict[str, Any], *, exit: bool = False) -> None:
        for handler in self.handlers:
            handler("all", {"type": "exit" if exit else "enter", "items": items})


class FakeXo:
    def __init__(self) -> None:
        self.session = FakeSession()


def vdi(vdi_id: str, sr_id: str, description: str = INFO, **extra: Any) -> dict[str, Any]:
    return {"id": vdi_id, "type": "VDI", "name_label": "csi-vol1", "name_description": description, "$SR": sr_id,
            "$VBDs": [], "size": 1, **extra}


SOURCE = Disk(by_name("vol1"), Vdi.model_validate(vdi("v1", "sr-a", MARKED)), vdi_metadata.parse(MARKED))
DONE = MigrationFinished(job_id="j", disk_name="csi-vol1", outcome="succeeded", vdi_id="v2", sr_id="sr-b")


def test_the_copy_seen_unmarked_on_its_sr_with_the_source_seen_leaving_is_the_disk() -> None:
    xo = FakeXo()
    sightings = VdiSightings(xo)  # type: ignore[arg-type]
    with sightings.watching("csi-vol1", present=("v1",)) as seen:
        xo.session.notify({"v2": vdi("v2", "sr-b", MARKED, current_operations={"t": "copy"})})
        xo.session.notify({"n1": {"id": "n1", "type": "message"}, "v9": {**vdi("v9", "sr-a"), "name_label": "x"}})
        xo.session.notify({"v1": 0}, exit=True)
        xo.session.notify({"v2": vdi("v2", "sr-b")})
        disk = disk_after(SOURCE, DONE, seen)
    assert disk is not None
    assert (disk.vdi.id, disk.vdi.sr_id, disk.info) == ("v2", "sr-b", vdi_metadata.parse(INFO))
    assert sightings._watched == {} and sightings._names == {}  # nothing kept once no attach waits


@pytest.mark.parametrize(("notifications", "why"), [
    ([({"v2": vdi("v2", "sr-b")}, False)], "the source was not seen leaving"),
    ([({"v1": 0}, True), ({"v2": vdi("v2", "sr-b", MARKED)}, False)], "the copy still carries the mark"),
    ([({"v1": 0}, True), ({"v2": vdi("v2", "sr-b", current_operations={"t": "copy"})}, False)], "XO still copies"),
    ([({"v1": 0}, True), ({"v2": vdi("v2", "sr-c")}, False)], "not on the SR the job reported"),
    ([({"v1": 0}, True), ({"v2": vdi("v2", "sr-b"), "v3": vdi("v3", "sr-b")}, False)], "two VDIs carry the name"),
    ([({"v1": 0}, True)], "the copy was never seen"),
    ([({"v1": 0}, True), ({"v2": vdi("v2", "sr-b")}, False), ({"v2": 0}, True)], "the copy left the cache"),
])
def test_anything_less_conclusive_than_a_lookup_reads_xo(notifications: list[tuple[dict[str, Any], bool]],
                                                          why: str) -> None:
    xo = FakeXo()
    sightings = VdiSightings(xo)  # type: ignore[arg-type]
    with sightings.watching("csi-vol1", present=("v1",)) as seen:
        for items, gone in notifications:
            xo.session.notify(items, exit=gone)
        assert disk_after(SOURCE, DONE, seen) is None, why


def test_a_copy_renamed_away_no_longer_counts() -> None:
    xo = FakeXo()
    sightings = VdiSightings(xo)  # type: ignore[arg-type]
    with sightings.watching("csi-vol1", present=("v1",)) as seen:
        xo.session.notify({"v1": 0}, exit=True)
        xo.session.notify({"v2": vdi("v2", "sr-b"), "v3": vdi("v3", "sr-b")})
        xo.session.notify({"v3": {**vdi("v3", "sr-b"), "name_label": "other"}})
        disk = disk_after(SOURCE, DONE, seen)
    assert disk is not None and disk.vdi.id == "v2"
    assert len(xo.session.handlers) == 1  # one subscription for every waiting attach
