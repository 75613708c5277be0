"""This worker's copy slots (``--concurrency``): a job holds one while XO copies its disk (``vdi.migrate``, or a
content stream across pools, a clone) and gives it back as soon as XO has finished. A job the worker took ahead
(``--prepare-ahead``: claimed, its disk locked and read from XO while every slot was busy) waits here for the next
free slot, so its copy starts the moment the one before ends, without a trip through RabbitMQ in between. It waits
at most ``wait_s``: then it goes back to the queue unstarted (NotStarted; the consumer puts it back with the same
attempt), so a long copy never keeps a job another worker could start now. Once the worker stops (``close``), a
job waiting here goes back the same way at once, and none starts a copy: a scale-down spends no attempt of a job that
never began.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from shared.errors import OperationPending


class NotStarted(OperationPending, code="not_started"):
    """A job found no free copy slot on this worker within ``wait_s``: back to the queue, as no attempt."""


class CopySlots:
    """``async with slots.hold(disk_name)``: one of ``count`` copy slots, waited for at most ``wait_s``."""

    def __init__(self, count: int, *, wait_s: float) -> None:
        if count < 1 or wait_s < 0:
            raise ValueError(f"CopySlots needs count >= 1 and wait_s >= 0 (got {count}, {wait_s})")
        self._free = asyncio.Semaphore(count)
        self._wait_s = wait_s
        self._closed = asyncio.Event()

    def close(self) -> None:
        """The worker stops: every job waiting for a slot, and any that asks later, raises NotStarted at once."""
        self._closed.set()

    @contextlib.asynccontextmanager
    async def hold(self, disk_name: str) -> AsyncIterator[None]:
        if not await self._acquired():
            why = "this worker stops" if self._closed.is_set() else \
                f"every copy slot of this worker stayed busy for {self._wait_s:g} s"
            raise NotStarted(f"disk {disk_name}: {why}; the job goes back to the queue for a free worker")
        try:
            yield
        finally:
            self._free.release()

    async def _acquired(self) -> bool:
        """A slot taken (True), or none within ``wait_s`` or the worker stopping (False, nothing held)."""
        if self._closed.is_set():
            return False
        if not self._free.locked():  # a free slot: taken at once, without waiting (even with wait_s 0)
            return await self._free.acquire()
        acquiring = asyncio.ensure_future(self._free.acquire())
        closing = asyncio.ensure_future(self._closed.wait())
        waited = False
        try:
            await asyncio.wait({acquiring, closing}, timeout=self._wait_s, return_when=asyncio.FIRST_COMPLETED)
            waited = True
        finally:
            closing.cancel()
            acquiring.cancel()  # no-op once it acquired
            await asyncio.wait({acquiring, closing})
            held = not acquiring.cancelled()
            if held and (not waited or self._closed.is_set()):
                self._free.release()  # we were cancelled, or the worker stops: no copy starts now
                held = False
        return held
