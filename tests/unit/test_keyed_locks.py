"""KeyedLocks: one holder per key, a waiter's timeout told apart from the block's own, no key kept when unused."""

from __future__ import annotations

import asyncio

import pytest

from shared.errors import OperationPending
from shared.keyed_locks import KeyedLocks


async def test_one_holder_per_key_other_keys_free_and_nothing_kept_afterwards() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold(key: str, name: str) -> None:
        async with locks.hold(key):
            order.append(f"{name} in")
            if name == "first":
                holding.set()
                await release.wait()
            order.append(f"{name} out")

    first = asyncio.create_task(hold("vm-1", "first"))
    await holding.wait()
    second = asyncio.create_task(hold("vm-1", "second"))
    other = asyncio.create_task(hold("vm-2", "other"))
    await other
    assert order == ["first in", "other in", "other out"] and locks.locked("vm-1") and len(locks) == 1
    release.set()
    await asyncio.gather(first, second)
    assert order[3:] == ["first out", "second in", "second out"]
    assert len(locks) == 0 and not locks.locked("vm-1")


async def test_a_waiter_gives_up_with_on_timeout_and_the_blocks_own_timeout_passes_unchanged() -> None:
    locks = KeyedLocks()
    async with locks.hold("v"):
        with pytest.raises(OperationPending, match="busy"):
            async with locks.hold("v", timeout_s=0.01, on_timeout=lambda: OperationPending("busy")):
                pass
        with pytest.raises(TimeoutError):
            async with locks.hold("v", timeout_s=0.01):
                pass
    with pytest.raises(TimeoutError) as info:
        async with locks.hold("v", timeout_s=1.0, on_timeout=lambda: OperationPending("busy")):
            raise TimeoutError("the block's own")
    assert str(info.value) == "the block's own" and len(locks) == 0
