"""Redis lock per disk name, and every Redis key name this project writes (built from the key prefix).

The lock is an efficiency measure (one worker drives XO for a disk at a time); correctness also rests on
re-reading XO before acting. TTL is always set, extended by a heartbeat while held, released even when
the holder is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from shared.errors import BackendUnavailable, OperationPending
from shared.logging import get_logger

log = get_logger(__name__)


def disk_lock_key(prefix: str, disk_name: str) -> str:
    return f"{prefix}lock:disk:{disk_name}"


def disk_job_key(prefix: str, disk_name: str) -> str:
    return f"{prefix}job:disk:{disk_name}"


def disk_job_pattern(prefix: str) -> str:
    """SCAN MATCH pattern of every job record under ``prefix`` (glob characters in the prefix escaped)."""
    escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in prefix)
    return f"{escaped}job:disk:*"


class LockLost(OperationPending):
    """The lock expired or was taken over while held (heartbeat failed); stop before the next XO write."""


class DiskLock:
    """``async with DiskLock(...)``: exclusive hold of one disk across replicas.

    Acquire waits at most ``wait_s``, then raises OperationPending (another worker holds the disk).
    The key's TTL is ``ttl_s``; a heartbeat resets it every ``ttl_s / 3`` while held. ``ensure_held()``
    raises LockLost once a heartbeat found the lock gone, so callers check it before destructive calls.
    One DiskLock object per critical section (redis-py keeps the token on the object).
    Redis errors become BackendUnavailable.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, disk_name: str, *, ttl_s: float, wait_s: float) -> None:
        self.key = disk_lock_key(prefix, disk_name)
        self._disk_name = disk_name
        self._ttl_s = ttl_s
        self._wait_s = wait_s
        # thread_local=False: the token must stay with this object, not with a thread shared by every task.
        self._lock = Lock(redis, self.key, timeout=ttl_s, blocking_timeout=wait_s, sleep=0.05, thread_local=False)
        self._heartbeat: asyncio.Task[None] | None = None
        self._lost = False

    async def __aenter__(self) -> DiskLock:
        try:
            acquired = await self._lock.acquire()
        except RedisError as exc:
            raise BackendUnavailable(f"Redis is unreachable while locking disk {self._disk_name}") from exc
        if not acquired:
            log.info("lock_contended", lock_key=self.key, wait_s=self._wait_s)
            raise OperationPending(f"disk {self._disk_name} is locked by another worker (key {self.key})")
        self._heartbeat = asyncio.create_task(self._beat(), name=f"lock-heartbeat:{self.key}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        # Shielded: a cancelled release could leave the key held (redis-py #3847); the TTL bounds the worst case.
        await asyncio.shield(self._release())

    def ensure_held(self) -> None:
        """Raise LockLost when a heartbeat found that the lock is no longer ours."""
        if self._lost:
            raise LockLost(f"lost the lock on disk {self._disk_name} (key {self.key}); another worker may act")

    async def _release(self) -> None:
        try:
            await self._lock.release()
        except LockError:
            log.warning("lock_release_failed", lock_key=self.key, reason="not owned (expired)")
        except RedisError as exc:
            log.warning("lock_release_failed", lock_key=self.key, reason=type(exc).__name__)

    async def _beat(self) -> None:
        interval_s = self._ttl_s / 3
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._lock.reacquire()
            except LockNotOwnedError:
                self._lost = True
                log.error("lock_lost", lock_key=self.key)
                return
            except (LockError, RedisError) as exc:
                # Transient: the next beat retries; the TTL (3 beats) covers a short Redis outage.
                log.warning("lock_heartbeat_failed", lock_key=self.key, reason=type(exc).__name__)
