"""One operation at a time per volume in this controller: the one lock that CreateVolume, DeleteVolume,
ControllerPublish/Unpublish, ControllerExpandVolume and the temporary-disk cleanup take (issue 10 item 1).

The CSI spec lets a CO send overlapping calls for one volume (an attacher retry while the first call still runs,
several waiters of one migration job, calls after a CO restart) and lets the plugin answer ABORTED. Here a second
call for a volume waits for the first, at most until its own deadline minus ``margin_s``, then answers
OperationPending (ABORTED: "another operation on volume X is in progress"), which the sidecars retry.

The lock is in-process (an ``asyncio.Lock`` per key, dropped when nobody holds or waits for it). Across controller
replicas (a leader handover) XO's state decides: the attacher re-reads before it attaches and after XO refuses a
second plug (services/csi_frontend/attach.py).

An operation outlives its caller (``run``): a call cut by its deadline answers DEADLINE_EXCEEDED, but what it
started goes on to its end, holding the lock, because XO goes on too. XO carries out a call whose client gave up
(``vm.attachDisk`` creates and plugs the VBD, ``vbd.delete`` unplugs and destroys it), so an operation cancelled
in the middle of one would release the lock while XO still changes the volume: the attacher's next call
(ControllerUnpublishVolume after a publish that timed out) would find no VBD yet, answer OK, and XO would plug
the disk a moment later, attached to a node no VolumeAttachment names. With the lock kept to the operation's end,
that next call waits for it and reads what XO did. The operation's own waits are bounded by the caller's deadline
(``deadline_s``), so it ends about when the call would have.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from shared import volume_id as vid
from shared.errors import OperationPending
from shared.keyed_locks import KeyedLocks
from shared.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")
_OUTLIVING: set[asyncio.Task[Any]] = set()  # operations whose caller gave up: kept referenced until they end


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

    async def run_volume(self, volume_id: vid.VolumeId, prefix: str, operation: Callable[[], Awaitable[T]], *,
                         deadline_s: float | None) -> T:
        """``run`` under the volume's key (``key_of``), naming the volume in the ABORTED answer."""
        return await self.run(key_of(volume_id, prefix), operation, deadline_s=deadline_s, volume=str(volume_id))

    async def run(self, key: str, operation: Callable[[], Awaitable[T]], *, deadline_s: float | None,
                  volume: str | None = None) -> T:
        """``operation()`` under ``hold(key)``, in a task of its own that a caller cancelled once it began leaves
        running to its end, lock held (module doc); one cancelled while it waits for the lock is cancelled with it.
        The result or error is the caller's when the caller is still there."""
        started = False

        async def locked() -> T:
            nonlocal started
            async with self.hold(key, deadline_s=deadline_s, volume=volume):
                started = True
                return await operation()

        task = asyncio.ensure_future(locked())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not started:
                task.cancel()  # still waiting for the lock: nothing begun, nothing to carry on
            elif not task.done():
                log.info("volume_operation_outlives_its_call", key=key)
                _OUTLIVING.add(task)
                task.add_done_callback(_ended)
            raise

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


def _ended(task: asyncio.Task[Any]) -> None:
    """An operation whose caller gave up has ended: logged (nobody else reads its outcome), then dropped."""
    _OUTLIVING.discard(task)
    if task.cancelled():
        return
    error = task.exception()
    if error is None:
        log.info("volume_operation_ended_after_its_call", outcome="ok")
    else:
        log.info("volume_operation_ended_after_its_call", outcome="failed", error=str(error) or type(error).__name__)
