"""Attach-time migration end to end over gRPC, everything as separate processes as in production: the XO
simulator (real data mode), the controller, a node plugin per node VM and N migrators, on the session's
RabbitMQ (a vhost per test) and Redis (a key prefix per test).

The seed's story (a volume follows its pod from host A to host B and back, data intact, one copy per move);
20 volumes published at once to the other host (one copy each, nothing left in Redis or the queues). Moves
across pools (shared SRs of two pools): tests/e2e/test_cross_pool_e2e.py. Publishes are sent as external-attacher
sends them: 300 s timeout, ABORTED/UNAVAILABLE retried.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from dev.brokers import RabbitEndpoint, RedisEndpoint
from dev.wait import eventually
from shared import messages
from shared.keys import disk_last_job_key
from shared.units import MiB
from tests.support.e2e import (
    MIGRATING,
    create,
    host_segment,
    migration_mark,
    migrations_of,
    mounted,
    publish,
    queue_contents,
    redis_keys,
    sha256_of,
    sim_stats,
    srs_of,
    stack_on_session_brokers,
    unpublish,
    vhost_of,
    write_file,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(150),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="needs losetup (util-linux) for real data mode"),
]

@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        reason = "migration e2e needs root: the simulator attaches loop devices and the node mounts filesystems"
        print(reason)
        pytest.skip(reason)


# --- the tests ---------------------------------------------------------------------------------------------


async def test_volume_follows_its_pod_to_the_other_host_and_back_with_its_data(
        root: None, tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> None:
    """The seed's story on local SRs: one copy per move, to the tagged SR of the node's host, data intact."""
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=2,
                                        host_topology=True) as stack:
        disk = "csi-pvc-roam"
        volume_id = await create(stack, "pvc-roam", 64 * MiB, MIGRATING, await host_segment(stack, "node-a1"))
        assert volume_id == "name:pvc-roam"
        assert await srs_of(stack, disk) == ["Local A1"]  # WaitForFirstConsumer: placed on node-a1's host

        ctx = await publish(stack, volume_id, "node-a1")
        assert await migrations_of(stack, disk) == 0  # already usable there: attach only
        async with mounted(stack, "node-a1", volume_id, ctx) as target:
            first = await asyncio.to_thread(write_file, target / "first.bin", 8 * MiB)
        await unpublish(stack, volume_id, "node-a1")

        ctx = await publish(stack, volume_id, "node-a2")
        assert await srs_of(stack, disk) == ["Local A2"]
        assert await migrations_of(stack, disk) == 1
        assert await migration_mark(stack, disk) is None
        async with mounted(stack, "node-a2", volume_id, ctx) as target:
            assert await asyncio.to_thread(sha256_of, target / "first.bin") == first
            second = await asyncio.to_thread(write_file, target / "second.bin", 4 * MiB)
        await unpublish(stack, volume_id, "node-a2")

        ctx = await publish(stack, volume_id, "node-a1")
        assert await srs_of(stack, disk) == ["Local A1"]
        assert await migrations_of(stack, disk) == 2
        async with mounted(stack, "node-a1", volume_id, ctx) as target:
            assert await asyncio.to_thread(sha256_of, target / "first.bin") == first
            assert await asyncio.to_thread(sha256_of, target / "second.bin") == second
        # a repeated publish to where it is answers the same context, without a copy
        assert await publish(stack, volume_id, "node-a1") == ctx
        assert await migrations_of(stack, disk) == 2


async def test_twenty_volumes_published_at_once_each_migrate_exactly_once_and_leave_nothing_behind(
        root: None, tmp_path: Path, amqp_vhost: str, rabbitmq: RabbitEndpoint, redis_server: RedisEndpoint,
        redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_JOB_RESULT_TTL_S", "2")  # finished job records expire soon after the test's publishes
    monkeypatch.setenv("MIGRATOR_JOB_RESULT_TTL_S", "2")
    count = 20
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=3,
                                        host_topology=True) as stack:
        on_a1 = await host_segment(stack, "node-a1")
        names = [f"pvc-herd-{n:02d}" for n in range(count)]
        volume_ids = [await create(stack, name, 16 * MiB, MIGRATING, on_a1) for name in names]
        vdis = Counter(vdi.name_label for vdi in await stack.xo.find_vdis())
        assert all(vdis[f"csi-{name}"] == 1 for name in names)

        contexts = await asyncio.gather(*(publish(stack, volume_id, "node-a2") for volume_id in volume_ids))
        assert all(ctx["device"] and ctx["vbd"] for ctx in contexts)
        assert len({ctx["device"] for ctx in contexts}) == count  # 20 distinct devices on node-a2

        stats = await sim_stats(stack)
        assert {f"csi-{name}": 1 for name in names} == {d: n for d, n in stats["migrations"].items()}
        vdis = Counter(vdi.name_label for vdi in await stack.xo.find_vdis())
        assert [name for name, n in vdis.items() if n > 1] == []
        assert [await srs_of(stack, f"csi-{name}") for name in names] == [["Local A2"]] * count

        await eventually(lambda: _nothing_under(redis_server, redis_prefix, [f"csi-{name}" for name in names]), 30,
                         0.2, description=f"no lock or job record under {redis_prefix} once the results expired")
        vhost = vhost_of(amqp_vhost)
        for queue in (messages.JOBS_QUEUE, messages.DEAD_LETTER_QUEUE):
            await eventually(functools.partial(_empty, rabbitmq, vhost, queue), 30, 0.5,
                             description=f"{queue} empty")


async def _nothing_under(redis: RedisEndpoint, prefix: str, disks: list[str]) -> bool:
    """Nothing but each disk's last finished job (kept for days on purpose: shared/jobs.py)."""
    keys = await redis_keys(redis, prefix)
    assert sorted(keys) == sorted(disk_last_job_key(prefix, disk) for disk in disks), keys
    return True


async def _empty(rabbit: RabbitEndpoint, vhost: str, queue: str) -> bool:
    counted, got = await asyncio.to_thread(queue_contents, rabbit, vhost, queue)
    assert (counted, got) == (0, 0), f"{queue}: {counted} counted, {got} fetched"
    return True
