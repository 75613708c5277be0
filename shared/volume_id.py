"""Volume ids (handles) and disk names, exactly as the Go driver m4rCsi writes them (pure; no I/O).

Written by CreateVolume (the m4rCsi rule, ``handle_kind``):

- ``name:<volume name>``: volumes that migrate (their VDI UUID changes on every migration, the name does not)
  and volumes on a local SR (XO may move them with their VM). The disk (VDI name_label) is
  ``<prefix><volume name>``.
- the bare VDI UUID: fixed volumes on a shared SR (and static volumes a user declares).

Read: those two, and ``uuid:<vdi uuid>``, which earlier versions of this driver wrote for every fixed volume
(m4rCsi cannot read it: it takes the whole string for a VDI UUID). A parsed id keeps its form, so the id an
answer carries is the one the caller sent. docs/deploy.md has the table of which driver reads which handle.

An id of any other form was not made by this driver, so it names no volume: ``parse`` answers VolumeNotFound
(CSI "Volume does not exist"; csi-sanity sends such ids and expects NOT_FOUND), and only an empty or
oversized id is a malformed request.

Long names (``volume_name_for_id``): a CO may name a volume with up to 128 bytes, but ``name:<name>`` must fit
the same 128 bytes (CSI: volume_id at most 128 bytes). A migrating volume whose name is longer than 123 bytes
is known by the name ``<its first 102 bytes>-<the first 20 hex digits of the SHA-256 of the whole name>``
(exactly 123 bytes): its id is ``name:`` and that, its disk ``<prefix>`` and that. The rule depends only on the
name, so a retried CreateVolume finds the same disk; names of 123 bytes or less are used as they are.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final, Literal

from shared.errors import InvalidRequest, VolumeNotFound

MAX_ID_BYTES = 128
NAME_KIND: Final = "name"
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class VolumeId:
    """A parsed volume id: by disk name or by VDI UUID (``bare``: without the ``uuid:`` prefix, m4rCsi's form)."""

    kind: Literal["name", "uuid"]
    value: str
    bare: bool = False

    def __str__(self) -> str:
        return self.value if self.bare else f"{self.kind}:{self.value}"

    def disk_name(self, prefix: str) -> str:
        if self.kind != "name":
            raise ValueError("only name-based volume ids have a disk name")
        return disk_name(prefix, self.value)


def by_name(volume_name: str) -> VolumeId:
    return VolumeId(NAME_KIND, volume_name)


def by_uuid(vdi_uuid: str, *, bare: bool = False) -> VolumeId:
    """By VDI UUID: ``uuid:<UUID>`` (earlier versions of this driver), or with ``bare`` the UUID alone (m4rCsi)."""
    return VolumeId("uuid", vdi_uuid.lower(), bare)


def by_vdi(vdi_uuid: str) -> VolumeId:
    """The handle m4rCsi and this driver write for a fixed volume on a shared SR: the bare VDI UUID."""
    return by_uuid(vdi_uuid, bare=True)


def named_by_disk(*, migrating: bool, shared_sr: bool) -> bool:
    """m4rCsi's rule (sr_selection.go ``VolumeIDType``): a volume is known by its disk name when it migrates or
    lives on a local SR, by its VDI UUID only when it is fixed on a shared SR."""
    return migrating or not shared_sr


def is_uuid(value: str) -> bool:
    return bool(_UUID_RE.match(value))


def parse(volume_id: str, field: str = "volume_id") -> VolumeId:
    """Parse a volume id.

    InvalidRequest naming ``field`` when it is empty or longer than 128 bytes (CSI size limit); VolumeNotFound
    when it is not of a form this driver makes: no volume of ours can have it. Callers for which a missing
    volume is success (DeleteVolume, ControllerUnpublishVolume) catch VolumeNotFound.
    """
    if not volume_id:
        raise InvalidRequest(f"{field} is required; pass the id CreateVolume returned")
    if len(volume_id.encode()) > MAX_ID_BYTES:
        raise InvalidRequest(f"{field} is longer than {MAX_ID_BYTES} bytes; pass the id CreateVolume returned")
    parsed = _parse_form(volume_id)
    if parsed is None:
        raise VolumeNotFound(
            f"{field} {volume_id!r} names no volume of this driver: its ids are 'name:<volume name>', "
            "a bare VDI UUID or 'uuid:<VDI UUID>'; pass the id CreateVolume returned"
        )
    return parsed


def _parse_form(volume_id: str) -> VolumeId | None:
    kind, sep, value = volume_id.partition(":")
    if sep and kind == "name" and is_volume_name(value):
        return by_name(value)
    if sep and kind == "uuid" and is_uuid(value):
        return by_uuid(value)
    if not sep and is_uuid(volume_id):
        return by_vdi(volume_id)
    return None


def listed_handles(volume_name: str, vdi_id: str, *, migrating: bool, shared_sr: bool,
                   written: str | None, class_recorded: bool) -> list[str]:
    """The handle(s) a PV of this driver disk may carry, which ListVolumes reports: external-attacher reconciles
    each VolumeAttachment by looking its PV's handle up in ListVolumes, and re-processes it every period when the
    listed handle differs.

    ``written``: the form CreateVolume recorded in the disk's csi:info (``name``/``vdi``, this version on). Without
    it: m4rCsi's disks (no class recorded) carry m4rCsi's rule; earlier versions of this driver wrote
    ``uuid:<VDI>`` for fixed volumes, which cannot be told from a disk of this version that lost its record, so
    both forms are listed.
    """
    by_rule = str(by_name(volume_name)) if named_by_disk(migrating=migrating, shared_sr=shared_sr) \
        else str(by_vdi(vdi_id))
    if written == HANDLE_NAME:
        return [str(by_name(volume_name))]
    if written == HANDLE_VDI:
        return [str(by_vdi(vdi_id))]
    if migrating or not class_recorded:
        return [by_rule]
    return sorted({str(by_uuid(vdi_id)), by_rule})


HANDLE_NAME = "name"  # csi:info "handle": the volume is name:<volume name>
HANDLE_VDI = "vdi"  # csi:info "handle": the volume is the bare VDI UUID


def is_volume_name(name: str) -> bool:
    """Could CreateVolume have accepted ``name``? (see validate_volume_name)"""
    return bool(name) and len(name.encode()) <= MAX_ID_BYTES and bool(_NAME_RE.match(name))


def validate_volume_name(name: str, field: str = "name") -> None:
    """Names become VDI name labels: letters, digits, '.', '_' and '-', at most 128 bytes."""
    if not name:
        raise InvalidRequest(f"{field} is required")
    if len(name.encode()) > MAX_ID_BYTES:
        raise InvalidRequest(f"{field} is longer than {MAX_ID_BYTES} bytes")
    if not _NAME_RE.match(name):
        raise InvalidRequest(
            f"{field} {name!r} may only hold letters, digits, '.', '_' and '-', starting with a letter or digit"
        )


NAME_ROOM_BYTES = MAX_ID_BYTES - len(f"{NAME_KIND}:")  # 123: the longest name kept as it is in an id
_HASH_HEX = 20  # 80 bits of SHA-256: a collision between two long names is not a practical concern


def volume_name_for_id(name: str) -> str:
    """The name a volume known by name goes by: ``name`` itself when ``name:<name>`` fits 128 bytes, else its
    first 102 bytes, ``-`` and 20 hex digits of the SHA-256 of the whole name (123 bytes; see the module doc).
    ``name`` is a valid volume name (``validate_volume_name``), so ASCII."""
    if len(name.encode()) <= NAME_ROOM_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_HEX]
    return f"{name[:NAME_ROOM_BYTES - _HASH_HEX - 1]}-{digest}"


def disk_name(prefix: str, volume_name: str) -> str:
    """The VDI name_label of a volume: ``csi-pvc-...``."""
    return f"{prefix}{volume_name}"


def temp_disk_name(prefix: str, volume_name: str) -> str:
    """The name a disk carries while CreateVolume runs (m4rCsi: ``csi-temp-<volume name>``)."""
    return f"{prefix}temp-{volume_name}"


def volume_name_of_disk(prefix: str, name_label: str) -> str | None:
    """The volume name of a driver-made disk, or None for foreign and temporary disks."""
    if not name_label.startswith(prefix) or name_label.startswith(f"{prefix}temp-"):
        return None
    return name_label[len(prefix):] or None
