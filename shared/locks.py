"""Redis lock per disk name, per-SR migration slots and singleton-task leases (key names from shared/keys.py).

Both are efficiency measures (one worker drives XO for a disk at a time; at most N copies touch an SR at once);
correctness also rests on re-reading XO before acting. Every hold has a TTL (lease), is extended by a heartbeat
while held and released even when the holder is cancelled.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Iterable, Iterator
from types import TracebackType
from typing import Literal, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from shared.backoff import Backoff
from shared.errors import BackendUnavailable, OperationPending
from shared.keys import disk_lock_key, lease_key, sr_doorbell_key, sr_slots_key
from shared.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")


async def _end_heartbeat(task: asyncio.Task[None] | None) -> None:
    """Cancel a heartbeat task and wait for its end; its owner set its stop flag first.

    Both halves matter on Python 3.11: redis-py sends commands under ``asyncio.wait_for``, which can return
    normally although the task was cancelled (python/cpython#86296, fixed in 3.12), so a heartbeat cancelled
    during a Redis call may go on: its loop checks the flag after every call. And ``asyncio.wait`` rather than
    ``suppress(CancelledError): await task``, which would also swallow a cancellation of the caller.
    """
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("heartbeat_crashed", task=task.get_name(), error=repr(exc), exc_info=exc)


class LockLost(OperationPending, code="lock_lost"):
    """The lock expired or was taken over while held (heartbeat failed); stop before the next XO write."""


# Releases left running after their holder's exit (DiskLock ``release_after_exit``), kept referenced until done.
_RELEASING: set[asyncio.Task[None]] = set()


async def released(timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) for the releases still running after their holder's exit in this event loop: a
    worker that stops lets them reach Redis before it closes its client (else the lock waits out its TTL)."""
    loop = asyncio.get_running_loop()
    pending = {task for task in _RELEASING if task.get_loop() is loop}
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)


class _Leased:
    """Exit of a held lease (DiskLock, SrSlots): stop the heartbeat, then release, even when cancelled; a cancelled
    release could leave the lease held (redis-py #3847) until its TTL runs out, so a cancellation during the release
    sends it again, shielded. The release leaves in the exiting task itself: a waiter on another replica (an SR slot's
    next holder) is woken one Redis round trip after the exit, not a loop turn later.
    With ``_release_after_exit``, a clean exit returns at once and both run in a task of their own (``released``)."""

    _heartbeat: asyncio.Task[None] | None
    _stopping: bool
    _release_after_exit = False
    _beating = False  # a heartbeat's Redis call is in flight (_beat_call)

    async def _release(self, *, again: bool = False) -> None:
        """Give the lease back; ``again``: a re-send after a cancelled release, which may have reached Redis."""
        raise NotImplementedError

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping = True
        if self._release_after_exit and exc_type is None:
            task = asyncio.create_task(self._end(), name=f"release:{type(self).__name__}")
            _RELEASING.add(task)
            task.add_done_callback(_RELEASING.discard)
            return
        await self._end()

    async def _end(self) -> None:
        try:
            await self._stop_heartbeat()
        finally:
            try:
                await self._release()
            except asyncio.CancelledError:
                await asyncio.shield(self._release(again=True))  # the first may not have reached Redis
                raise

    async def _stop_heartbeat(self) -> None:
        """A heartbeat asleep between beats is only cancelled: the cancellation ends its sleep, and with ``_stopping``
        set it makes no further call, so the release need not wait for its end. One in a Redis call is waited for
        (_end_heartbeat): its call could otherwise extend or put back the lease after the release."""
        beat = self._heartbeat
        if beat is not None and not beat.done() and not self._beating:
            beat.cancel()
            return
        await _end_heartbeat(beat)

    async def _beat_call(self, call: Awaitable[T]) -> T:
        """Await a heartbeat's Redis call, flagged as in flight for _stop_heartbeat."""
        self._beating = True
        try:
            return await call
        finally:
            self._beating = False


class _TimedLock(Lock):
    """redis-py's Lock, noting when the write that last (re)started its TTL was sent (``started_at``, loop time).

    The TTL runs from the moment Redis ran that write, which is after it was sent: the key lives at least until
    ``started_at + timeout`` by a clock running at Redis's pace, whatever we learn about Redis afterwards."""

    started_at: float | None = None

    async def do_acquire(self, token: str | bytes) -> bool:
        sent_at = asyncio.get_running_loop().time()
        if not await super().do_acquire(token):
            return False
        self.started_at = sent_at
        return True

    async def do_reacquire(self) -> Literal[True]:
        sent_at = asyncio.get_running_loop().time()
        await super().do_reacquire()
        self.started_at = sent_at
        return True


class DiskLock(_Leased):
    """``async with DiskLock(...)``: exclusive hold of one disk across replicas.

    Acquire waits at most ``wait_s``, then raises OperationPending (another worker holds the disk).
    The key's TTL is ``ttl_s``; a heartbeat resets it every ``ttl_s / 3`` while held. ``ensure_held()``
    raises LockLost once a heartbeat found the lock gone, or once no acquire or heartbeat has succeeded for
    ``ttl_s`` minus a margin (``_margin_s``): a holder cut off from Redis cannot learn that its key expired and
    another worker took it, so it stops trusting the lock before the key can have expired. Callers check it
    before destructive calls.
    One DiskLock object per critical section (redis-py keeps the token on the object).
    Redis errors become BackendUnavailable. ``release_after_exit``: a clean exit does not wait for the release
    (one Redis round trip), which goes on in a task of its own (``released`` waits for it); an exit by an exception
    or a cancellation still releases before it returns.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, disk_name: str, *, ttl_s: float, wait_s: float,
                 release_after_exit: bool = False) -> None:
        self._release_after_exit = release_after_exit
        self.key = disk_lock_key(prefix, disk_name)
        self._disk_name = disk_name
        self._ttl_s = ttl_s
        self._wait_s = wait_s
        # thread_local=False: the token must stay with this object, not with a thread shared by every task.
        self._lock = _TimedLock(redis, self.key, timeout=ttl_s, blocking_timeout=wait_s, sleep=0.05,
                                thread_local=False)
        # One heartbeat interval: a healthy lock is at most one interval (plus a round trip) old, so the margin
        # never fires while heartbeats succeed; it fires once one beat failed and the next has not succeeded. What it
        # leaves of the TTL covers the XO call an ensure_held() guards reaching XO, a heartbeat reply that arrives
        # late, and the pod's clock running slower than Redis's (both count the TTL on their own clock).
        self._margin_s = ttl_s / 3
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False
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

    def ensure_held(self) -> None:
        """Raise LockLost when a heartbeat found that the lock is no longer ours, or when its last acquire or
        extension is so old (``ttl_s`` minus the margin) that its key may have expired unseen (Redis unreachable).
        Once raised, it raises again: the lock is never trusted again, even if a later heartbeat gets through."""
        started_at = self._lock.started_at
        if not self._lost and started_at is not None:
            age_s = asyncio.get_running_loop().time() - started_at
            if age_s >= self._ttl_s - self._margin_s:
                self._lost = True
                log.error("lock_lost", lock_key=self.key, reason="not extended", age_s=round(age_s, 3),
                          ttl_s=self._ttl_s)
        if self._lost:
            raise LockLost(f"lost the lock on disk {self._disk_name} (key {self.key}); another worker may act")

    async def _release(self, *, again: bool = False) -> None:
        try:
            await self._lock.release()
        except LockError:
            if again:  # the cancelled first release reached Redis: nothing is left to give back
                log.debug("lock_release_resent", lock_key=self.key, note="already released")
                return
            log.warning("lock_release_failed", lock_key=self.key, reason="not owned (expired)")
        except RedisError as exc:
            log.warning("lock_release_failed", lock_key=self.key, reason=type(exc).__name__)

    async def _beat(self) -> None:
        interval_s = self._ttl_s / 3
        while not self._stopping:  # checked after each await: see _end_heartbeat
            await asyncio.sleep(interval_s)
            try:
                await self._beat_call(self._lock.reacquire())
            except LockNotOwnedError:
                self._lost = True
                log.error("lock_lost", lock_key=self.key)
                return
            except (LockError, RedisError) as exc:
                # The next beat retries; until one succeeds, ensure_held() counts the key's TTL down from the
                # last success (a Redis outage past a third of the TTL loses the lock).
                log.warning("lock_heartbeat_failed", lock_key=self.key, reason=type(exc).__name__)


# Redis server time in ms, for every Lua script of the project (slots here, job records in shared/jobs.py):
# leases and heartbeats never depend on a pod's clock.
LUA_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
# Shared by the slot scripts: a set's TTL kept at its longest lease, so that a set nobody extends any more (every
# holder gone) disappears by itself.
_SLOTS_PRELUDE = LUA_NOW_MS + """
local function expire_with_leases(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', key, last[2]) end
end
"""

# KEYS: the SRs' slot sets. ARGV: lease token, limit, lease ms. Drops expired leases, then adds the lease to every
# set only when each holds fewer than limit live ones. 0 when added; else the (1-based) index of a full set.
_ACQUIRE_SLOTS = _SLOTS_PRELUDE + """
local now = now_ms()
local limit = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= limit then return i end
end
local expiry = now + tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, ARGV[1])
  expire_with_leases(key)
end
return 0
"""

# KEYS, ARGV: as above. Moves the lease's expiry to now + lease ms where it is still a member (expired or not: no
# acquire dropped it, so nobody counted its slot as free); puts it back where it is gone (Redis lost the set) if
# that SR has room. {restored, missing}: sets it was put back into, sets it could not be put back into (full).
_EXTEND_SLOTS = _SLOTS_PRELUDE + """
local now = now_ms()
local expiry = now + tonumber(ARGV[3])
local restored, missing = 0, 0
for _, key in ipairs(KEYS) do
  if redis.call('ZSCORE', key, ARGV[1]) then
    redis.call('ZADD', key, expiry, ARGV[1])
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) < tonumber(ARGV[2]) then
      redis.call('ZADD', key, expiry, ARGV[1])
      restored = restored + 1
    else
      missing = missing + 1
    end
  end
  expire_with_leases(key)
end
return {restored, missing}
"""

# KEYS: the slot sets, then their doorbells. ARGV: lease token, limit, lease ms. Removes the lease; each set it
# was in rings its doorbell (one entry per freed slot, at most limit kept, gone after lease ms). Returns the number
# of sets the lease was removed from.
_RELEASE_SLOTS = """
local n = #KEYS / 2
local removed = 0
for i = 1, n do
  if redis.call('ZREM', KEYS[i], ARGV[1]) == 1 then
    removed = removed + 1
    redis.call('RPUSH', KEYS[n + i], '1')
    redis.call('LTRIM', KEYS[n + i], -tonumber(ARGV[2]), -1)
    redis.call('PEXPIRE', KEYS[n + i], ARGV[3])
  end
end
return removed
"""
_MIN_DOZE_S = 0.002  # BLPOP reads a timeout under 1 ms as 0, which means "block for ever"

SLOT_BACKOFF = Backoff(start_s=0.02, cap_s=0.5)  # how long a waiter dozes when no release rings its doorbell


class SrSlots(_Leased):
    """``async with SrSlots(...)``: one slot on every SR of ``sr_ids`` at once, with at most ``limit`` holders per
    SR across replicas (a migration holds one on its source and one on its target SR).

    Acquire is one Lua script over all the SRs' sets (all or nothing, so two holders never deadlock on a pair):
    drop expired leases, then add this lease everywhere only when every SR has fewer than ``limit`` live ones.
    A full SR is retried with a capped jittered backoff (20 ms doubling to 500 ms) for ``wait_s``, then
    OperationPending (retryable). The backoff waits in a BLPOP on the SRs' doorbells, which every release rings,
    pipelined with the next try: a waiter tries again as soon as a slot of its SRs frees, in Redis itself, within
    the release's own turn (Redis wakes blocked clients in arrival order, then runs what they sent next); the
    delay only bounds the wait when no release comes (an expired lease rings nothing).

    A lease expires ``lease_s`` after it was taken or last extended, by Redis time (``TIME``), never a pod's
    clock, so a holder that vanished frees its slots after ``lease_s``. A heartbeat extends it every
    ``lease_s / 3`` while held, and puts it back where Redis lost it (restart without persistence) when that SR
    has room. Released on exit, shielded, also when the holder is cancelled (while waiting too). Redis errors
    while acquiring become BackendUnavailable; later ones are logged (the lease bounds the harm). ``waited_s``
    is the time the acquire took. ``delays_s`` replaces the backoff (tests). One object per hold.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, sr_ids: Iterable[str], *, limit: int, lease_s: float,
                 wait_s: float, owner: str = "", delays_s: Iterator[float] | None = None) -> None:
        self.sr_ids = sorted(set(sr_ids))
        if not self.sr_ids or limit < 1 or lease_s <= 0 or wait_s < 0:
            raise ValueError(f"SrSlots needs SRs, limit >= 1, lease_s > 0, wait_s >= 0 (got {self.sr_ids}, "
                             f"{limit}, {lease_s}, {wait_s})")
        self.keys = [sr_slots_key(prefix, sr_id) for sr_id in self.sr_ids]
        self.doorbells = [sr_doorbell_key(prefix, sr_id) for sr_id in self.sr_ids]
        self.token = f"{owner}:{uuid.uuid4().hex}" if owner else uuid.uuid4().hex
        self.waited_s = 0.0
        self._redis = redis
        self._limit = limit
        self._lease_s = lease_s
        self._lease_ms = max(int(lease_s * 1000), 1)
        self._wait_s = wait_s
        self._delays_s = delays_s if delays_s is not None else SLOT_BACKOFF.delays()
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False

    async def __aenter__(self) -> SrSlots:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self._acquire(started + self._wait_s)
        except OperationPending:
            raise  # every try answered "full": nothing was added
        except BaseException:
            # A cancelled or failed script call may still have added the lease on the server: take it out.
            await asyncio.shield(self._release())
            raise
        self.waited_s = loop.time() - started
        self._heartbeat = asyncio.create_task(self._beat(), name=f"sr-slots-heartbeat:{self.token}")
        return self

    async def _acquire(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        contended = False
        try:
            full = await self._eval(_ACQUIRE_SLOTS, self._limit, self._lease_ms)
            while full != 0:
                sr_id = self.sr_ids[full - 1] if isinstance(full, int) and 0 < full <= len(self.sr_ids) else "?"
                if not contended:
                    contended = True
                    log.info("sr_slots_contended", sr_id=sr_id, limit=self._limit, wait_s=self._wait_s)
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    raise OperationPending(f"SR {sr_id} already has {self._limit} migrations in progress "
                                           f"(waited {self._wait_s:g} s for a slot)")
                # Capped jittered backoff, cut short by a release of one of our SRs' slots.
                doze_s = max(min(next(self._delays_s), remaining_s), _MIN_DOZE_S)
                full = await _keeping_cancellation(self._doze_then_try(doze_s))
        except RedisError as exc:
            raise BackendUnavailable(f"Redis is unreachable while taking slots on SRs {self.sr_ids}") from exc

    async def _doze_then_try(self, doze_s: float) -> object:
        """BLPOP on the doorbells for at most ``doze_s``, then the acquire script, sent together: Redis runs the script
        the moment the BLPOP returns (a blocked client's next command waits in its buffer), so a waiter a release
        woke has its answer with the wake-up, not one more round trip later. The acquire script's reply."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.blpop(self.doorbells, timeout=doze_s)
        pipe.eval(_ACQUIRE_SLOTS, len(self.keys), *self.keys, self.token, self._limit, self._lease_ms)
        _, full = await pipe.execute()
        return full

    async def _release(self, *, again: bool = False) -> None:
        try:  # idempotent: a re-send (``again``) removes nothing more
            await _keeping_cancellation(self._redis.eval(
                _RELEASE_SLOTS, 2 * len(self.keys), *self.keys, *self.doorbells, self.token, self._limit,
                self._lease_ms))
        except RedisError as exc:
            log.warning("sr_slots_release_failed", sr_ids=self.sr_ids, reason=type(exc).__name__,
                        lease_s=self._lease_s)

    async def _beat(self) -> None:
        interval_s = self._lease_s / 3
        while not self._stopping:  # checked after each await: see _end_heartbeat
            await asyncio.sleep(interval_s)
            try:
                reply = await self._beat_call(self._eval(_EXTEND_SLOTS, self._limit, self._lease_ms))
            except RedisError as exc:
                # Transient: the next beat retries; the lease (3 beats) covers a short Redis outage.
                log.warning("sr_slots_heartbeat_failed", sr_ids=self.sr_ids, reason=type(exc).__name__)
                continue
            restored, missing = reply if isinstance(reply, list) and len(reply) == 2 else (0, 0)
            if restored:
                log.info("sr_slots_restored", sr_ids=self.sr_ids, count=restored)
            if missing:
                # Our copy runs on regardless (XO goes on); the SR is over its limit by one until it ends.
                log.warning("sr_slots_lost", sr_ids=self.sr_ids, count=missing)

    async def _eval(self, script: str, *args: int) -> object:
        return await _keeping_cancellation(self._redis.eval(script, len(self.keys), *self.keys, self.token, *args))


async def _keeping_cancellation(call: Awaitable[T]) -> T:
    """Await one Redis call; raise a cancellation of this task that redis-py lost during it (python/cpython#86296,
    see _end_heartbeat), so that a cancelled waiter stops waiting and releases what it took."""
    task = asyncio.current_task()
    cancels = task.cancelling() if task is not None else 0
    reply = await call
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError()
    return reply


# KEYS: the lease. ARGV: holder token, ttl ms. Takes a free lease or renews our own; 1 when we hold it now.
_HOLD_LEASE = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# KEYS: the lease. ARGV: holder token. Drops it only when it is ours.
_DROP_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """Which replica runs a singleton task (the controller's temporary-disk cleanup): ``renew()`` before each
    round takes the lease when it is free or renews it when it is ours, for ``ttl_s``; True means "run the round".

    A holder that stops renewing (crashed, cut off) loses the lease ``ttl_s`` after its last renewal, and another
    replica takes it at its next round. An efficiency and safety-in-depth measure: the task itself re-reads XO
    under the volume's lock before any change. Redis errors become BackendUnavailable (skip the round).
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, task: str, *, ttl_s: float, holder: str) -> None:
        self.key = lease_key(prefix, task)
        self.token = f"{holder}:{uuid.uuid4().hex}"
        self._redis = redis
        self._ttl_ms = max(int(ttl_s * 1000), 1)

    async def renew(self) -> bool:
        try:
            return bool(await self._redis.eval(_HOLD_LEASE, 1, self.key, self.token, self._ttl_ms))
        except RedisError as exc:
            raise BackendUnavailable(f"Redis is unreachable while renewing lease {self.key}") from exc

    async def release(self) -> None:
        """Give the lease up now if it is ours (a clean shutdown hands the task over without waiting ``ttl_s``)."""
        try:
            await self._redis.eval(_DROP_LEASE, 1, self.key, self.token)
        except RedisError as exc:
            log.warning("lease_release_failed", lease_key=self.key, reason=type(exc).__name__)
