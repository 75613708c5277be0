"""--temp-cleanup: delete ``<prefix>temp-*`` disks that a crashed or timed-out CreateVolume left behind.

Like m4rCsi: a scan marks an unattached temporary disk with ``csi:deletion-candidate: {"unusedSince": ...}``
and a later scan deletes it once the mark is older than ``delete_after_s``. CreateVolume reusing the
disk overwrites the description, which removes the mark.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from shared.errors import DomainError
from shared.logging import get_logger
from shared.xo.client import XoClient

log = get_logger(__name__)
MARK_PREFIX = "csi:deletion-candidate: "


def _marked_since(description: str) -> datetime | None:
    if not description.startswith(MARK_PREFIX):
        return None
    try:
        since = json.loads(description[len(MARK_PREFIX):]).get("unusedSince")
        return datetime.fromisoformat(since.replace("Z", "+00:00"))
    except (ValueError, AttributeError, TypeError):
        return None


async def sweep(xo: XoClient, prefix: str, delete_after_s: float, now: datetime | None = None) -> list[str]:
    """One pass; returns the ids of the disks deleted."""
    now = now or datetime.now(UTC)
    temp_prefix = f"{prefix}temp-"
    deleted: list[str] = []
    for vdi in await xo.find_vdis():
        if not vdi.name_label.startswith(temp_prefix) or vdi.vbd_ids:
            continue
        since = _marked_since(vdi.name_description)
        if since is None:
            stamp = now.isoformat().replace("+00:00", "Z")
            await xo.set_vdi(vdi.id, name_description=MARK_PREFIX + json.dumps({"unusedSince": stamp}))
            log.info("temp_disk_marked", vdi=vdi.id, disk_name=vdi.name_label)
        elif (now - since).total_seconds() >= delete_after_s:
            await xo.delete_vdi(vdi.id)
            deleted.append(vdi.id)
            log.info("temp_disk_deleted", vdi=vdi.id, disk_name=vdi.name_label)
    return deleted


async def run_forever(xo: XoClient, prefix: str, *, interval_s: float, delete_after_s: float) -> None:
    """Sweep every ``interval_s`` until cancelled; XO errors are logged and retried next round."""
    while True:
        try:
            await sweep(xo, prefix, delete_after_s)
        except DomainError as exc:
            log.warning("temp_cleanup_failed", error=exc.message)
        await asyncio.sleep(interval_s)
