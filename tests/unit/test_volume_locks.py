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
