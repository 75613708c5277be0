"""Load held (issue 14 item 5): many volumes, many migrator processes, hundreds of migrating attaches at once.

    make load                # 1,000 volumes, 16 migrators, 500 concurrent migrating attaches (several minutes)
    .venv/bin/python -m bench.load --volumes 40 --attaches 20 --migrators 4     # the suite's smoke size

The whole stack as separate processes (the XO simulator with its harsh defaults on a generated pool of --hosts
hosts, each with a local SR and a Kubernetes node VM; a controller; --migrators migrator processes; a local
RabbitMQ with its management API and a local Redis). It creates --volumes volumes (a migrating StorageClass), the
n-th on the local SR of host n mod --hosts, then publishes --attaches of them at once, each to the node VM of the
next host, as the external-attacher does (300 s timeout, ABORTED/UNAVAILABLE retried with backoff): each needs a
copy between two local SRs at --migration-rate. (A VM takes at most 254 disks: the attaches are spread.)

It checks, and prints beside the figures: every attach completed; one copy per disk (the simulator's stats: no
job lost, none run twice), and no other; the broker's and Redis's memory and connection counts at the peak of the
load (management API /api/overview and /api/nodes, Redis INFO); afterwards nothing left in the queues (jobs and
dead letters) nor in Redis (no lock, no slot, no job record once the finished ones' result TTL, --result-ttl-s,
has passed). The run is bounded: every wait has a deadline (--timeout-s), and its duration is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from bench.attach import CAP, machine, rss_mb, stats
from bench.migration import MIGRATING, publish_as_attacher
from bench.report import percentiles, show
from dev import signals
from dev.stack import Stack, StackOptions, running_stack
from dev.wait import eventually
from shared import messages
from shared.csi import csi_pb2
from shared.keys import all_keys_pattern, is_disk_last_job_key
from shared.logging import configure_logging
from shared.units import parse_size

CREATE_CONCURRENCY = 16


@dataclass
class LoadResult:
    """What a run found; ``problems`` is empty when every check held."""

    attaches: int
    makespan_s: float
    latencies_s: list[float]
    copies: Counter[str]
    peak: dict[str, Any]
    after: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    migrator_rss_mb: list[float] = field(default_factory=list)


async def run(work: Path, args: argparse.Namespace) -> LoadResult:
    """One load run (see the module docstring); raises nothing for a failed check: it lands in ``problems``."""
    topology = f"generated:pools=1,hosts={args.hosts},vms={args.hosts},vdis={args.hosts},seed=1,csi=0"
    options = StackOptions(topology=topology, real_data=False, migrators=args.migrators, host_topology=True,
                           management=True, nodes=False, log_level="warning", migrator_args=("--log-level", "info"),
                           sim_args=("--migration-rate", args.migration_rate, "--log-level", "warning"))
    started = time.perf_counter()
    ttl = f"{args.result_ttl_s:g}"  # read by the services this stack starts; restored afterwards (tests share us)
    with _environment(MIGRATOR_JOB_RESULT_TTL_S=ttl, CSI_JOB_RESULT_TTL_S=ttl):
        async with running_stack(work, options) as stack, httpx.AsyncClient(base_url=stack.admin_url,
                                                                            timeout=30) as admin:
            return await _measured(stack, admin, args, started)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def _measured(stack: Stack, admin: httpx.AsyncClient, args: argparse.Namespace, started: float
                    ) -> LoadResult:
    print(f"stack up in {time.perf_counter() - started:.1f} s: {args.migrators} migrator processes, "
          f"copy rate {args.migration_rate}/s, XO's cache lag and notification noise at the simulator's defaults")
    async with asyncio.timeout(args.timeout_s):
        result = await _load(stack, admin, args)
    result.migrator_rss_mb = [rss_mb(proc.pid) for name, proc in stack.processes.items()
                              if name.startswith("migrator")]
    return result


async def _load(stack: Stack, admin: httpx.AsyncClient, args: argparse.Namespace) -> LoadResult:
    nodes = []
    for name in sorted(n for n in stack.vm_ids if n.startswith("node-")):
        vm = await stack.xo.get_vm(stack.vm_ids[name])
        assert vm is not None
        nodes.append((vm.id, csi_pb2.TopologyRequirement(preferred=[csi_pb2.Topology(
            segments={"pool": vm.pool_id, "host": vm.container})])))
    created = time.perf_counter()
    ids = await _create(stack, args.volumes, parse_size(args.size), [where for _, where in nodes])
    print(f"{len(ids)} volumes created in {time.perf_counter() - created:.1f} s on {len(nodes)} hosts")
    step = max(1, len(ids) // args.attaches)
    chosen = [(ids[n], nodes[(n + 1) % len(nodes)][0]) for n in range(0, len(ids), step)][: args.attaches]
    before = await stats(admin)
    latencies: list[float] = []
    retries: Counter[str] = Counter()
    peak: dict[str, Any] = {}
    started = time.perf_counter()
    async with _sampling(stack, peak):
        results = await asyncio.gather(*(_timed(stack, v, node, latencies, retries) for v, node in chosen),
                                       return_exceptions=True)
    makespan = time.perf_counter() - started
    after = await stats(admin)
    copies = Counter({d: n - before["migrations"].get(d, 0) for d, n in after["migrations"].items()
                      if n - before["migrations"].get(d, 0)})
    result = LoadResult(len(chosen), makespan, latencies, copies, peak, {})
    failed = [f"{v}: {r!r}" for (v, _), r in zip(chosen, results, strict=True) if isinstance(r, BaseException)]
    if failed:
        result.problems.append(f"{len(failed)} attaches failed, e.g. {failed[:3]}")
    wanted = {"csi-" + v.removeprefix("name:") for v, _ in chosen}
    if set(copies) != wanted or any(n != 1 for n in copies.values()):
        doubled = sorted(d for d, n in copies.items() if n > 1)
        result.problems.append(f"copies: {sum(copies.values())} for {len(wanted)} disks, missing "
                               f"{sorted(wanted - set(copies))[:3]}, doubled {doubled[:3]}, unexpected "
                               f"{sorted(set(copies) - wanted)[:3]}")
    print(f"publish retries: {dict(retries) or 0}")
    result.after = await _leftovers(stack, args.result_ttl_s, result.problems)
    return result


async def _create(stack: Stack, count: int, size_bytes: int, hosts: list[csi_pb2.TopologyRequirement]) -> list[str]:
    names = iter(range(count))
    ids: dict[int, str] = {}

    async def worker() -> None:
        for n in names:
            response = await stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                name=f"load-{n:04d}", capacity_range=csi_pb2.CapacityRange(required_bytes=size_bytes),
                volume_capabilities=[CAP], parameters=MIGRATING, accessibility_requirements=hosts[n % len(hosts)]),
                timeout=120)
            ids[n] = response.volume.volume_id

    async with asyncio.TaskGroup() as group:
        for _ in range(CREATE_CONCURRENCY):
            group.create_task(worker())
    return [ids[n] for n in sorted(ids)]


async def _timed(stack: Stack, volume_id: str, node_id: str, latencies: list[float], retries: Counter[str]) -> None:
    started = time.perf_counter()
    await publish_as_attacher(stack.controller, volume_id, node_id, retries)
    latencies.append(time.perf_counter() - started)


@contextlib.asynccontextmanager
async def _sampling(stack: Stack, peak: dict[str, Any], every_s: float = 1.0) -> AsyncIterator[None]:
    """Sample the brokers' memory and connections while the load runs; keep the peak of each."""
    async def sample_forever() -> None:
        while True:
            for key, value in (await _brokers(stack)).items():
                peak[key] = max(peak.get(key, value), value)
            await asyncio.sleep(every_s)  # a sampling period, not synchronisation

    task = asyncio.create_task(sample_forever())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _brokers(stack: Stack) -> dict[str, Any]:
    assert stack.rabbit is not None and stack.redis_url is not None
    endpoint = stack.rabbit.endpoint
    async with httpx.AsyncClient(base_url=endpoint.management_url, auth=(endpoint.user, endpoint.password),
                                 timeout=10) as http:
        overview = (await http.get("/api/overview")).json()
        node = (await http.get("/api/nodes")).json()[0]
    redis = aioredis.from_url(stack.redis_url)
    try:
        memory, clients = await redis.info("memory"), await redis.info("clients")
    finally:
        await redis.aclose()
    totals = overview.get("object_totals", {})
    return {"rabbitmq_mem_mb": node.get("mem_used", 0) / 2**20, "rabbitmq_connections": totals.get("connections", 0),
            "rabbitmq_channels": totals.get("channels", 0), "rabbitmq_sockets": node.get("sockets_used", 0),
            "redis_mem_mb": memory["used_memory"] / 2**20, "redis_clients": clients["connected_clients"]}


async def _leftovers(stack: Stack, result_ttl_s: float, problems: list[str]) -> dict[str, Any]:
    """What is left once the load is over: messages in the queues, and (after the result TTL) keys in Redis."""
    assert stack.rabbit is not None and stack.redis_url is not None
    endpoint = stack.rabbit.endpoint
    async with httpx.AsyncClient(base_url=endpoint.management_url, auth=(endpoint.user, endpoint.password),
                                 timeout=10) as http:
        async def queues() -> dict[str, int] | None:
            found = {q["name"]: q.get("messages", 0) for q in (await http.get("/api/queues")).json()
                     if q["name"] in (messages.JOBS_QUEUE, messages.DEAD_LETTER_QUEUE)}
            return found if len(found) == 2 and not any(found.values()) else None
        # the management API refreshes its counts every few seconds: wait (bounded) for a zero to show
        left = await eventually(queues, 30.0, 1.0, description="the jobs and dead-letter queues empty")
    redis = aioredis.from_url(stack.redis_url)
    try:
        prefix, pattern = stack.options.redis_prefix, all_keys_pattern(stack.options.redis_prefix)
        kinds = Counter([key.decode().removeprefix(prefix).split(":", 1)[0] async for key in redis.scan_iter(
            match=pattern)])
        print(f"Redis right after the load: {dict(kinds) or 'no key'} (finished job records live {result_ttl_s:g} s)")
        if set(kinds) - {"job"}:
            problems.append(f"Redis holds more than finished job records: {dict(kinds)}")

        async def left_keys() -> list[bytes]:  # each disk's last finished job stays (days) on purpose
            return [key async for key in redis.scan_iter(match=pattern)
                    if not is_disk_last_job_key(prefix, key.decode())]

        async def empty() -> bool:
            return not await left_keys()
        try:
            await eventually(empty, result_ttl_s + 30.0, 1.0, description="no key left in Redis")
            keys_after = 0
        except AssertionError:
            keys_after = len(await left_keys())
            problems.append(f"{keys_after} Redis keys left {result_ttl_s + 30:g} s after the load")
    finally:
        await redis.aclose()
    return {"queues": left, "redis_keys_after_ttl": keys_after, **(await _brokers(stack))}


def report(result: LoadResult, duration_s: float) -> None:
    print(f"\n{result.attaches} concurrent migrating attaches: makespan {result.makespan_s:.1f} s, "
          f"{len(result.latencies_s)} completed")
    if result.latencies_s:
        show("  publish latency", percentiles(result.latencies_s))
    print(f"  copies: {sum(result.copies.values())} for {len(result.copies)} disks "
          f"(max per disk {max(result.copies.values(), default=0)})")
    print("  peak during the load: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in sorted(result.peak.items())))
    print("  afterwards: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in sorted(result.after.items())))
    if rss := result.migrator_rss_mb:
        print(f"  migrator resident memory: max {max(rss):.1f} MB, total {sum(rss):.0f} MB over {len(rss)} processes")
    print(f"  whole run {duration_s:.0f} s; checks: {'all held' if not result.problems else 'FAILED'}")
    for problem in result.problems:
        print(f"  FAILED: {problem}")


async def main_async(args: argparse.Namespace) -> int:
    print(f"machine: {machine()} (at start)")
    started = time.perf_counter()
    with contextlib.ExitStack() as cleanup:
        work = Path(args.workdir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-load-")))
        result = await run(work, args)
    report(result, time.perf_counter() - started)
    print(f"machine: {machine()} (at end)")
    return 1 if result.problems else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volumes", type=int, default=1000)
    p.add_argument("--attaches", type=int, default=500, help="concurrent migrating attaches (of the volumes)")
    p.add_argument("--migrators", type=int, default=16, help="migrator processes")
    p.add_argument("--hosts", type=int, default=4, help="hosts of the generated pool (a local SR and a node VM each)")
    p.add_argument("--size", default="64MiB", help="volume size")
    p.add_argument("--migration-rate", default="64MiB", help="the simulator's copy rate per second (a copy takes "
                   "size / rate: 1 s by default)")
    p.add_argument("--result-ttl-s", type=float, default=20.0, help="how long finished job records stay in Redis "
                   "(MIGRATOR_/CSI_JOB_RESULT_TTL_S), waited for before checking that Redis is empty")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="bound on the whole load (after start-up)")
    p.add_argument("--workdir", help="keep the stack's logs here (default: a temporary dir, removed)")
    return p


def main() -> None:
    configure_logging("warning")
    raise SystemExit(signals.run(main_async(parser().parse_args())))


if __name__ == "__main__":
    main()
