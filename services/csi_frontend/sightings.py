"""VdiSightings: the VDIs carrying a disk's name as XO's ``all`` notifications show them while an attach waits for
the disk's migration, so that the attach goes on from what XO sent instead of reading the disk again.

One subscription to the frontend's XO session (made at the first use), whatever the number of waiting attaches:
a notification item costs a dict lookup unless it is a VDI named after a watched disk, or the id of one seen
before (it left the cache: ``exit`` items carry ``0``, not the object; or it was renamed). ``disk_after`` accepts
what was seen only when it is as conclusive as a lookup by name (one VDI, idle, unmarked, on the SR the job
reported, the source seen leaving); anything else is None, and the caller reads XO as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import ValidationError

from services.csi_frontend.disks import Disk
from shared import transfer_marks, vdi_metadata
from shared.messages import MigrationFinished
from shared.xo.cache import changed_objects
from shared.xo.client import XoClient
from shared.xo.models import Vdi

Obj = dict[str, Any]


class VdiSightings:
    """``with sightings.watching(name) as seen`` records, from then on, the latest object of every VDI named
    ``name`` (None once it left the cache or lost the name)."""

    def __init__(self, xo: XoClient) -> None:
        self._xo = xo
        self._subscribed = False
        self._watched: dict[str, dict[str, Obj | None]] = {}  # disk name -> VDI id -> latest object (None: gone)
        self._users: dict[str, int] = {}
        self._names: dict[str, str] = {}  # VDI id -> the watched name it carried

    @contextlib.contextmanager
    def watching(self, name: str, *, present: Iterable[str] = ()) -> Iterator[dict[str, Obj | None]]:
        """``present``: ids of VDIs known to carry the name now (just read), so that their leaving counts."""
        if not self._subscribed:
            self._xo.session.subscribe(self._on_notification)
            self._subscribed = True
        seen = self._watched.setdefault(name, {})
        for vdi_id in present:
            seen.setdefault(vdi_id, {})  # present, its object not seen yet
            self._names[vdi_id] = name
        self._users[name] = self._users.get(name, 0) + 1
        try:
            yield seen
        finally:
            self._users[name] -= 1
            if not self._users[name]:
                del self._users[name]
                for vdi_id in self._watched.pop(name, {}):
                    self._names.pop(vdi_id, None)

    def _on_notification(self, method: str, params: Any) -> None:
        if not self._watched:
            return
        for obj_id, obj in changed_objects(method, params):
            name = obj.get("name_label") if obj is not None and obj.get("type") == "VDI" else None
            if name in self._watched:
                self._watched[name][obj_id] = obj
                self._names[obj_id] = name
            elif (known := self._names.pop(obj_id, None)) is not None and known in self._watched:
                self._watched[known][obj_id] = None  # left the cache, or renamed away


def disk_after(disk: Disk, result: MigrationFinished, seen: dict[str, Obj | None]) -> Disk | None:
    """The volume's disk after job ``result``, from the VDIs seen named after it: the one VDI the job reported, on
    the SR it reported, with no operation and no mark, every other VDI seen (the source included) gone; None
    when the notifications do not show that much (the caller reads XO)."""
    if disk.volume_id.kind != "name" or not result.vdi_id:
        return None
    obj = seen.get(result.vdi_id) or None
    others_gone = all(o is None for vdi_id, o in seen.items() if vdi_id != result.vdi_id)
    source_gone = disk.vdi.id == result.vdi_id or (disk.vdi.id in seen and seen[disk.vdi.id] is None)
    if obj is None or not others_gone or not source_gone:
        return None
    try:
        vdi = Vdi.model_validate(obj)
    except ValidationError:
        return None
    info = vdi_metadata.parse(vdi.name_description)
    if (vdi.sr_id != result.sr_id or vdi.current_operations or transfer_marks.is_marked(vdi.name_description)
            or (info is not None and info.in_progress_to_sr)):
        return None
    return Disk(disk.volume_id, vdi, info)
