"""The name and description a disk carries while a content transfer fills it (cross-pool move or clone; pure).

While it is filled the target VDI is named ``<disk name>~incoming``: no volume name holds ``~`` (volume_id.py),
so no lookup of a volume, ListVolumes or --temp-cleanup (``<prefix>temp-*``) ever takes it for a volume or a
leak. Its description is a transfer mark instead of ``csi:info``::

    csi:transfer: {"state":"copying","kind":"move","from":"<source VDI uuid>","job":"<job id>","info":"csi:info: {...}"}

``state`` is ``copying`` until the stream completed, then ``complete``; ``kind`` is ``move`` (the source is deleted
once the target carries the disk's name) or ``clone`` (the source stays); ``info`` is the ``csi:info`` the target
gets when it becomes the volume's disk. A VDI carrying a transfer mark is never usable as a volume: only its
final ``csi:info`` makes it one (services/csi_frontend/disks.py). The state machine: docs/migrations.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Literal

from shared.vdi_metadata import prefixed_object

PREFIX = "csi:transfer: "
INCOMING_SUFFIX = "~incoming"
State = Literal["copying", "complete"]
Kind = Literal["move", "clone"]
_STATES: tuple[State, ...] = ("copying", "complete")
_KINDS: tuple[Kind, ...] = ("move", "clone")
# What a clone of an attached volume answers (XO cannot export a VDI a VM has plugged).
DETACH_TO_CLONE = "detach the source volume (or stop its pod) to clone it"


def incoming_name(disk_name: str) -> str:
    """The name of the VDI being filled for disk ``disk_name``."""
    return f"{disk_name}{INCOMING_SUFFIX}"


@dataclass(frozen=True)
class TransferMark:
    """What a target's description says: filled from VDI ``source`` by job ``job``; ``info`` once it is done."""

    state: State
    kind: Kind
    source: str
    job: str
    info: str

    @property
    def complete(self) -> bool:
        """The stream into the target completed: the target holds the whole content."""
        return self.state == "complete"

    def completed(self) -> TransferMark:
        return replace(self, state="complete")

    def to_description(self) -> str:
        body = {"state": self.state, "kind": self.kind, "from": self.source, "job": self.job, "info": self.info}
        return PREFIX + json.dumps(body, separators=(",", ":"))


def parse(description: str) -> TransferMark | None:
    """The transfer mark in ``description``, or None when it holds none (or an unreadable one)."""
    body = prefixed_object(description, PREFIX)
    if body is None:
        return None
    state, kind = body.get("state"), body.get("kind")
    fields = [body.get(key) for key in ("from", "job", "info")]
    if state not in _STATES or kind not in _KINDS or not all(isinstance(f, str) for f in fields):
        return None
    source, job, info = (str(f) for f in fields)
    return TransferMark(state, kind, source, job, info)


def is_marked(description: str) -> bool:
    """Whether ``description`` starts like a transfer mark (readable or not): such a VDI is never a volume."""
    return description.startswith(PREFIX)
