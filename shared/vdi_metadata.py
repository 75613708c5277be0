"""The ``csi:info: {...}`` metadata kept in a VDI's name_description, as the Go driver m4rCsi writes it.

``{"srsWithTag": "<tag>", "migrating": {"inProgressToSRUUID": "<sr>"}}``: ``migrating`` present means the
volume may migrate; the in-progress mark is set while a migration runs. m4rCsi versions that wrote
``toSRUUID`` are read too. The description survives VDI.copy (name_label and name_description do).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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

    def to_description(self) -> str:
        body: dict[str, Any] = {}
        if self.migrating:
            body["migrating"] = {"inProgressToSRUUID": self.in_progress_to_sr} if self.in_progress_to_sr else {}
        if self.srs_with_tag is not None:
            body["srsWithTag"] = self.srs_with_tag
        if self.sr_uuid is not None:
            body["srUUID"] = self.sr_uuid
        return PREFIX + json.dumps(body, separators=(",", ":"))

    def marked(self, sr_id: str | None) -> StorageInfo:
        """A copy with the in-progress migration mark set to ``sr_id`` (None clears it)."""
        return StorageInfo(self.srs_with_tag, self.sr_uuid, self.migrating, sr_id)


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
    tag = body.get("srsWithTag")
    sr_uuid = body.get("srUUID")
    return StorageInfo(
        srs_with_tag=tag if isinstance(tag, str) else None,
        sr_uuid=sr_uuid if isinstance(sr_uuid, str) else None,
        migrating=isinstance(migrating, dict),
        in_progress_to_sr=mark,
    )
