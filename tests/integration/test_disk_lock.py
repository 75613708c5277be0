"""The disk lock (shared/locks.py DiskLock) against a real Redis: one holder at a time, and its release when held with
``release_after_exit`` (the migrator's handler): a clean exit leaves the release running, which ``released`` waits
for; an exit by an error releases before it returns, as without the option."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from dev.wait import eventually
from shared import locks
from shared.errors import OperationPending
from shared.keys import disk_lock_key
from shared.locks import DiskLock, LockLost
from tests.support.brokers import RedisEndpoint, cut_off

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


async def test_a_holder_cut_off_from_redis_stops_trusting_its_lock_before_its_key_expires(
    redis: aioredis.Redis, redis_server: RedisEndpoint, redis_prefix: str
) -> None:
    """Its heartbeats fail with a ConnectionError, never with "not owned": only the age of its last extension can
    tell it that the key may be gone. It must stop before the key expires, so that it never acts while another
    worker holds the disk."""
    key = disk_lock_key(redis_prefix, DISK)
    holder_redis = aioredis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        first = DiskLock(holder_redis, redis_prefix, DISK, ttl_s=0.9, wait_s=0)
        with capture_logs() as logs:
            async with first:
                first.ensure_held()
                await cut_off(holder_redis)
                await eventually(lambda: _lost(first), 5, 0.01, description="LockLost from ensure_held")
                left_ms = await redis.pttl(key)
                assert left_ms > 0, "the key had not expired yet when the holder stopped trusting it"
                await eventually(lambda: _key_gone(redis, key), 5, 0.01, description="the lock's key expired")
                async with DiskLock(redis, redis_prefix, DISK, ttl_s=30, wait_s=0):
                    with pytest.raises(LockLost, match=f"lost the lock on disk {DISK}"):
                        first.ensure_held()
        assert [entry["event"] for entry in logs if entry["event"] == "lock_lost"] == ["lock_lost"]
    finally:
        await holder_redis.aclose()


async def test_a_lock_whose_heartbeats_get_through_stays_held_past_its_ttl(redis: aioredis.Redis,
                                                                           redis_prefix: str) -> None:
    key = disk_lock_key(redis_prefix, DISK)
    lock = DiskLock(redis, redis_prefix, DISK, ttl_s=0.6, wait_s=0)
    async with lock:
        extensions = _Extensions(redis, key)
        # Three extensions seen in Redis (its TTL going up again): the lock is older than its TTL by then.
        await eventually(extensions.count_to(3), 5, 0.02, description="three heartbeats reached Redis")
        lock.ensure_held()


def _lost(lock: DiskLock) -> bool:
    try:
        lock.ensure_held()
    except LockLost:
        return True
    return False


async def _key_gone(redis: aioredis.Redis, key: str) -> bool:
    return await redis.exists(key) == 0


class _Extensions:
    """Counts the times the key's remaining TTL went up between two reads: each is a heartbeat that reached Redis."""

    def __init__(self, redis: aioredis.Redis, key: str) -> None:
        self._redis, self._key = redis, key
        self._last_ms: int | None = None
        self.seen = 0

    def count_to(self, wanted: int) -> Callable[[], Awaitable[bool]]:
        async def reached() -> bool:
            left_ms = await self._redis.pttl(self._key)
            assert left_ms > 0, "the lock's key expired"
            if self._last_ms is not None and left_ms > self._last_ms:
                self.seen += 1
            self._last_ms = left_ms
            return self.seen >= wanted
        return reached
