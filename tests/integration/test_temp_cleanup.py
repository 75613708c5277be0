"""The temporary-disk cleanup (issue 10 item 4) against the simulator and real Redis: it never touches a disk
CreateVolume holds or has just renamed (the volume's lock and a re-read), one replica runs it (a Redis lease), and
no error ends it. The m4rCsi timing itself is in tests/unit/xo/test_temp_cleanup.py."""

from __future__ import annotations

import asyncio
from typing import cast

import redis.asyncio as aioredis

from dev.wait import eventually
from services.csi_frontend.temp_cleanup import MARK_PREFIX, TempCleanup, run_forever
from shared import vdi_metadata
from shared.csi import csi_pb2
from shared.errors import BackendUnavailable
from shared.locks import Lease
from shared.units import MiB
from shared.xo.errors import XoError
from tests.support.brokers import RedisEndpoint
from tests.support.capabilities import mount_capability
from tests.support.controller import Context, Controller
from tests.support.sim import SR_NFS_A

CAP = mount_capability()


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _cleanup(ctl: Controller, clock: Clock) -> TempCleanup:
    return TempCleanup(ctl.frontend.xo, "csi-", ctl.frontend.locks, clock=clock)


async def _create_volume(ctl: Controller, name: str) -> str:
    response = await ctl.servicer.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB), volume_capabilities=[CAP],
        parameters={"srsWithTag": "k8s-shared"}), Context())  # type: ignore[arg-type]
    return str(response.volume.volume_id)


async def test_a_temp_disk_create_volume_just_renamed_is_not_marked(ctl: Controller) -> None:
    """The race of issue 10: the cleanup lists a leftover temporary disk it has seen for 10 minutes; CreateVolume
    (a retry) then reuses it, describing and renaming it; the cleanup acts on its stale listing. Before, it marked
    the renamed disk, overwriting its csi:info (a migrating volume silently stopped migrating). Now it re-reads the
    disk under the volume's lock and leaves it alone."""
    leftover = await ctl.xo.create_disk("csi-temp-pvc-race", 64 * MiB, SR_NFS_A)
    clock = Clock()
    cleanup = _cleanup(ctl, clock)
    await cleanup.sweep()  # first seen
    clock.now_s = 601
    (listed,) = await cleanup.scan()
    handle = await _create_volume(ctl, "pvc-race")
    assert handle == leftover  # CreateVolume reused the leftover disk
    assert not await cleanup.consider(listed)
    vdi = await ctl.xo.get_vdi(leftover)
    assert vdi is not None and vdi.name_label == "csi-pvc-race"
    info = vdi_metadata.parse(vdi.name_description)
    assert info is not None and info.srs_with_tag == "k8s-shared"  # its csi:info, not a deletion mark
    assert await cleanup.sweep() == [] and await cleanup.scan() == []


async def test_a_temp_disk_whose_create_volume_holds_the_lock_is_left_alone(ctl: Controller) -> None:
    leftover = await ctl.xo.create_disk("csi-temp-pvc-busy", 64 * MiB, SR_NFS_A)
    clock = Clock()
    cleanup = _cleanup(ctl, clock)
    await cleanup.sweep()
    clock.now_s = 601
    async with ctl.frontend.locks.hold("csi-pvc-busy", deadline_s=None):  # what CreateVolume of pvc-busy holds
        await cleanup.sweep()
    vdi = await ctl.xo.get_vdi(leftover)
    assert vdi is not None and vdi.name_description == ""
    await cleanup.sweep()  # released: now marked (seen unchanged for 10 minutes)
    vdi = await ctl.xo.get_vdi(leftover)
    assert vdi is not None and vdi.name_description.startswith(MARK_PREFIX)


async def test_one_replica_runs_the_cleanup_the_one_holding_the_lease(redis_server: RedisEndpoint,
                                                                       redis_prefix: str) -> None:
    redis = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        first = Lease(redis, redis_prefix, "temp-cleanup", ttl_s=0.5, holder="replica-1")
        second = Lease(redis, redis_prefix, "temp-cleanup", ttl_s=0.5, holder="replica-2")
        assert await first.renew() and not await second.renew()
        assert await first.renew()  # renewing its own
        await first.release()
        assert await second.renew() and not await first.renew()
        # a holder that stops renewing (crashed) loses the lease after its TTL
        await eventually(first.renew, 5, 0.05, description="the lease of a silent holder expired")
    finally:
        await redis.aclose()


class Passes:
    """A cleanup stand-in counting its passes, failing the first ones as a broken XO or a bug would."""

    def __init__(self, *failures: Exception) -> None:
        self.count = 0
        self._failures = list(failures)

    async def sweep(self) -> list[str]:
        self.count += 1
        if self._failures:
            raise self._failures.pop(0)
        return []


async def test_the_cleanup_task_survives_any_error_and_keeps_its_schedule(redis_server: RedisEndpoint,
                                                                           redis_prefix: str) -> None:
    redis = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    leader = Lease(redis, redis_prefix, "temp-cleanup", ttl_s=5, holder="replica-1")
    follower = Lease(redis, redis_prefix, "temp-cleanup", ttl_s=5, holder="replica-2")
    mine = Passes(XoError("XO sent garbage"), BackendUnavailable("XO is down"), RuntimeError("a bug"))
    theirs = Passes()
    tasks = [asyncio.create_task(run_forever(cast(TempCleanup, mine), interval_s=0.05, lease=leader))]
    try:
        await eventually(lambda: mine.count >= 5, 10, description="passes go on after errors")
        tasks.append(asyncio.create_task(run_forever(cast(TempCleanup, theirs), interval_s=0.05, lease=follower)))
        await eventually(lambda: mine.count >= 10, 10, description="the leader keeps running")
        assert theirs.count == 0  # the other replica never ran a pass while the lease was held
        tasks[0].cancel()
        await eventually(lambda: theirs.count >= 1, 10, description="the leader gave the lease up when it stopped")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        await redis.aclose()
