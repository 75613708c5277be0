"""Migration marks left behind (issue 10 item 5): m4rCsi's ``inProgressToSRUUID`` (or ours from a crashed worker)
with no live job is cleared after a bounded time, so an attach stops answering ABORTED; while a job is live (an
active record in Redis, or XO copying the disk) the mark is respected. Frontend on real RabbitMQ and Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from dev.wait import eventually
from services.xo_simulator.topology import derived_id
from shared import messages, vdi_metadata
from shared.errors import OperationPending
from shared.jobs import JobRecord
from shared.messages import MigrationRequested
from shared.volume_id import by_name
from tests.support.brokers import RedisEndpoint
from tests.support.migration import DISK, HOST_A2, POOL_A, SR_A1, SR_A2, TAG, VM_A2, Env, open_env, vdis_named

VM_A1 = derived_id("vm", "Pool A", "host-a1", "node-a1")
CLEAR_AFTER_S = 1.5
# A mark m4rCsi left when its vdi.migrate failed, with a field of its own this driver does not know.
M4RCSI_MARKED = ('csi:info: {"migrating":{"enabled":true,"inProgressToSRUUID":"' + SR_A2 + '","since":"x"},'
                 '"srsWithTag":"k8s-migrating"}')


@pytest.fixture
async def marked(amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str) -> AsyncIterator[Env]:
    """The disk on Local A1 (usable from node-a1) marked as migrating to Local A2; no worker runs."""
    async with open_env(amqp_vhost, redis_server, redis_prefix,
                        frontend={"stale_mark_after_s": CLEAR_AFTER_S}) as env:
        [vdi] = vdis_named(env.sim)
        await env.frontend.xo.set_vdi(vdi["id"], name_description=M4RCSI_MARKED)
        yield env


async def _publish_until_ok(env: Env, timeout_s: float) -> tuple[dict[str, str], int]:
    """Publish to node-a1 as the attacher retries ABORTED; (context, how many ABORTED answers came first)."""
    aborted = 0

    async def attempt() -> dict[str, str] | None:
        nonlocal aborted
        try:
            return await env.attacher.publish(by_name("vol1"), VM_A1, False, deadline_s=10)
        except OperationPending:
            aborted += 1
            return None

    context = await eventually(attempt, timeout_s, 0.2, description="publish answered OK")
    return context, aborted


async def test_a_mark_no_job_backs_is_cleared_after_the_bound_and_the_attach_goes_on(marked: Env) -> None:
    started = time.monotonic()
    context, aborted = await _publish_until_ok(marked, 10)
    assert aborted >= 1 and time.monotonic() - started >= CLEAR_AFTER_S  # respected for the bound, no longer
    [vdi] = vdis_named(marked.sim)
    assert vdi["$SR"] == SR_A1 and context["vbd"] in vdi["$VBDs"]
    # the mark is gone, every other field (m4rCsi's own included) kept
    assert vdi["name_description"] == ('csi:info: {"migrating":{"enabled":true,"since":"x"},'
                                       '"srsWithTag":"k8s-migrating"}')
    assert vdi_metadata.parse(vdi["name_description"]) == vdi_metadata.StorageInfo(TAG, None, True, None)


async def test_a_mark_a_live_job_backs_is_respected(marked: Env) -> None:
    [vdi] = vdis_named(marked.sim)
    request = MigrationRequested(
        job_id=messages.new_job_id(), disk_name=DISK, volume_id="name:vol1", vdi_id_seen=vdi["id"], tag=TAG,
        vm_id=VM_A2, host_id=HOST_A2, pool_id=POOL_A, requested_at=messages.utc_now(), correlation_id="c-1")
    record, created = await marked.jobs.create_or_join(request)  # a job queued (by another replica): live
    assert created
    respected_until = time.monotonic() + 2 * CLEAR_AFTER_S

    async def still_refused() -> bool:
        with pytest.raises(OperationPending, match=f"being migrated to SR {SR_A2} \\(job {record.job_id} is queued"):
            await marked.attacher.publish(by_name("vol1"), VM_A1, False, deadline_s=10)
        return time.monotonic() >= respected_until

    await eventually(still_refused, 10, 0.2, description="the mark respected past the bound while the job lives")
    await marked.jobs.abandon(DISK, record.job_id)  # the job is gone: the bound starts now
    _, aborted = await _publish_until_ok(marked, 10)
    assert aborted >= 1
    [vdi] = vdis_named(marked.sim)
    assert '"inProgressToSRUUID"' not in vdi["name_description"]


async def test_a_marked_disk_s_migration_goes_on_from_what_settling_read(marked: Env) -> None:
    """The XO calls of one migration of a marked disk (the worker's alone, counted by the simulator): the mark
    makes the worker settle first, and the VDIs settle read are the ones it goes on from, not read again."""
    worker = await marked.worker("w1")
    assert worker.migrator.inventory is not None
    await worker.migrator.inventory.srs()  # the SRs loaded (the worker warms them at start): not counted below
    stats = marked.sim.simulator.stats
    stats.reset()
    await marked.submit()

    async def ended() -> JobRecord | None:
        return await marked.finished()

    record = await eventually(ended, 20, 0.05, description="the migration ended")
    assert record.state == "succeeded", record
    # reads: the disk's VDIs (a mark: settle first), settle's two (~incoming, the disk's VDIs: the ones the worker
    # goes on from, not read again), then, no ~incoming found for a marked disk, XO's view (server.getAll, the pools
    # shown) and ~incoming once more (absent is not deleted: its pool may be lost); the SRs come from the inventory
    assert dict(stats.calls) == {"xo.getAllObjects": 5, "server.getAll": 1, "vdi.set": 2, "vdi.migrate": 1}
