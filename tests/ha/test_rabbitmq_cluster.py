"""Clustered RabbitMQ (issue 14 item 1): the migration queues are quorum queues replicated on all three nodes,
and a node killed (kill -9) while jobs are queued and running loses no job and runs none twice: every attach
completes, XO copies each disk once, and the services carry on connected to the survivors.

The whole stack runs as separate processes (XO simulator, controller, two migrators) on a vhost of the cluster,
with AMQP_URL naming the three nodes; Redis is the session's, under this test's key prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from dev.ha import LocalRabbitCluster
from dev.stack import Stack, StackOptions, running_stack
from dev.wait import eventually
from shared import broker, messages
from tests.support.brokers import RedisEndpoint
from tests.support.e2e import copying, sim_stats, vhost_of
from tests.support.ha import each_moved_exactly_once, publish_all, volumes_on_a1

pytestmark = [pytest.mark.ha, pytest.mark.e2e, pytest.mark.timeout(240)]

MIGRATION_RATE = "16MiB"  # a 64 MiB disk copies in 4 s: a wide window with copies running and jobs waiting
VOLUMES = 8  # two migrators with two slots each: four copies at once, four jobs waiting
QUEUES = (messages.JOBS_QUEUE, messages.DEAD_LETTER_QUEUE)
# Short heartbeats, so that a job whose worker lost its broker is noticed in seconds (as in the fault tests).
MIGRATOR_ENV = {"MIGRATOR_JOB_HEARTBEAT_S": "1", "MIGRATOR_STALE_AFTER_S": "4", "MIGRATOR_REAPER_INTERVAL_S": "1",
                "MIGRATOR_LOCK_TTL_S": "3", "MIGRATOR_RETRY_BACKOFF_MAX_S": "2"}


async def _declared_on(cluster: LocalRabbitCluster, vhost: str, index: int) -> None:
    """The topology declared through node ``index`` alone: the quorum queues' leaders start there."""
    connection = await aio_pika.connect(cluster.endpoint(index).vhost_url(vhost), timeout=10)
    async with connection:
        await broker.declare(await connection.channel())


async def _ready(amqp_url: str, queue: str) -> int:
    """Messages ready in ``queue`` now (a passive declare through whichever node answers; no statistics lag)."""
    connection = await broker.connect(amqp_url, name="ha-test-probe", timeout_s=10)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def _stack(tmp_path: Path, amqp_url: str, redis: RedisEndpoint, prefix: str) -> AsyncIterator[Stack]:
    options = StackOptions(migrators=2, real_data=False, nodes=False, amqp_url=amqp_url, redis_url=redis.url,
                           redis_prefix=prefix, sim_args=("--migration-rate", MIGRATION_RATE),
                           migrator_args=("--concurrency", "2"))
    with pytest.MonkeyPatch.context() as env:
        for name, value in MIGRATOR_ENV.items():
            env.setenv(name, value)
        async with running_stack(tmp_path, options) as stack:
            yield stack


async def test_the_migration_queues_are_quorum_queues_on_all_three_nodes(rabbit_cluster: LocalRabbitCluster,
                                                                        cluster_vhost: str) -> None:
    vhost = vhost_of(cluster_vhost)
    assert len(rabbit_cluster.running_nodes(via=0)) == 3
    connection = await broker.connect(cluster_vhost, name="ha-declare", timeout_s=10)
    try:
        await broker.declare(await connection.channel())
    finally:
        await connection.close()
    nodes = sorted(node.node_name for node in rabbit_cluster.nodes)
    for queue in QUEUES:
        seen = await asyncio.to_thread(rabbit_cluster.queue, vhost, queue, 2)
        assert (seen["type"], sorted(seen["members"]), sorted(seen["online"])) == ("quorum", nodes, nodes), queue
        assert seen["leader"] in nodes


async def test_a_node_killed_with_jobs_queued_and_running_loses_none_and_runs_none_twice(
        rabbit_cluster: LocalRabbitCluster, cluster_vhost: str, redis_server: RedisEndpoint, redis_prefix: str,
        tmp_path: Path) -> None:
    vhost = vhost_of(cluster_vhost)
    await _declared_on(rabbit_cluster, vhost, 0)
    victim = rabbit_cluster.nodes[0].node_name
    assert (await asyncio.to_thread(rabbit_cluster.queue, vhost, messages.JOBS_QUEUE, 0))["leader"] == victim
    async with _stack(tmp_path, cluster_vhost, redis_server, redis_prefix) as stack:  # AMQP_URL: node 0 first
        volumes = await volumes_on_a1(stack, "ha-rmq", VOLUMES)
        publishing = publish_all(stack, volumes)
        await copying(stack)

        async def running_and_waiting() -> bool:
            return (int((await sim_stats(stack))["active_migrations"]) > 0
                    and await _ready(cluster_vhost, messages.JOBS_QUEUE) > 0)
        await eventually(running_and_waiting, 60, 0.1, description="copies running and jobs waiting in the queue")
        await asyncio.to_thread(rabbit_cluster.kill, 0)  # the queue's leader, and every service's connection

        async with asyncio.timeout(180):
            await publishing  # every attach completes
        await each_moved_exactly_once(stack, volumes)
        survivors = {node.node_name for node in rabbit_cluster.nodes[1:]}
        for queue in QUEUES:
            assert await _ready(cluster_vhost, queue) == 0, f"{queue} is not empty"
            seen = await asyncio.to_thread(rabbit_cluster.queue, vhost, queue, 1)
            assert seen["leader"] in survivors and sorted(seen["online"]) == sorted(survivors), queue

        async def reconnected() -> dict[str, str]:
            connections = await asyncio.to_thread(rabbit_cluster.connections, vhost, 1)
            services = {name: node for name, node in connections.items() if name.startswith(("csi-", "xo-csi-"))}
            assert len(services) == 3 and set(services.values()) <= survivors, connections
            return services
        await eventually(reconnected, 30, 0.5, description="the controller and both migrators on survivors")
        assert all(proc.returncode is None for proc in stack.processes.values()), "a service exited"

    await asyncio.to_thread(rabbit_cluster.restart, 0)  # the node comes back: it rejoins, its replicas catch up
    async def whole() -> bool:
        seen = await asyncio.to_thread(rabbit_cluster.queue, vhost, messages.JOBS_QUEUE, 0)
        return len(seen["online"]) == 3
    await eventually(whole, 60, 0.5, description="the jobs queue online on three nodes again")
