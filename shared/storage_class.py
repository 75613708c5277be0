"""StorageClass parameters, exactly as the Go driver m4rCsi accepts them (pure).

``srUUID`` | ``srsWithTag``, ``migrating`` ("true"/"false"), ``csi.storage.k8s.io/fstype``. Keys under
``csi.storage.k8s.io/`` that the sidecars add are ignored; any other unknown key is an error, so a typo
in a StorageClass is reported instead of silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import InvalidRequest

SR_UUID = "srUUID"
SRS_WITH_TAG = "srsWithTag"
MIGRATING = "migrating"
FS_TYPE = "csi.storage.k8s.io/fstype"
FS_TYPES = ("ext4", "ext3", "xfs")
_SIDECAR_PREFIX = "csi.storage.k8s.io/"
_KNOWN = {SR_UUID, SRS_WITH_TAG, MIGRATING, FS_TYPE}


@dataclass(frozen=True)
class StorageParams:
    """Validated StorageClass parameters."""

    sr_uuid: str | None
    srs_with_tag: str | None
    migrating: bool
    fs_type: str | None

    def context(self) -> dict[str, str]:
        """Volume context entries describing where the volume may live."""
        ctx = {MIGRATING: "true" if self.migrating else "false"}
        if self.sr_uuid:
            ctx[SR_UUID] = self.sr_uuid
        if self.srs_with_tag:
            ctx[SRS_WITH_TAG] = self.srs_with_tag
        return ctx


def parse(parameters: Mapping[str, str]) -> StorageParams:
    """Validate parameters; InvalidRequest names the parameter and the fix."""
    unknown = sorted(k for k in parameters if k not in _KNOWN and not k.startswith(_SIDECAR_PREFIX))
    if unknown:
        raise InvalidRequest(
            f"unknown StorageClass parameter(s) {', '.join(unknown)}: accepted are srUUID, srsWithTag, "
            f"migrating and {FS_TYPE}"
        )
    sr_uuid = parameters.get(SR_UUID) or None
    tag = parameters.get(SRS_WITH_TAG) or None
    migrating = _parse_bool(parameters.get(MIGRATING, "false"))
    if sr_uuid and tag:
        raise InvalidRequest("parameters srUUID and srsWithTag are mutually exclusive: set only one")
    if sr_uuid and migrating:
        raise InvalidRequest(
            "parameter migrating needs srsWithTag: a volume on one fixed srUUID cannot migrate; "
            "tag the SRs in XO and use srsWithTag"
        )
    if not sr_uuid and not tag:
        raise InvalidRequest("set parameter srUUID (one SR) or srsWithTag (every SR carrying that XO tag)")
    fs_type = parameters.get(FS_TYPE) or None
    if fs_type is not None and fs_type not in FS_TYPES:
        raise InvalidRequest(f"parameter {FS_TYPE}={fs_type!r} is not supported: use one of {', '.join(FS_TYPES)}")
    return StorageParams(sr_uuid, tag, migrating, fs_type)


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise InvalidRequest(f'parameter migrating={value!r} must be "true" or "false"')
