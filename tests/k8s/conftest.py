"""Fixtures of the k8s suite: one control plane per session (skipped, with the reason, when the team's binaries
are absent), the driver deployed on it once per module, each scenario's timing printed and summed at the end."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from dev.brokers import RabbitEndpoint, RedisEndpoint, unique_name
from dev.stack import StackOptions, running_stack
from tests.k8s.cluster import TOOLS_ENV, Cluster, running_cluster, tools_dir, unpack
from tests.k8s.deployment import Deployed, deployed
from tests.support import brokers

MIGRATION_RATE = "32MiB"  # the simulator's copy rate: a 64 MiB copy takes about 2 s
TIMINGS: list[tuple[str, float, str]] = []  # (what, seconds, detail) for the terminal summary


def record(what: str, seconds: float, detail: str = "") -> None:
    TIMINGS.append((what, seconds, detail))
    print(f"[k8s timing] {what}: {seconds:.1f} s {detail}".rstrip())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("k8s suite timings")
    for what, seconds, detail in TIMINGS:
        terminalreporter.write_line(f"{seconds:7.1f} s  {what}  {detail}".rstrip())


def _skip_without_root_tools() -> None:
    missing = [tool for tool in ("losetup", "unshare", "mkfs.ext4", "mkfs.xfs") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        reason = (f"the k8s suite needs root and {', '.join(missing) or 'util-linux'}: the simulator attaches loop "
                  "devices, the node plugins mount filesystems, each controller pod gets its own hostname")
        print(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[Cluster]:
    """etcd + kube-apiserver + kube-controller-manager (PV controllers) from ../shared/tools/k8s, for the session."""
    tools = tools_dir()
    if tools is None:
        reason = (f"Kubernetes binaries not found: set {TOOLS_ENV} to the folder with up.sh (the team's "
                  "shared/tools/k8s), or put it at ../shared/tools/k8s beside the repository")
        print(reason)
        pytest.skip(reason)
    _skip_without_root_tools()
    bin_dir, unpack_s = unpack(tools)
    record("unpack binaries (cached by checksum after the first time)", unpack_s)
    started = time.monotonic()
    with running_cluster(tools, bin_dir) as cluster:
        record("control plane up (up.sh)", time.monotonic() - started)
        yield cluster


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver(k8s_cluster: Cluster, rabbitmq: RabbitEndpoint, redis_server: RedisEndpoint,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployed]:
    """The whole driver: XO simulator (real data), 2 migrators and a node plugin per VM on the session's brokers
    (own vhost and key prefix), the controller Deployment's two replicas with their sidecars."""
    started = time.monotonic()
    work = tmp_path_factory.mktemp("k8s")
    name = unique_name("k8s")
    prefix = f"t:{name}:"
    try:
        with brokers.temporary_vhost(rabbitmq, name) as amqp_url:
            options = StackOptions(migrators=2, host_topology=True, amqp_url=amqp_url, redis_url=redis_server.url,
                                   redis_prefix=prefix, sim_args=("--migration-rate", MIGRATION_RATE))
            async with running_stack(work, options) as stack:
                await stack.processes["controller"].stop()  # the controller runs as the Deployment's replicas
                async with deployed(k8s_cluster, stack, work, frontend_args=("--host-topology",)) as env:
                    record("driver deployed (stack, RBAC, 2 replicas, leader elected)", time.monotonic() - started)
                    yield env
    finally:
        await brokers.delete_keys(redis_server, prefix)


@pytest.fixture
def timer(request: pytest.FixtureRequest, driver: Deployed) -> Iterator[None]:
    """Time the scenario (after the driver is up) and print sidecar and frontend log tails when it fails.
    Request it after ``driver``."""
    started = time.monotonic()
    yield
    record(request.node.name, time.monotonic() - started)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"logs in {driver.stack.log_dir}")
        print(driver.log_tails())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
