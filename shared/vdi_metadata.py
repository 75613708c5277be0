"""The ``csi:info: {...}`` metadata kept in a VDI's name_description, as the Go driver m4rCsi writes it.

``{"srsWithTag": "<tag>", "migrating": {"enabled": true, "inProgressToSRUUID": "<sr>"}}``: ``migrating`` present
means the volume may migrate (m4rCsi writes ``enabled: true``, and so do we); the in-progress mark is set while a
migration runs. m4rCsi versions that wrote ``toSRUUID`` are read too. ``srUUID``, ``handle`` (the handle form
CreateVolume returned) and ``sourceVolume`` (the volume a clone was made from) are this driver's additions; m4rCsi
decodes the JSON with Go's encoding/json, which skips keys it does not know. The description survives VDI.copy
(name_label and name_description do). ``with_mark`` sets or clears the mark in a description and keeps every other
field as it was (no field another version wrote is lost).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

PREFIX = "csi:info: "
_MARK_KEYS = ("inProgressToSRUUID", "toSRUUID")


@dataclass(frozen=True)
class StorageInfo:
    """What the description says about the volume."""

    srs_with_tag: str | None = None
    sr_uuid: str | None = None
    migrating: bool = False
    in_progress_to_sr: str | None = None
    handle: str | None = None  # the handle form CreateVolume returned (shared/volume_id.py HANDLE_*); this version on
    source_volume: str | None = None  # a clone's volume_content_source.volume.volume_id, as the CO gave it

    def to_description(self) -> str:
        body: dict[str, Any] = {}
        if self.migrating:
            body["migrating"] = {"enabled": True}
            if self.in_progress_to_sr:
                body["migrating"]["inProgressToSRUUID"] = self.in_progress_to_sr
        optional = {"srsWithTag": self.srs_with_tag, "srUUID": self.sr_uuid, "handle": self.handle,
                    "sourceVolume": self.source_volume}
        body.update({key: value for key, value in optional.items() if value is not None})
        return PREFIX + json.dumps(body, separators=(",", ":"))

    def marked(self, sr_id: str | None) -> StorageInfo:
        """A copy with the in-progress migration mark set to ``sr_id`` (None clears it)."""
        return replace(self, in_progress_to_sr=sr_id)


def prefixed_object(description: str, prefix: str) -> dict[str, Any] | None:
    """The JSON object after ``prefix`` in ``description`` (``csi:info: {...}``), None when there is none."""
    if not description.startswith(prefix):
        return None
    try:
        body = json.loads(description[len(prefix):])
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def parse(description: str) -> StorageInfo | None:
    """The StorageInfo in ``description``, or None when it holds no (readable) csi:info."""
    body = prefixed_object(description, PREFIX)
    if body is None:
        return None
    migrating = body.get("migrating")
    mark = None
    if isinstance(migrating, dict):
        mark = next((migrating[k] for k in _MARK_KEYS if isinstance(migrating.get(k), str) and migrating[k]), None)
    tag, sr_uuid, handle, source = (body.get(key) for key in ("srsWithTag", "srUUID", "handle", "sourceVolume"))
    return StorageInfo(
        srs_with_tag=tag if isinstance(tag, str) else None,
        sr_uuid=sr_uuid if isinstance(sr_uuid, str) else None,
        migrating=isinstance(migrating, dict),
        in_progress_to_sr=mark,
        handle=handle if isinstance(handle, str) else None,
        source_volume=source if isinstance(source, str) and source else None,
    )


def with_mark(description: str, sr_id: str | None) -> str | None:
    """``description`` with the in-progress migration mark set to ``sr_id`` (None: cleared), every other field
    kept as written; None when it holds no readable csi:info of a migrating volume."""
    body = prefixed_object(description, PREFIX)
    migrating = body.get("migrating") if body is not None else None
    if body is None or not isinstance(migrating, dict):
        return None
    for key in _MARK_KEYS:
        migrating.pop(key, None)
    if sr_id is not None:
        migrating["inProgressToSRUUID"] = sr_id
    return PREFIX + json.dumps(body, separators=(",", ":"))


def remarked(description: str, sr_id: str | None, info: StorageInfo) -> str:
    """``with_mark(description, sr_id)``, or ``info`` with that mark written afresh when ``description`` holds no
    readable csi:info of a migrating volume."""
    return with_mark(description, sr_id) or info.marked(sr_id).to_description()
