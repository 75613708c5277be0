"""The per-volume lock of the controller: one holder per key, waiters queue until their deadline minus the margin,
then ABORTED naming the volume; nothing is kept for a key nobody holds or waits for."""

from __future__ import annotations

import asyncio

import pytest

from services.csi_frontend.volume_locks import VolumeLocks, key_of
from shared import volume_id as vid
from shared.errors import OperationPending


def test_the_key_is_the_disk_name_or_the_vdi_uuid() -> None:
    assert key_of(vid.by_name("pvc-1"), "csi-") == "csi-pvc-1"
    assert key_of(vid.parse("0B7E7F52-0A53-4C8F-9F3B-0A4E8B0E6D1A"), "csi-") == "0b7e7f52-0a53-4c8f-9f3b-0a4e8b0e6d1a"
    assert key_of(vid.parse("uuid:0b7e7f52-0a53-4c8f-9f3b-0a4e8b0e6d1a"), "csi-") == (
        "0b7e7f52-0a53-4c8f-9f3b-0a4e8b0e6d1a")


async def test_waiters_run_one_at_a_time_in_arrival_order() -> None:
    locks, order = VolumeLocks(margin_s=0), []
    holding, release = asyncio.Event(), asyncio.Event()

    async def call(n: int) -> None:
        async with locks.hold("csi-pvc-1", deadline_s=30, volume="name:pvc-1"):
            order.append(n)
            if n == 0:
                holding.set()
                await release.wait()

    tasks = [asyncio.create_task(call(n)) for n in range(4)]
    await holding.wait()  # the others started after the first and wait for the lock by now
    assert order == [0] and locks.busy("csi-pvc-1")
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3] and not locks.busy("csi-pvc-1")
    assert len(locks._locks) == 0  # noqa: SLF001 - nothing kept once nobody holds or waits


async def test_a_waiter_gives_up_before_its_deadline_with_aborted_naming_the_volume() -> None:
    locks = VolumeLocks(margin_s=1.0)
    async with locks.hold("csi-pvc-1", deadline_s=None):
        with pytest.raises(OperationPending, match="another operation on volume name:pvc-1 is in progress"):
            async with locks.hold("csi-pvc-1", deadline_s=1.05, volume="name:pvc-1"):
                raise AssertionError("must not get the lock")
        async with locks.hold("csi-pvc-2", deadline_s=1.0):  # another volume: not blocked
            pass
    async with locks.hold("csi-pvc-1", deadline_s=1.0):  # free again: no wait at all, even with no time left
        pass


async def test_an_operation_begun_runs_to_its_end_when_its_caller_gives_up_and_one_still_waiting_does_not() -> None:
    """``run``: the caller cut at its deadline while its operation runs leaves it running, lock held, so the next
    call on the volume comes after it (XO would carry out the call anyway); a caller cut while it still waited for
    the lock takes its operation with it: nothing had begun."""
    locks, done = VolumeLocks(margin_s=0), []
    began, finish = asyncio.Event(), asyncio.Event()

    async def attach() -> str:
        began.set()
        await finish.wait()
        done.append("attach")
        return "attached"

    async def never() -> str:
        done.append("never")
        return "ran"

    first = asyncio.create_task(locks.run("csi-pvc-1", attach, deadline_s=30))
    await began.wait()
    waiting = asyncio.create_task(locks.run("csi-pvc-1", never, deadline_s=30))
    first.cancel()
    waiting.cancel()
    for task in (first, waiting):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert locks.busy("csi-pvc-1")  # the attach goes on, holding the volume

    async def detach() -> str:
        done.append("detach")
        return "detached"

    after = asyncio.create_task(locks.run("csi-pvc-1", detach, deadline_s=30))
    finish.set()
    assert await after == "detached"
    assert done == ["attach", "detach"] and not locks.busy("csi-pvc-1")
