"""A migrator's copy slots (services/migrator/slots.py): a job prepared ahead waits for the slot the copy before it
frees, and goes back to the queue (NotStarted) when its wait runs out."""

from __future__ import annotations

import asyncio

import pytest

from services.migrator.slots import CopySlots, NotStarted


async def test_a_waiting_job_gets_the_slot_as_soon_as_the_copy_before_it_frees_it() -> None:
    slots = CopySlots(1, wait_s=5)
    order: list[str] = []
    first_holds = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with slots.hold("csi-a"):
            order.append("a copies")
            first_holds.set()
            await release_first.wait()
        order.append("a done")

    async def second() -> None:
        await first_holds.wait()
        async with slots.hold("csi-b"):
            order.append("b copies")

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await first_holds.wait()
    release_first.set()
    await asyncio.gather(*tasks)
    assert order == ["a copies", "a done", "b copies"]


async def test_slots_pass_to_the_waiting_jobs_in_the_order_they_came_one_loop_step_after_each_release() -> None:
    slots = CopySlots(1, wait_s=5)
    order: list[str] = []
    releases = {disk: asyncio.Event() for disk in ("csi-a", "csi-b", "csi-c", "csi-d")}

    async def job(disk: str) -> None:
        async with slots.hold(disk):
            order.append(disk)
            await releases[disk].wait()

    tasks = []
    for disk in releases:  # csi-a takes the free slot; b, c, d wait in that order
        tasks.append(asyncio.create_task(job(disk)))
        await asyncio.sleep(0)
    assert order == ["csi-a"]
    for done, following in (("csi-a", "csi-b"), ("csi-b", "csi-c"), ("csi-c", "csi-d")):
        releases[done].set()
        await asyncio.sleep(0)  # the holder leaves its block and hands the slot over
        await asyncio.sleep(0)  # the waiter it was handed to copies: no second try, no step in between
        assert order[-1] == following
    releases["csi-d"].set()
    await asyncio.gather(*tasks)


async def test_a_job_cancelled_just_as_it_is_handed_the_slot_passes_it_to_the_next_waiter() -> None:
    slots = CopySlots(1, wait_s=5)
    got: list[str] = []
    with pytest.raises(asyncio.CancelledError):
        async with slots.hold("csi-a"):
            second = asyncio.create_task(_hold_once(slots, "csi-b"))
            third = asyncio.create_task(_note_hold(slots, "csi-c", got))
            await asyncio.sleep(0)  # both wait now, csi-b first
            raise asyncio.CancelledError  # csi-a leaves; the slot is handed to csi-b ...
    second.cancel()  # ... which is cancelled before it could run
    await asyncio.wait({second})
    async with asyncio.timeout(1):
        await third
    assert second.cancelled() and got == ["csi-c"]
    await _hold_once(slots, "csi-d")  # and the one slot is free again afterwards


async def _note_hold(slots: CopySlots, disk: str, got: list[str]) -> None:
    async with slots.hold(disk):
        got.append(disk)


async def test_a_job_still_waiting_when_its_wait_runs_out_goes_back_unstarted_and_takes_nothing() -> None:
    slots = CopySlots(1, wait_s=0.05)
    async with slots.hold("csi-a"):
        busy = "disk csi-b: every copy slot of this worker stayed busy for 0.05 s"
        with pytest.raises(NotStarted, match=busy) as err:
            async with slots.hold("csi-b"):
                pytest.fail("no slot was free")
        assert err.value.retryable
    async with asyncio.timeout(1), slots.hold("csi-c"):  # the slot csi-a held is free, and csi-b's wait took none
        pass


async def test_when_the_worker_stops_a_waiting_job_goes_back_at_once_and_none_starts_after() -> None:
    slots = CopySlots(1, wait_s=30)
    async with slots.hold("csi-a"):
        waiting = asyncio.create_task(_hold_once(slots, "csi-b"))
        await asyncio.sleep(0)  # one step of the loop: the new task runs up to its wait for the slot (FIFO, no timing)
        slots.close()
        with pytest.raises(NotStarted, match="disk csi-b: this worker stops; the job goes back to the queue"):
            await asyncio.wait_for(waiting, 1)
    with pytest.raises(NotStarted, match="this worker stops"):  # the slot is free again, but no copy starts now
        await _hold_once(slots, "csi-c")


async def test_a_job_cancelled_while_it_waits_takes_no_slot() -> None:
    slots = CopySlots(1, wait_s=30)
    async with slots.hold("csi-a"):
        waiting = asyncio.create_task(_hold_once(slots, "csi-b"))
        await asyncio.sleep(0)  # as above: it waits for the slot now
        waiting.cancel()
        await asyncio.wait({waiting})
    async with asyncio.timeout(1), slots.hold("csi-c"):  # csi-a's slot came back and csi-b took none
        pass


async def test_a_free_slot_is_taken_even_when_the_wait_is_zero() -> None:
    slots = CopySlots(1, wait_s=0)
    async with slots.hold("csi-a"):
        with pytest.raises(NotStarted, match="stayed busy for 0 s"):
            await _hold_once(slots, "csi-b")
    await _hold_once(slots, "csi-c")


async def _hold_once(slots: CopySlots, disk: str) -> None:
    async with slots.hold(disk):
        pass


@pytest.mark.parametrize(("count", "wait_s"), [(0, 1.0), (1, -1.0)])
def test_bad_sizes_are_refused(count: int, wait_s: float) -> None:
    with pytest.raises(ValueError, match="CopySlots needs count >= 1 and wait_s >= 0"):
        CopySlots(count, wait_s=wait_s)
