"""Migrating attach benchmark: the whole stack as separate processes (XO simulator without injected latency and
with a known copy rate, controller, migrators, local RabbitMQ and Redis), driven over gRPC.

    make bench-migration     # or: .venv/bin/python -m bench.migration --attaches 30 --herd 200

Prints:
  (a) overhead of a migrating attach = publish latency - the simulator's vdi.migrate time (the copy), over
      sequential attaches (targets p50 <= 30 ms, p99 <= 100 ms);
  (b) lag from the MigrationFinished event (our own subscriber on xocsi.migration-events) to the publish
      answer (target p99 <= 20 ms);
  (c) makespan of --herd concurrent migrating attaches over 4 migrators against the lower bound
      sum(copy times) / limit (target within 10 %), the limit being the simulator's per-pool cap
      (--max-storage-migrations; both local SRs are in one pool): once with the cap equal to the workers; once
      with a cap below them and no per-SR limit (XO refuses the extra copies with TOO_MANY_STORAGE_MIGRATES and
      the workers back off and retry); once with that cap and the migrators' per-SR limit set to it
      (--per-sr-limit: every copy goes Local A1 -> Local A2, so at most that many run and the others wait for
      a slot instead of being refused);
  (d) XO calls per migrating attach (controller + migrator, from the simulator's stats);
  (e) the migrators' resident memory (target <= 100 MB);
  (f) with root, a move across pools with real bytes (bench/cross_pool.py): stream throughput against a plain copy
      of the backing file's data (target >= 0.8), bytes sent per allocated byte (target <= 1.01), the migrator's
      peak memory while it streams a 4 GiB disk (target <= 100 MB).
(a)-(e): plain simulator mode (no loop devices, no root needed): a copy takes exactly size / rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import grpc
import httpx
from aio_pika.abc import AbstractIncomingMessage

from bench import cross_pool
from bench.attach import CAP, rss_mb, stats
from bench.report import percentiles, show
from dev.stack import Stack, StackOptions, running_stack
from dev.wait import eventually
from shared import messages
from shared.backoff import Backoff, retrying
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.logging import configure_logging
from shared.units import parse_size

MIGRATING = {"srsWithTag": "k8s-migrating", "migrating": "true"}
ATTACHER_TIMEOUT_S = 300.0
ATTACHER_BACKOFF = Backoff(start_s=0.1, cap_s=5.0, jitter=False)
RETRIED = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass
class Bench:
    """One running stack and what the bench reads from it."""

    stack: Stack
    controller: csi_pb2_grpc.ControllerStub
    admin: httpx.AsyncClient
    preferred: csi_pb2.TopologyRequirement  # WaitForFirstConsumer on node-a1: volumes start on Local A1
    node_b: str  # node-a2's VM id: every publish there needs a copy
    events: dict[str, float] = field(default_factory=dict)  # disk name -> arrival of its finished event


@contextlib.asynccontextmanager
async def bench_stack(work: Path, *, migrators: int, concurrency: int, rate: str, cap: int,
                      per_sr_limit: int = 0) -> AsyncIterator[Bench]:
    # info: the stack knows a migrator is up by its consumer_started line (and info is the production default)
    options = StackOptions(real_data=False, migrators=migrators, host_topology=True, log_level="info",
                           sim_args=("--migration-rate", rate, "--max-storage-migrations", str(cap),
                                     "--log-level", "warning"),
                           migrator_args=("--concurrency", str(concurrency), "--per-sr-limit", str(per_sr_limit)))
    async with running_stack(work, options) as stack:
        vm_a = await stack.xo.get_vm(stack.vm_ids["node-a1"])
        assert vm_a is not None
        preferred = csi_pb2.TopologyRequirement(preferred=[csi_pb2.Topology(
            segments={"pool": vm_a.pool_id, "host": vm_a.container})])
        base = stack.admin_url
        async with httpx.AsyncClient(base_url=base, timeout=30) as admin:
            yield Bench(stack, stack.controller, admin, preferred, stack.vm_ids["node-a2"])


@contextlib.asynccontextmanager
async def finished_events(bench: Bench) -> AsyncIterator[None]:
    """Record when each MigrationFinished event reaches a subscriber of our own (every disk: binding '#')."""
    assert bench.stack.amqp_url is not None
    connection = await aio_pika.connect(bench.stack.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(messages.EVENTS_EXCHANGE)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")

        async def on_event(message: AbstractIncomingMessage) -> None:
            arrived = time.perf_counter()
            bench.events[messages.parse_finished(message.body).disk_name] = arrived

        await queue.consume(on_event, no_ack=True)
        yield


async def create_volumes(bench: Bench, prefix: str, count: int, size_bytes: int) -> list[str]:
    ids = []
    for n in range(count):
        response = await bench.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=f"{prefix}-{n:03d}", capacity_range=csi_pb2.CapacityRange(required_bytes=size_bytes),
            volume_capabilities=[CAP], parameters=MIGRATING, accessibility_requirements=bench.preferred), timeout=30)
        ids.append(response.volume.volume_id)
    return ids


async def publish(bench: Bench, volume_id: str, retries: Counter[str]) -> None:
    """ControllerPublishVolume to node-a2 as external-attacher sends it: 300 s timeout, ABORTED/UNAVAILABLE
    retried with exponential backoff."""
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=bench.node_b,
                                                     volume_capability=CAP)
    await retrying(lambda _: bench.controller.ControllerPublishVolume(request, timeout=ATTACHER_TIMEOUT_S),
                   backoff=ATTACHER_BACKOFF, retry_if=_retried,
                   on_retry=lambda exc: retries.update([exc.code().name]))  # type: ignore[attr-defined]


def _retried(exc: Exception) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRIED


async def sequential(bench: Bench, count: int, size_bytes: int) -> None:
    """(a), (b), (d): one migrating attach at a time."""
    ids = await create_volumes(bench, "seq", count, size_bytes)
    latencies, copies, overheads, beyond_sim, xo_calls = [], [], [], [], []
    answers: dict[str, float] = {}
    per_method: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    async with finished_events(bench):
        for volume_id in ids:
            before = await stats(bench.admin)
            started = time.perf_counter()
            await publish(bench, volume_id, retries)
            answered = time.perf_counter()
            after = await stats(bench.admin)
            copy_s = after["busy_s"].get("vdi.migrate", 0.0) - before["busy_s"].get("vdi.migrate", 0.0)
            sim_s = sum(after["busy_s"].values()) - sum(before["busy_s"].values())
            latencies.append(answered - started)
            copies.append(copy_s)
            overheads.append(answered - started - copy_s)
            beyond_sim.append(answered - started - sim_s)
            answers["csi-" + volume_id.removeprefix("name:")] = answered
            xo_calls.append(after["total_calls"] - before["total_calls"])
            per_method.update({m: n - before["calls"].get(m, 0) for m, n in after["calls"].items()})
        await eventually(lambda: set(answers) <= set(bench.events), 10, description="every finished event")
    # negative: the controller answered before our subscriber saw the event (it re-reads the job in Redis too)
    lags = [answers[disk] - bench.events[disk] for disk in answers]
    migrations = (await stats(bench.admin))["migrations"]
    assert all(migrations.get("csi-" + v.removeprefix("name:")) == 1 for v in ids), "one copy per attach"
    print(f"\n(a) {count} sequential migrating attaches of {size_bytes >> 20} MiB volumes")
    show("    publish latency", percentiles(latencies))
    show("    copy (vdi.migrate time in the simulator)", percentiles(copies))
    show("    overhead = latency - copy  [target p50 <= 30, p99 <= 100]", percentiles(overheads))
    show("    latency - all of the simulator's time", percentiles(beyond_sim))
    print(f"(b) finished event -> publish answer, {len(lags)} events, {sum(lag < 0 for lag in lags)} of them "
          "seen by us after the answer  [target p99 <= 20]")
    show("    lag", percentiles(lags))
    print(f"(d) XO calls per migrating attach: mean={statistics.fmean(xo_calls):.2f} max={max(xo_calls)}")
    print("    by method (mean): " + ", ".join(f"{m}={n / count:.2f}" for m, n in sorted(per_method.items()) if n))
    if retries:
        print(f"    retried: {dict(retries)}")


async def herd(bench: Bench, count: int, size_bytes: int, rate_bps: int, limit: int, label: str) -> None:
    """(c): ``count`` concurrent migrating attaches; makespan against sum(copy) / limit."""
    ids = await create_volumes(bench, f"herd{limit}", count, size_bytes)
    before = await stats(bench.admin)
    retries: Counter[str] = Counter()
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for volume_id in ids:
            group.create_task(publish(bench, volume_id, retries))
    makespan = time.perf_counter() - started
    after = await stats(bench.admin)
    copy_s = size_bytes / rate_bps
    bound = max(count * copy_s / limit, copy_s)
    busy = after["busy_s"].get("vdi.migrate", 0.0) - before["busy_s"].get("vdi.migrate", 0.0)
    copies = sum(after["migrations"].get("csi-" + v.removeprefix("name:"), 0) for v in ids)
    busy_errors = after["errors"].get("TOO_MANY_STORAGE_MIGRATES", 0) - before["errors"].get(
        "TOO_MANY_STORAGE_MIGRATES", 0)
    print(f"\n(c) {label}: {count} concurrent migrating attaches, copy {copy_s * 1000:.0f} ms each, limit {limit}")
    print(f"    makespan {makespan:.2f} s, lower bound {bound:.2f} s = {count} x {copy_s:.3f} s / {limit}: "
          f"{(makespan / bound - 1) * 100:+.1f} %  [target within +10 %]")
    print(f"    copies {copies} (expected {count}), vdi.migrate time {busy:.1f} s, "
          f"TOO_MANY_STORAGE_MIGRATES answered {busy_errors}, publish retries {dict(retries) or 0}")


def memory(bench: Bench) -> None:
    rss = {name: rss_mb(proc.pid) for name, proc in sorted(bench.stack.processes.items())
           if name.startswith("migrator")}
    print(f"\n(e) migrator resident memory: {', '.join(f'{n}={mb:.1f} MB' for n, mb in rss.items())}; "
          f"max {max(rss.values()):.1f} MB  [target <= 100]")
    print(f"    controller resident memory: {rss_mb(bench.stack.processes['controller'].pid):.1f} MB")


async def run(args: argparse.Namespace) -> None:
    rate_bps, size_bytes = parse_size(args.migration_rate), parse_size(args.size)
    slots = args.migrators * args.concurrency
    with contextlib.ExitStack() as cleanup:
        work = Path(args.workdir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-migration-")))
        if args.only_cross_pool:
            await _cross_pool(work / "f", args)
            return
        started = time.perf_counter()
        async with bench_stack(work / "a", migrators=args.migrators, concurrency=args.concurrency,
                               rate=args.migration_rate, cap=slots) as bench:
            print(f"stack up in {time.perf_counter() - started:.1f} s: {args.migrators} migrators x "
                  f"{args.concurrency}, copy rate {args.migration_rate}/s, per-pool cap {slots}, no injected latency")
            await sequential(bench, args.attaches, size_bytes)
            await herd(bench, args.herd, size_bytes, rate_bps, slots, "cap = worker slots")
            memory(bench)
        if args.tight_cap:
            async with bench_stack(work / "b", migrators=args.migrators, concurrency=args.concurrency,
                                   rate=args.migration_rate, cap=args.tight_cap) as bench:
                await herd(bench, args.herd, size_bytes, rate_bps, args.tight_cap, "cap below the worker slots")
                memory(bench)
        if args.tight_cap and args.per_sr_limit:
            limit = min(args.tight_cap, args.per_sr_limit)
            async with bench_stack(work / "c", migrators=args.migrators, concurrency=args.concurrency,
                                   rate=args.migration_rate, cap=args.tight_cap,
                                   per_sr_limit=args.per_sr_limit) as bench:
                await herd(bench, args.herd, size_bytes, rate_bps, limit,
                           f"cap {args.tight_cap} below the worker slots, per-SR limit {args.per_sr_limit}")
                memory(bench)
        if args.cross_pool_size and args.cross_pool_size != "0":
            await _cross_pool(work / "f", args)


async def _cross_pool(work: Path, args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        print("\n(f) skipped: a move across pools streams real bytes, which needs root (loop devices)")
        return
    await cross_pool.measure(work, parse_size(args.cross_pool_size), args.cross_pool_allocated, seed=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attaches", type=int, default=30, help="sequential migrating attaches for (a), (b), (d)")
    parser.add_argument("--herd", type=int, default=200, help="concurrent migrating attaches for (c)")
    parser.add_argument("--migrators", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1, help="migrations per migrator (--concurrency)")
    parser.add_argument("--migration-rate", default="256MiB", help="the simulator's copy rate per second")
    parser.add_argument("--size", default="32MiB", help="volume size (a copy takes size / rate)")
    parser.add_argument("--tight-cap", type=int, default=2, help="per-pool cap of the second (c) run; 0 = skip")
    parser.add_argument("--per-sr-limit", type=int, default=2, help="the migrators' --per-sr-limit in the third (c) "
                        "run (with --tight-cap); 0 = skip")
    parser.add_argument("--cross-pool-size", default="4GiB", help="virtual size of the disk of (f); 0 = skip (f)")
    parser.add_argument("--cross-pool-allocated", type=float, default=0.25,
                        help="fraction of (f)'s 2 MiB blocks holding data (0.25)")
    parser.add_argument("--only-cross-pool", action="store_true", help="run (f) only")
    parser.add_argument("--workdir", help="keep the stack's logs here (default: a temporary dir, removed)")
    configure_logging("warning")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
