"""Fixtures of the HA suite (marker ``ha``): a three-node RabbitMQ cluster per module, a fresh Redis primary +
replica + three sentinels per test, and a vhost of the cluster per test. Local servers only (a skip says why
under testcontainers). Each harness checks on teardown that none of the processes it started is left (beam.smp,
its launcher, epmd, redis-server, sentinels). Boot times are printed and summed at the end of the run."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from dev.ha import LocalRabbitCluster, LocalRedisSentinel, temporary_cluster_vhost
from tests.support import brokers

TIMINGS: list[tuple[str, float]] = []


def record(what: str, seconds: float) -> None:
    TIMINGS.append((what, seconds))
    print(f"[ha timing] {what}: {seconds:.1f} s")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("HA brokers: boot times")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:7.1f} s  {what}")


def _local_servers_only(what: str) -> None:
    if brokers.use_containers():
        reason = f"{what} needs local servers (XOCSI_TEST_BROKERS=local): the harness starts and kills them itself"
        print(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[LocalRabbitCluster]:
    """Three RabbitMQ nodes forming one cluster (dev/ha.py); stopped, and checked gone, after the module."""
    _local_servers_only("a RabbitMQ cluster")
    cluster = LocalRabbitCluster()
    try:
        cluster.start()
        record("RabbitMQ cluster of 3 nodes, started in parallel, until every node answers", cluster.boot_s)
        yield cluster
    finally:
        cluster.stop()
    assert cluster.leftovers() == [], f"processes of the cluster still running: {cluster.leftovers()}"


@pytest.fixture
def cluster_vhost(rabbit_cluster: LocalRabbitCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """AMQP_URL (every node, comma-separated) of a fresh vhost of the cluster, deleted afterwards. The nodes' log
    tails are printed when the vhost cannot be made."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(temporary_cluster_vhost(rabbit_cluster, "ha-" + brokers.unique_name(
                request.node.name)))
        except Exception:
            print(rabbit_cluster.logs())
            raise
        yield url


@pytest.fixture
def redis_sentinel() -> Iterator[LocalRedisSentinel]:
    """A Redis primary and replica with three sentinels (dev/ha.py), for one test; stopped and checked gone."""
    _local_servers_only("Redis Sentinel")
    setup = LocalRedisSentinel()
    started = time.monotonic()
    try:
        setup.start()
        record("Redis primary + replica + 3 sentinels, until the sentinels see each other", time.monotonic() - started)
        yield setup
    finally:
        setup.stop()
    assert setup.leftovers() == [], f"redis-server processes still running: {setup.leftovers()}"
