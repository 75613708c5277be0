"""The disk lock (shared/locks.py DiskLock) against a real Redis: one holder at a time, and its release when held with
``release_after_exit`` (the migrator's handler): a clean exit leaves the release running, which ``released`` waits
for; an exit by an error releases before it returns, as without the option."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from shared import locks
from shared.errors import OperationPending
from shared.keys import disk_lock_key
from shared.locks import DiskLock

pytestmark = pytest.mark.integration

DISK = "csi-vol1"


def _lock(redis: aioredis.Redis, prefix: str, *, release_after_exit: bool = False) -> DiskLock:
    return DiskLock(redis, prefix, DISK, ttl_s=30, wait_s=0, release_after_exit=release_after_exit)


async def test_a_held_disk_lock_keeps_a_second_holder_out(redis: aioredis.Redis, redis_prefix: str) -> None:
    async with _lock(redis, redis_prefix):
        with pytest.raises(OperationPending, match=f"disk {DISK} is locked by another worker"):
            async with _lock(redis, redis_prefix):
                pass
    assert await redis.exists(disk_lock_key(redis_prefix, DISK)) == 0


async def test_released_after_exit_the_lock_is_free_for_the_next_holder(redis: aioredis.Redis,
                                                                        redis_prefix: str) -> None:
    async with _lock(redis, redis_prefix, release_after_exit=True):
        assert await redis.exists(disk_lock_key(redis_prefix, DISK)) == 1
    await locks.released(5)
    assert await redis.exists(disk_lock_key(redis_prefix, DISK)) == 0
    async with _lock(redis, redis_prefix):  # taken at once (wait_s 0): nothing was left to its 30 s TTL
        pass


async def test_an_exit_by_an_error_releases_before_it_returns(redis: aioredis.Redis, redis_prefix: str) -> None:
    with pytest.raises(RuntimeError, match="the handler failed"):
        async with _lock(redis, redis_prefix, release_after_exit=True):
            raise RuntimeError("the handler failed")
    assert await redis.exists(disk_lock_key(redis_prefix, DISK)) == 0


async def test_a_release_cancelled_after_it_reached_redis_is_resent_quietly(redis: aioredis.Redis,
                                                                            redis_prefix: str) -> None:
    """The holder is cancelled while its release waits for Redis's answer, after Redis ran it: the re-sent release
    finds nothing left to give back, which is no failure to warn an operator about."""
    lock = _lock(redis, redis_prefix)
    redis_lock = lock._lock
    sent = redis_lock.do_release

    async def cancelled_after_redis_ran_it(token: bytes) -> None:
        await sent(token)
        raise asyncio.CancelledError

    redis_lock.do_release = cancelled_after_redis_ran_it  # type: ignore[method-assign,assignment]
    with capture_logs() as logs, pytest.raises(asyncio.CancelledError):
        async with lock:
            pass
    assert await redis.exists(disk_lock_key(redis_prefix, DISK)) == 0
    assert [entry["event"] for entry in logs if entry["log_level"] in ("warning", "error")] == []
    assert [entry["event"] for entry in logs if entry["event"].startswith("lock_release")] == ["lock_release_resent"]
