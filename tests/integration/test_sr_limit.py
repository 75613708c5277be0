"""The per-SR migration limit (shared/locks.py SrSlots) against a real Redis: never more than the limit per SR,
SRs independent, a (source, target) pair all or nothing, leases expiring, heartbeats, cancellation, the wait
bound; then the migrator using it (the handler around vdi.migrate, and workers against a simulator whose
storage-migration cap equals the limit)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.migrator.app import handler_deps
from services.migrator.migrate import handle
from services.migrator.settings import MigratorSettings
from services.xo_simulator.server import start_simulator
from shared import messages, vdi_metadata
from shared.errors import OperationPending
from shared.keys import sr_doorbell_key, sr_slots_key
from shared.locks import SrSlots
from shared.messages import MigrationRequested
from shared.units import GiB
from shared.xo.client import XoClient
from tests.support.brokers import RedisEndpoint
from tests.support.migration import (
    DESCRIPTION,
    DISK,
    HOST_A2,
    POOL_A,
    SR_A1,
    SR_A2,
    TAG,
    VM_A2,
    Env,
    Worker,
    open_env,
    sim_settings,
    two_hosts,
    vdis_named,
)
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

SR_A, SR_B, SR_C = "sr-a", "sr-b", "sr-c"
LEASE_S = 30.0  # long enough that no lease expires in a test unless the test means it to
TIMEOUT_S = 20.0


def _slots(redis: aioredis.Redis, prefix: str, *sr_ids: str, limit: int = 1, lease_s: float = LEASE_S,
           wait_s: float = 0.0) -> SrSlots:
    return SrSlots(redis, prefix, sr_ids, limit=limit, lease_s=lease_s, wait_s=wait_s, owner="test")


async def _holders(redis: aioredis.Redis, prefix: str, sr_id: str) -> list[str]:
    return [m.decode() for m in await redis.zrange(sr_slots_key(prefix, sr_id), 0, -1)]


class Concurrency:
    """How many holders are inside at once, and the most there ever were (counted under an asyncio lock)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def inside(self) -> AsyncIterator[None]:
        async with self._lock:
            self.current += 1
            self.peak = max(self.peak, self.current)
        try:
            yield
        finally:
            async with self._lock:
                self.current -= 1


@contextlib.asynccontextmanager
async def held(slots: SrSlots) -> AsyncIterator[asyncio.Event]:
    """Hold ``slots`` in a task until the yielded event is set (or the block ends)."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with slots:
            entered.set()
            await release.wait()

    task = asyncio.create_task(hold())
    waiting = asyncio.create_task(entered.wait())
    try:
        await asyncio.wait({task, waiting}, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raise what went wrong
        assert entered.is_set(), "the holder did not get its slots"
        yield release
    finally:
        waiting.cancel()
        release.set()
        await task


async def test_never_more_than_the_limit_on_one_sr(redis: aioredis.Redis, redis_prefix: str) -> None:
    limit, extra = 3, 5
    total = limit + extra
    inside = Concurrency()
    holding: asyncio.Queue[asyncio.Event] = asyncio.Queue()

    async def holder() -> None:
        release = asyncio.Event()
        async with _slots(redis, redis_prefix, SR_A, limit=limit, wait_s=TIMEOUT_S), inside.inside():
            await holding.put(release)
            await release.wait()

    async with asyncio.timeout(TIMEOUT_S), asyncio.TaskGroup() as group:
        for _ in range(total):
            group.create_task(holder())
        for released in range(total):
            # Every free slot is taken before the next release: the limit is reached, never passed.
            await eventually(lambda n=released: inside.current == min(limit, total - n), TIMEOUT_S)
            # Leases in Redis: taken before a holder counts itself in, released after it counts itself out.
            assert inside.current <= len(await _holders(redis, redis_prefix, SR_A)) <= limit
            (await holding.get()).set()
    assert inside.peak == limit
    assert await _holders(redis, redis_prefix, SR_A) == []


async def test_two_srs_are_independent(redis: aioredis.Redis, redis_prefix: str) -> None:
    async with held(_slots(redis, redis_prefix, SR_A)):
        with pytest.raises(OperationPending):
            async with _slots(redis, redis_prefix, SR_A):
                pass
        async with _slots(redis, redis_prefix, SR_B) as other:
            assert await _holders(redis, redis_prefix, SR_B) == [other.token]


@pytest.mark.parametrize("full", [SR_A, SR_B])
async def test_a_pair_waits_while_either_sr_is_full_and_takes_both_at_once(
    redis: aioredis.Redis, redis_prefix: str, full: str
) -> None:
    async with held(_slots(redis, redis_prefix, full)) as release:
        [blocker] = await _holders(redis, redis_prefix, full)
        with pytest.raises(OperationPending):
            async with _slots(redis, redis_prefix, SR_A, SR_B):
                pass
        # All or nothing: the free SR got no lease either.
        assert await _holders(redis, redis_prefix, SR_A) + await _holders(redis, redis_prefix, SR_B) == [blocker]
        pair = _slots(redis, redis_prefix, SR_A, SR_B, wait_s=TIMEOUT_S)
        waiting = asyncio.create_task(pair.__aenter__())
        release.set()  # the blocker leaves; the waiting pair gets both slots
        async with asyncio.timeout(TIMEOUT_S):
            await waiting
        try:
            assert await _holders(redis, redis_prefix, SR_A) == [pair.token]
            assert await _holders(redis, redis_prefix, SR_B) == [pair.token]
        finally:
            await pair.__aexit__(None, None, None)
    assert await _holders(redis, redis_prefix, SR_A) + await _holders(redis, redis_prefix, SR_B) == []


async def test_pairs_sharing_an_sr_count_against_it(redis: aioredis.Redis, redis_prefix: str) -> None:
    # limit 1: A->B holds A and B, so B->C must wait (B is full) while C->D... is free.
    async with held(_slots(redis, redis_prefix, SR_A, SR_B)):
        with pytest.raises(OperationPending):
            async with _slots(redis, redis_prefix, SR_B, SR_C):
                pass
        async with _slots(redis, redis_prefix, SR_C, "sr-d"):
            pass


async def test_a_release_wakes_a_waiter_at_once_not_at_the_end_of_its_backoff(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    async with held(_slots(redis, redis_prefix, SR_A)) as release:
        # A backoff of 60 s between tries: only the release's doorbell can let this waiter in within the test.
        waiter = SrSlots(redis, redis_prefix, [SR_A, SR_B], limit=1, lease_s=LEASE_S, wait_s=120,
                         delays_s=itertools.repeat(60.0))
        task = asyncio.create_task(waiter.__aenter__())
        await eventually(lambda: _a_call_is_held(redis), TIMEOUT_S)  # the waiter dozes in BLPOP
        release.set()
        await asyncio.wait({task}, timeout=TIMEOUT_S)
    assert task.done()
    task.result()
    try:
        assert await _holders(redis, redis_prefix, SR_A) == [waiter.token]
    finally:
        await waiter.__aexit__(None, None, None)


async def test_a_release_rings_each_sr_once_and_the_doorbell_expires(redis: aioredis.Redis, redis_prefix: str) -> None:
    for _ in range(3):  # three releases with nobody waiting: at most ``limit`` rings are kept
        async with _slots(redis, redis_prefix, SR_A, SR_B, limit=2, lease_s=5):
            pass
    for sr_id in (SR_A, SR_B):
        doorbell = sr_doorbell_key(redis_prefix, sr_id)
        assert await redis.llen(doorbell) == 2
        assert 0 < await redis.pttl(doorbell) <= 5000


async def test_a_vanished_holders_lease_expires_and_its_slot_is_reclaimed(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    gone = _slots(redis, redis_prefix, SR_A, lease_s=1.0)
    await gone.__aenter__()
    heartbeat = gone._heartbeat  # the holder's process dies: no heartbeat, no release
    assert heartbeat is not None
    heartbeat.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await heartbeat
    with pytest.raises(OperationPending):  # still leased
        async with _slots(redis, redis_prefix, SR_A):
            pass
    async with _slots(redis, redis_prefix, SR_A, wait_s=TIMEOUT_S) as successor:
        assert await _holders(redis, redis_prefix, SR_A) == [successor.token]  # the expired lease was dropped
        assert successor.waited_s > 0


async def test_a_live_holders_heartbeat_keeps_its_lease_past_the_lease_time(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    lease_s = 0.3
    async with held(_slots(redis, redis_prefix, SR_A, lease_s=lease_s)):
        key = sr_slots_key(redis_prefix, SR_A)
        [(token, first_expiry_ms)] = await redis.zrange(key, 0, -1, withscores=True)

        async def extended_twice_over() -> bool:
            score = await redis.zscore(key, token)
            return score is not None and score > first_expiry_ms + 2 * lease_s * 1000

        await eventually(extended_twice_over, TIMEOUT_S)  # the first lease ran out long ago: not reclaimable
        with pytest.raises(OperationPending):
            async with _slots(redis, redis_prefix, SR_A):
                pass
        ttl_ms = await redis.pttl(key)
        assert 0 < ttl_ms <= lease_s * 1000  # the set itself expires with its last lease


async def test_a_heartbeat_puts_back_a_lease_redis_lost(redis: aioredis.Redis, redis_prefix: str) -> None:
    async with held(_slots(redis, redis_prefix, SR_A, SR_B, lease_s=0.3)):
        [token] = await _holders(redis, redis_prefix, SR_A)
        await redis.delete(sr_slots_key(redis_prefix, SR_A), sr_slots_key(redis_prefix, SR_B))  # restarted empty

        async def restored() -> bool:
            return (await _holders(redis, redis_prefix, SR_A) == [token]
                    and await _holders(redis, redis_prefix, SR_B) == [token])

        await eventually(restored, TIMEOUT_S)


async def test_cancelling_a_holder_releases_its_slots(redis: aioredis.Redis, redis_prefix: str) -> None:
    entered = asyncio.Event()

    async def hold_forever() -> None:
        async with _slots(redis, redis_prefix, SR_A, SR_B):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold_forever())
    async with asyncio.timeout(TIMEOUT_S):
        await entered.wait()
    assert len(await _holders(redis, redis_prefix, SR_A)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _holders(redis, redis_prefix, SR_A) + await _holders(redis, redis_prefix, SR_B) == []


class LosesCancellations(aioredis.Redis):
    """A real client that, like redis-py on Python 3.11, may return normally from a call during which its task was
    cancelled: redis-py writes under ``asyncio.wait_for``, which can drop a cancellation that lands as the inner
    write completes (python/cpython#86296, fixed in 3.12). Here every cancellation during ``eval`` is dropped
    (the call completes, the task's ``cancelling()`` count stays raised), so the race is hit every time."""

    async def eval(self, *args: Any) -> Any:  # type: ignore[override]
        call = asyncio.ensure_future(super().eval(*args))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            return await call


@contextlib.asynccontextmanager
async def paused_writes(redis: aioredis.Redis, pause_ms: int = 400) -> AsyncIterator[None]:
    """Redis holds every write (scripts included) for ``pause_ms``: a call started now is in flight that long."""
    await redis.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
    try:
        yield
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")


async def _a_call_is_held(redis: aioredis.Redis) -> bool:
    return int((await redis.info("clients"))["blocked_clients"]) >= 1


async def test_leaving_ends_the_heartbeat_even_if_its_redis_call_drops_the_cancellation(
    redis: aioredis.Redis, redis_server: RedisEndpoint, redis_prefix: str
) -> None:
    lossy = LosesCancellations.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        slots = _slots(lossy, redis_prefix, SR_A, lease_s=0.3)
        async with held(slots) as release:
            heartbeat = slots._heartbeat
            assert heartbeat is not None
            async with paused_writes(redis):
                await eventually(lambda: _a_call_is_held(redis), TIMEOUT_S)  # the heartbeat is inside eval
                release.set()  # leave now: the heartbeat is cancelled mid-call and that call drops it
                await eventually(lambda: heartbeat.cancelling() > 0, TIMEOUT_S)
        # held() awaited the holder: its heartbeat ended and its slot was released.
        assert await _holders(redis, redis_prefix, SR_A) == []
    finally:
        await lossy.aclose()


async def test_leaving_while_the_heartbeat_sleeps_releases_and_the_heartbeat_never_puts_the_lease_back(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    slots = _slots(redis, redis_prefix, SR_A)  # a beat every 10 s: asleep when the holder leaves
    async with slots:
        heartbeat = slots._heartbeat
        assert heartbeat is not None
    assert await _holders(redis, redis_prefix, SR_A) == []  # released by the exit itself
    await asyncio.wait({heartbeat}, timeout=TIMEOUT_S)
    assert heartbeat.cancelled()  # it ended in its sleep: no extend came after the release
    assert await _holders(redis, redis_prefix, SR_A) == []
    async with _slots(redis, redis_prefix, SR_A):  # the next holder takes the slot without waiting (wait_s 0)
        pass


async def test_a_waiter_cancelled_during_a_redis_call_that_drops_it_still_stops(
    redis: aioredis.Redis, redis_server: RedisEndpoint, redis_prefix: str
) -> None:
    lossy = LosesCancellations.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        async with held(_slots(redis, redis_prefix, SR_B)):
            waiter = _slots(lossy, redis_prefix, SR_A, SR_B, wait_s=TIMEOUT_S)
            async with paused_writes(redis):
                task = asyncio.create_task(waiter.__aenter__())
                await eventually(lambda: _a_call_is_held(redis), TIMEOUT_S)  # the waiter is inside eval
                task.cancel()
            # Not TIMEOUT_S: a waiter that missed its cancellation would wait that long for SR B.
            await asyncio.wait({task}, timeout=5)
            assert task.cancelled()
        assert await _holders(redis, redis_prefix, SR_A) + await _holders(redis, redis_prefix, SR_B) == []
    finally:
        await lossy.aclose()


async def test_cancelling_a_waiter_leaves_nothing_behind(redis: aioredis.Redis, redis_prefix: str) -> None:
    async with held(_slots(redis, redis_prefix, SR_B)):
        [blocker] = await _holders(redis, redis_prefix, SR_B)
        # An expired lease on SR A: the waiter's first try drops it (then finds SR B full), which shows it ran.
        await redis.zadd(sr_slots_key(redis_prefix, SR_A), {"ghost": 1})
        waiter = _slots(redis, redis_prefix, SR_A, SR_B, wait_s=TIMEOUT_S)
        task = asyncio.create_task(waiter.__aenter__())

        async def tried() -> bool:
            return task.done() or await _holders(redis, redis_prefix, SR_A) == []

        await eventually(tried, TIMEOUT_S)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _holders(redis, redis_prefix, SR_A) == []
        assert await _holders(redis, redis_prefix, SR_B) == [blocker]
        async with _slots(redis, redis_prefix, SR_A):  # SR A was never taken by the cancelled waiter
            pass


async def test_the_wait_is_bounded_by_wait_s(redis: aioredis.Redis, redis_prefix: str) -> None:
    loop = asyncio.get_running_loop()
    async with held(_slots(redis, redis_prefix, SR_A)):
        started = loop.time()
        with pytest.raises(OperationPending) as raised:
            async with _slots(redis, redis_prefix, SR_A, SR_B, wait_s=0.5):
                pass
        elapsed_s = loop.time() - started
    assert 0.5 <= elapsed_s < 0.5 + 1.0  # retried until wait_s, then gave up (last backoff cut to the deadline)
    assert raised.value.retryable  # the consumer hands the job back to the queue
    assert SR_A in raised.value.message


# -- the migrator ------------------------------------------------------------------------------------------


def _request(disk_name: str, vdi_id: str) -> MigrationRequested:
    return MigrationRequested(
        job_id=messages.new_job_id(), disk_name=disk_name, volume_id="name:x", vdi_id_seen=vdi_id, tag=TAG,
        vm_id=VM_A2, host_id=HOST_A2, pool_id=POOL_A, requested_at=messages.utc_now(), correlation_id="c-1",
    )


async def test_the_handler_holds_a_slot_on_source_and_target_during_the_copy_only(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    sim = await start_simulator(two_hosts(), admin=True, migration_rate_bps=2 * GiB)  # the 2 GiB copy: ~1 s
    xo = XoClient.from_settings(sim_settings(sim))
    settings = MigratorSettings(lock_ttl_s=3, lock_wait_s=1, migrate_timeout_s=30, per_sr_limit=1, sr_slot_wait_s=0.3)
    deps = handler_deps(settings, xo, redis, redis_prefix)
    try:
        [vdi] = vdis_named(sim)
        request = _request(DISK, vdi["id"])
        async with held(_slots(redis, redis_prefix, SR_A2)):  # another migration to Local A2 runs
            with pytest.raises(OperationPending):
                await handle(request, deps)
            [still] = vdis_named(sim)
            # Not copied, and the mark it waited under was taken back when it gave up.
            assert (still["$SR"], still["name_description"]) == (SR_A1, DESCRIPTION)
            assert sim.simulator.stats.migrations[DISK] == 0
        task = asyncio.create_task(handle(request, deps))

        def copying_under_both_slots() -> bool:
            return any(v.get("current_operations") for v in vdis_named(sim))

        await eventually(copying_under_both_slots, TIMEOUT_S)
        [a1], [a2] = await _holders(redis, redis_prefix, SR_A1), await _holders(redis, redis_prefix, SR_A2)
        assert a1 == a2 and a1.startswith(f"{DISK}:")
        async with asyncio.timeout(TIMEOUT_S):
            result = await task
        assert (result.outcome, result.sr_id) == ("succeeded", SR_A2)
        assert await _holders(redis, redis_prefix, SR_A1) + await _holders(redis, redis_prefix, SR_A2) == []
    finally:
        await xo.close()
        await sim.stop()


async def test_a_job_waits_for_its_sr_slot_with_the_disk_marked_and_copies_once_the_slot_frees(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    sim = await start_simulator(two_hosts(), admin=True, migration_rate_bps=4 * GiB)
    xo = XoClient.from_settings(sim_settings(sim))
    settings = MigratorSettings(lock_ttl_s=3, lock_wait_s=1, migrate_timeout_s=30, per_sr_limit=1,
                                sr_slot_wait_s=TIMEOUT_S)
    deps = handler_deps(settings, xo, redis, redis_prefix)
    try:
        [vdi] = vdis_named(sim)
        assert await xo.get_vdi(vdi["id"]) is not None  # connected: the job's notifications start complete
        calls = sim.simulator.stats.calls.copy()
        async with held(_slots(redis, redis_prefix, SR_A2)) as release:  # another migration to Local A2 runs
            task = asyncio.create_task(handle(_request(DISK, vdi["id"]), deps))

            def marked() -> bool:
                [now] = vdis_named(sim)
                info = vdi_metadata.parse(now["name_description"])
                return info is not None and info.in_progress_to_sr == SR_A2

            # An attach of the disk elsewhere now answers "being migrated" (services/csi_frontend/stale_marks.py).
            await eventually(marked, TIMEOUT_S)
            assert not task.done()
            assert sim.simulator.stats.migrations[DISK] == 0
            release.set()
        async with asyncio.timeout(TIMEOUT_S):
            result = await task
        assert (result.outcome, result.sr_id) == ("succeeded", SR_A2)
        [moved] = vdis_named(sim)
        assert (moved["$SR"], vdi_metadata.parse(moved["name_description"])) == (SR_A2, vdi_metadata.parse(DESCRIPTION))
        assert sim.simulator.stats.migrations[DISK] == 1
        # The disk and the SRs read, the mark, the copy, the mark cleared: the mark it waited under counts as the
        # job's own write, so nothing is read again after the wait.
        made = {m: n - calls.get(m, 0) for m, n in sim.simulator.stats.calls.items() if n != calls.get(m, 0)}
        assert made == {"xo.getAllObjects": 2, "vdi.set": 2, "vdi.migrate": 1}
    finally:
        await xo.close()
        await sim.stop()


async def test_without_a_limit_the_handler_takes_no_slot(redis: aioredis.Redis, redis_prefix: str) -> None:
    sim = await start_simulator(two_hosts(), admin=True, migration_rate_bps=4 * GiB)
    xo = XoClient.from_settings(sim_settings(sim))
    deps = handler_deps(MigratorSettings(lock_ttl_s=3, lock_wait_s=1, migrate_timeout_s=30), xo, redis, redis_prefix)
    try:
        [vdi] = vdis_named(sim)
        async with held(_slots(redis, redis_prefix, SR_A2)):  # with a limit of 1 this copy would have to wait
            async with asyncio.timeout(TIMEOUT_S):
                result = await handle(_request(DISK, vdi["id"]), deps)
            assert (result.outcome, result.sr_id) == ("succeeded", SR_A2)
            assert [h.split(":")[0] for h in await _holders(redis, redis_prefix, SR_A2)] == ["test"]
        assert await _holders(redis, redis_prefix, SR_A1) == []
        assert sim.simulator.stats.migrations[DISK] == 1
    finally:
        await xo.close()
        await sim.stop()


async def _limited_worker(env: Env, name: str, limit: int) -> Worker:
    """A migrator built like every other, with the per-SR limit set."""
    return await env.worker(name, per_sr_limit=limit, sr_slot_wait_s=TIMEOUT_S)


async def test_workers_under_the_limit_never_meet_xos_storage_migration_cap(
    amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str
) -> None:
    disks = [f"csi-herd{n}" for n in range(4)]
    extra: tuple[dict[str, Any], ...] = tuple(
        {"name_label": d, "name_description": DESCRIPTION, "size": "256MiB", "sr": "Local A1"} for d in disks)
    async with open_env(amqp_vhost, redis_server, redis_prefix, topology=two_hosts(extra_vdis=extra),
                        migration_rate_bps=GiB, max_storage_migrations=1) as env:
        for n in range(3):
            await _limited_worker(env, f"w{n}", limit=1)
        for disk in disks:
            await env.submit(disk)

        async def all_finished() -> bool:
            return all([await env.finished(d) for d in disks])

        await eventually(all_finished, TIMEOUT_S * 2, interval_s=0.05)
        for disk in disks:
            record = await env.finished(disk)
            assert record is not None and record.state == "succeeded", record
            assert env.sim.simulator.stats.migrations[disk] == 1
        assert env.sim.simulator.stats.errors.get("TOO_MANY_STORAGE_MIGRATES", 0) == 0
