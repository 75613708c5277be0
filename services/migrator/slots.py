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
from collections import deque
from collections.abc import AsyncIterator

from shared.errors import OperationPending


class NotStarted(OperationPending, code="not_started"):
    """A job found no free copy slot on this worker within ``wait_s``: back to the queue, as no attempt."""


class CopySlots:
    """``async with slots.hold(disk_name)``: one of ``count`` copy slots, waited for at most ``wait_s``.

    A slot given back passes straight to the job that has waited longest (FIFO): its wait ends with the slot in
    hand, one step of the event loop after the release, with no second try in between (a busy loop, digesting XO's
    notifications, makes each step cost)."""

    def __init__(self, count: int, *, wait_s: float) -> None:
        if count < 1 or wait_s < 0:
            raise ValueError(f"CopySlots needs count >= 1 and wait_s >= 0 (got {count}, {wait_s})")
        self._free = count
        self._waiters: deque[asyncio.Future[bool]] = deque()  # True: handed a slot; False: the worker stops
        self._wait_s = wait_s
        self._closed = False

    def close(self) -> None:
        """The worker stops: every job waiting for a slot, and any that asks later, raises NotStarted at once."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)

    @contextlib.asynccontextmanager
    async def hold(self, disk_name: str) -> AsyncIterator[None]:
        if not await self._acquired():
            why = "this worker stops" if self._closed else \
                f"every copy slot of this worker stayed busy for {self._wait_s:g} s"
            raise NotStarted(f"disk {disk_name}: {why}; the job goes back to the queue for a free worker")
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # else its wait ended meanwhile (timed out, cancelled)
                waiter.set_result(True)
                return
        self._free += 1

    async def _acquired(self) -> bool:
        """A slot taken (True), or none within ``wait_s`` or the worker stopping (False, nothing held)."""
        if self._closed:
            return False
        if self._free:  # a free slot: taken at once, without waiting (even with wait_s 0)
            self._free -= 1
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._wait_s):
                handed = await waiter  # a cancellation (the timeout's too) cancels the waiter unless already handed
        except TimeoutError:
            handed = _handed(waiter)  # handed over in the very step its wait ran out: kept
        except asyncio.CancelledError:
            if _handed(waiter):
                self._release()  # handed over, but the job is cancelled: the next waiter has it
            raise
        if handed and self._closed:
            self._release()  # the worker stops: no copy starts now
            return False
        return handed


def _handed(waiter: asyncio.Future[bool]) -> bool:
    return waiter.done() and not waiter.cancelled() and waiter.result()
