"""One operation at a time per volume in this controller: the one lock that CreateVolume, DeleteVolume,
ControllerPublish/Unpublish, ControllerExpandVolume and the temporary-disk cleanup take (issue 10 item 1).

The CSI spec lets a CO send overlapping calls for one volume (an attacher retry while the first call still runs,
several waiters of one migration job, calls after a CO restart) and lets the plugin answer ABORTED. Here a second
call for a volume waits for the first, at most until its own deadline minus ``margin_s``, then answers
OperationPending (ABORTED: "another operation on volume X is in progress"), which the sidecars retry.

The lock is in-process (an ``asyncio.Lock`` per key, dropped when nobody holds or waits for it). Across controller
replicas (a leader handover) XO's state decides: the attacher re-reads before it attaches and after XO refuses a
second plug (services/csi_frontend/attach.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from shared import volume_id as vid
from shared.errors import OperationPending
from shared.keyed_locks import KeyedLocks


def key_of(volume: vid.VolumeId, prefix: str) -> str:
    """The lock key of a volume: its disk name when it is known by name (what CreateVolume and the temporary-disk
    cleanup lock), else its VDI UUID."""
    return volume.disk_name(prefix) if volume.kind == vid.NAME_KIND else volume.value


class VolumeLocks:
    """Per-volume in-process locks keyed by disk name or VDI UUID (``key_of``)."""

    def __init__(self, *, margin_s: float = 2.0) -> None:
        self._margin_s = margin_s
        self._locks = KeyedLocks()

    def busy(self, key: str) -> bool:
        """Whether an operation holds the key now."""
        return self._locks.locked(key)

    def hold_volume(self, volume_id: vid.VolumeId, prefix: str, *,
                    deadline_s: float | None) -> contextlib.AbstractAsyncContextManager[None]:
        """``hold`` of the volume's key (``key_of``), naming the volume in the ABORTED answer."""
        return self.hold(key_of(volume_id, prefix), deadline_s=deadline_s, volume=str(volume_id))

    @contextlib.asynccontextmanager
    async def hold(self, key: str, *, deadline_s: float | None, volume: str | None = None) -> AsyncIterator[None]:
        """Hold ``key`` for the block. ``deadline_s``: seconds left to the caller (None: wait as long as it takes);
        a waiter gives up ``margin_s`` before it with OperationPending naming ``volume`` (default: the key)."""
        wait_s = None if deadline_s is None else max(deadline_s - self._margin_s, 0.0)

        def pending() -> OperationPending:
            return OperationPending(f"another operation on volume {volume or key} is in progress; "
                                    "retry once it has finished")

        async with self._locks.hold(key, timeout_s=wait_s, on_timeout=pending):
            yield
