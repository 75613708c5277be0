"""Migrating attach benchmark: the whole stack as separate processes (XO simulator without injected latency and
with a known copy rate, controller, migrators, local RabbitMQ and Redis), driven over gRPC.

    make bench-migration     # or: .venv/bin/python -m bench.migration --attaches 30 --herd 200

The simulator keeps its harsh defaults (XO's cache lag 20-150 ms) and runs 200 notification events/s of background
noise (issue 9 item 5); a softened knob (--cache-lag-ms, --noise-events-per-s) is printed as such.

Prints each figure beside its target (issue 14 item 4):
  (a) overhead of a migrating attach over the copy, over sequential attaches (targets p50 <= 15 ms, p99 <= 50 ms):

          publish latency = XO's time + overhead

      XO's time: the wall time during which XO ran a call of the attach (frontend or migrator) or had not yet shown
      one of its changes in its cache (the simulator's stats xo_time_s; overlapping calls and waits count once; each
      attach starts once every earlier change shows). It holds the copy (vdi.migrate, XO's own barrier on its cache
      included) and XO's cache lag after each write (20-150 ms, its XAPI event poll), which the driver waits for by
      design (a write is read back before anything decides from it): XO's, not the driver's, so it is reported
      apart, split into the copy, the cache waits (stats cache_wait_s, summed per call) and XO's other calls. The
      overhead is the rest: the driver's own time (gRPC, Redis, RabbitMQ, two processes' event loops digesting the
      notification storm, the round trips);
  (b) lag from the MigrationFinished event (our own subscriber on xocsi.migration-events) to the publish
      answer, less XO's time in the one call after it, vm.attachDisk (the call, then its cache lag until the VBD
      shows plugged, which the answer needs: its device) (target p99 <= 10 ms);
  (c) makespan of --herd concurrent migrating attaches over 4 migrators (one copy each at a time) against the lower
      bound count x copy / limit, the limit being the copies that may run at once (the worker slots, or the
      migrators' per-SR limit: every copy goes Local A1 -> Local A2). First under XO's harsh cache lag, shown
      without a target: each job waits for XO's cache three times by design (the mark, then the cleared mark and
      the source's exit, overlapping) and XO's vdi.migrate answers only once its cache shows the copy, ~0.4 s of
      XO's time per 125 ms copy, so the bound that counts that time is printed too. Then, with XO's cache lag at 0
      (--herd-cache-lag-ms, printed as softened), what the targets measure, the driver's scheduling (queue, claims,
      locks, slots): default settings (target within +10 %), and the per-SR limit set to --per-sr-limit (target
      within +5 %). XO does not cap detached copies (TOO_MANY_STORAGE_MIGRATES is the live path's), so a per-pool
      cap below the workers changes nothing here;
  (d) XO calls per migrating attach (controller + migrator, from the simulator's stats; target <= 6);
  (e) the migrators' resident memory (target <= 100 MB);
  (f) with root, a move across pools with real bytes (bench/cross_pool.py): stream throughput against a plain copy
      of the backing file's data (target >= 0.8), bytes sent per allocated byte (target <= 1.01), the migrator's
      peak memory while it streams a 4 GiB disk (target <= 100 MB).
(a)-(e): plain simulator mode (no loop devices, no root needed): a copy takes exactly size / rate. Beside (a)-(d), the
share of CPU time the hypervisor gave to other guests meanwhile (/proc/stat steal): on a VM whose host is busy, every
hop of the stack slows at once, and the figures move with it. At the start and the end, the machine line gives one
core's speed too (a reference loop, best of three) and a round trip between processes on two idle cores (bench/
wakeup.py; every hop of the stack pays one): compare runs by them. Each (c) with a target also prints the makespan
over the bound on XO's copies as they ran (size / rate plus XO's own overrun of each), for reading.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import httpx
from aio_pika.abc import AbstractIncomingMessage

from bench import cross_pool
from bench.attach import (
    CAP,
    DEFAULT_CACHE_LAG,
    cpu_ticks,
    describe_knobs,
    machine,
    rss_mb,
    schedstat,
    settled,
    stats,
    steal_since,
)
from bench.report import percentiles, show, show_target
from dev import signals
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
NOISE_EVENTS_PER_S = 200.0  # issue 9 item 5: XO calls per operation under 200 notification events/s
TARGET_OVERHEAD_P50_MS, TARGET_OVERHEAD_P99_MS = 15.0, 50.0
TARGET_EVENT_P99_MS = 10.0
TARGET_XO_CALLS = 6
TARGET_HERD_PCT, TARGET_HERD_TUNED_PCT = 10.0, 5.0
TARGET_MIGRATOR_RSS_MB = 100.0
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
async def bench_stack(work: Path, args: argparse.Namespace, *, cap: int, per_sr_limit: int = 0
                      ) -> AsyncIterator[Bench]:
    # info: the stack knows a migrator is up by its consumer_started line (and info is the production default)
    migrators, concurrency = args.migrators, args.concurrency
    options = StackOptions(real_data=False, migrators=migrators, host_topology=True, log_level="info",
                           sim_args=("--migration-rate", args.migration_rate, "--max-storage-migrations", str(cap),
                                     "--cache-lag-ms", args.cache_lag_ms,
                                     "--noise-events-per-s", f"{args.noise_events_per_s:g}", "--log-level", "warning"),
                           migrator_args=("--concurrency", str(concurrency), "--per-sr-limit", str(per_sr_limit)))
    async with running_stack(work, options) as stack:
        vm_a = await stack.xo.get_vm(stack.vm_ids["node-a1"])
        assert vm_a is not None
        preferred = csi_pb2.TopologyRequirement(preferred=[csi_pb2.Topology(
            segments={"pool": vm_a.pool_id, "host": vm_a.container})])
        await stack.xo.close()  # the harness's own XO client: its share of the notification storm competes for CPU
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
    await publish_as_attacher(bench.controller, volume_id, bench.node_b, retries)


async def publish_as_attacher(controller: csi_pb2_grpc.ControllerStub, volume_id: str, node_id: str,
                              retries: Counter[str]) -> None:
    """ControllerPublishVolume as external-attacher sends it: 300 s timeout, ABORTED/UNAVAILABLE retried with
    exponential backoff (``retries`` counts them by code)."""
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id, volume_capability=CAP)
    await retrying(lambda _: controller.ControllerPublishVolume(request, timeout=ATTACHER_TIMEOUT_S),
                   backoff=ATTACHER_BACKOFF, retry_if=_retried,
                   on_retry=lambda exc: retries.update([exc.code().name]))  # type: ignore[attr-defined]


def _retried(exc: Exception) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRIED


@dataclass
class Attach:
    """One sequential migrating attach: wall time and its parts (seconds), XO calls by method."""

    elapsed_s: float
    copy_s: float
    cache_wait_s: float
    other_busy_s: float
    xo_s: float
    attach_xo_s: float  # vm.attachDisk (after the event): XO's time in the call and until its cache showed the VBD
    runqueue_s: float  # the stack's processes (controller, migrators, simulator): runnable, waiting for a CPU
    calls: dict[str, int]
    answered_at: float  # perf_counter() when the publish answered

    @property
    def overhead_s(self) -> float:
        return self.elapsed_s - self.xo_s


async def one_attach(bench: Bench, volume_id: str, retries: Counter[str]) -> Attach:
    before = await settled(bench.admin)
    waited = _runqueue_s(bench)
    started = time.perf_counter()
    await publish(bench, volume_id, retries)
    answered = time.perf_counter()
    waited = _runqueue_s(bench) - waited
    after = await settled(bench.admin)  # the calls' cache waits are all counted (the attach waited for them)
    copy_s = _delta(before, after, "busy_s", "vdi.migrate")
    calls = {m: n - before["calls"].get(m, 0) for m, n in after["calls"].items() if n - before["calls"].get(m, 0)}
    attach_xo_s = _delta(before, after, "busy_s", "vm.attachDisk") + _delta(before, after, "cache_wait_s",
                                                                            "vm.attachDisk")
    return Attach(answered - started, copy_s, _delta(before, after, "cache_wait_s"),
                  _delta(before, after, "busy_s") - copy_s, after["xo_time_s"] - before["xo_time_s"], attach_xo_s,
                  waited, calls, answered)


def _runqueue_s(bench: Bench) -> float:
    return sum(schedstat(proc.pid)[1] for name, proc in bench.stack.processes.items()
               if name in ("controller", "xo-sim") or name.startswith("migrator"))


def _delta(before: dict[str, Any], after: dict[str, Any], key: str, method: str | None = None) -> float:
    if method is not None:
        return float(after[key].get(method, 0.0) - before[key].get(method, 0.0))
    return float(sum(after[key].values()) - sum(before[key].values()))


async def sequential(bench: Bench, count: int, size_bytes: int) -> None:
    """(a), (b), (d): one migrating attach at a time (at least 2; fewer: skipped)."""
    if count < 2:
        return
    ids = await create_volumes(bench, "seq", count, size_bytes)
    samples: list[Attach] = []
    retries: Counter[str] = Counter()
    ticks = cpu_ticks()
    async with finished_events(bench):
        for volume_id in ids:
            samples.append(await one_attach(bench, volume_id, retries))
        disks = {"csi-" + volume_id.removeprefix("name:") for volume_id in ids}
        await eventually(lambda: disks <= set(bench.events), 10, description="every finished event")
    migrations = (await stats(bench.admin))["migrations"]
    assert all(migrations.get("csi-" + v.removeprefix("name:")) == 1 for v in ids), "one copy per attach"
    lags = [sample.answered_at - bench.events["csi-" + volume_id.removeprefix("name:")]
            for volume_id, sample in zip(ids, samples, strict=True)]
    report_sequential(samples, size_bytes, lags, retries)
    print(f"\n(a), (b), (d): {steal_since(ticks)}")


def report_sequential(samples: list[Attach], size_bytes: int, lags: list[float], retries: Counter[str]) -> None:
    print(f"\n(a) {len(samples)} sequential migrating attaches of {size_bytes >> 20} MiB volumes")
    show("    publish latency", percentiles([s.elapsed_s for s in samples]))
    show("    XO's time: a call running or its change not yet in XO's cache", percentiles([s.xo_s for s in samples]))
    show("      the copy (vdi.migrate, XO's barrier on its cache included)", percentiles([s.copy_s for s in samples]))
    show("      XO's cache lag after the answers (sum over calls; waits may overlap)",
         percentiles([s.cache_wait_s for s in samples]))
    show("      XO's other calls (the simulator's own time)", percentiles([s.other_busy_s for s in samples]))
    overhead = percentiles([s.overhead_s for s in samples])
    show("    overhead = latency - XO's time (the driver's own time)", overhead)
    show("      meanwhile the stack's processes waited for a CPU (summed; machine contention)",
         percentiles([s.runqueue_s for s in samples]))
    show("    latency - copy (the old definition: cache lag included)",
         percentiles([s.elapsed_s - s.copy_s for s in samples]))
    show_target("(a) overhead over the copy p50", overhead["p50_ms"], "ms", TARGET_OVERHEAD_P50_MS)
    show_target("(a) overhead over the copy p99", overhead["p99_ms"], "ms", TARGET_OVERHEAD_P99_MS)
    # negative: the controller answered before our subscriber saw the event (it re-reads the job in Redis too)
    print(f"\n(b) finished event -> publish answer, {len(lags)} events, {sum(lag < 0 for lag in lags)} of them "
          "seen by us after the answer")
    show("    lag", percentiles(lags))
    show("      XO's time in vm.attachDisk (the call, then its cache lag until the VBD shows plugged)",
         percentiles([s.attach_xo_s for s in samples]))
    lag = percentiles([lag - s.attach_xo_s for lag, s in zip(lags, samples, strict=True)])
    show("      the driver's (lag - XO's time in vm.attachDisk)", lag)
    show_target("(b) finished event -> answer p99, the driver's", lag["p99_ms"], "ms", TARGET_EVENT_P99_MS)
    calls = [sum(s.calls.values()) for s in samples]
    per_method: Counter[str] = Counter()
    for sample in samples:
        per_method.update(sample.calls)
    print(f"\n(d) XO calls per migrating attach (frontend + migrator): max {max(calls)}, by count of calls "
          f"{dict(sorted(Counter(calls).items()))}")
    print("    by method (mean): " + ", ".join(f"{m}={n / len(samples):.2f}" for m, n in sorted(per_method.items())))
    show_target("(d) XO calls per migrating attach (mean)", statistics.fmean(calls), "", TARGET_XO_CALLS)
    if len(calls) > 1:  # the first may read more than the others (e.g. a cache the frontend loads on first use)
        show_target("(d) XO calls per migrating attach after the first (max)", max(calls[1:]), "", TARGET_XO_CALLS)
    if retries:
        print(f"    retried: {dict(retries)}")


async def herd(bench: Bench, count: int, size_bytes: int, rate_bps: int, limit: int, label: str, *,
               target_pct: float | None = TARGET_HERD_PCT) -> None:
    """(c): ``count`` concurrent migrating attaches; makespan against sum(copy) / limit (``target_pct`` None: the
    figure is shown without a target, with the bound that counts XO's own time per job too)."""
    if count <= 0:
        return
    ids = await create_volumes(bench, f"herd{limit}", count, size_bytes)
    before = await settled(bench.admin)
    retries: Counter[str] = Counter()
    ticks = cpu_ticks()
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for volume_id in ids:
            group.create_task(publish(bench, volume_id, retries))
    makespan = time.perf_counter() - started
    after = await settled(bench.admin)
    copy_s = size_bytes / rate_bps
    bound = max(count * copy_s / limit, copy_s)
    busy = _delta(before, after, "busy_s", "vdi.migrate")
    copies = sum(after["migrations"].get("csi-" + v.removeprefix("name:"), 0) for v in ids)
    print(f"\n(c) {label}: {count} concurrent migrating attaches, copy {copy_s * 1000:.0f} ms each, limit {limit}")
    print(f"    makespan {makespan:.2f} s, lower bound {bound:.2f} s = {count} x {copy_s:.3f} s / {limit}")
    print(f"    copies {copies} (expected {count}), vdi.migrate time {busy:.1f} s, "
          f"TOO_MANY_STORAGE_MIGRATES answered {_delta_count(before, after, 'TOO_MANY_STORAGE_MIGRATES')}, "
          f"publish retries {dict(retries) or 0}")
    print(f"    {steal_since(ticks)}")
    if target_pct is not None:
        show_target(f"(c) {label}: makespan over the lower bound", (makespan / bound - 1) * 100, "%", target_pct)
        # XO's time in each copy beyond size / rate (its timer and its barrier on its cache, on a busy machine) is
        # XO's, as (a) counts it: the bound on XO's copies as they ran leaves the driver's scheduling alone.
        xo_copy_s = busy / max(copies, 1)
        print(f"    XO's copies took {xo_copy_s * 1000:.1f} ms each on average ({copy_s * 1000:.0f} ms nominal): "
              f"makespan over {count} x that / {limit} = {count * xo_copy_s / limit:.2f} s: "
              f"{(makespan / max(count * xo_copy_s / limit, copy_s) - 1) * 100:+.1f} % (no target: for reading)")
        return
    # A worker's own XO time per job: the copy with XO's barrier on its cache (vdi.migrate) and the waits for XO's
    # cache to show its writes (the mark before, the cleared mark and the source's exit after, overlapping).
    worker_s = (busy + _delta(before, after, "cache_wait_s", "vdi.set")) / count
    xo_bound = count * worker_s / limit
    print(f"    makespan over the lower bound {(makespan / bound - 1) * 100:+.1f} % (no target under the harsh "
          f"lag: XO's own time per job, {worker_s * 1000:.0f} ms for a {copy_s * 1000:.0f} ms copy, dominates); over "
          f"{count} x that / {limit} = {xo_bound:.2f} s: {(makespan / xo_bound - 1) * 100:+.1f} %")


def _delta_count(before: dict[str, Any], after: dict[str, Any], code: str) -> int:
    return int(after["errors"].get(code, 0) - before["errors"].get(code, 0))


def memory(bench: Bench) -> None:
    rss = {name: rss_mb(proc.pid) for name, proc in sorted(bench.stack.processes.items())
           if name.startswith("migrator")}
    print(f"\n(e) migrator resident memory: {', '.join(f'{n}={mb:.1f} MB' for n, mb in rss.items())}")
    show_target("(e) migrator resident memory (max)", max(rss.values()), "MB", TARGET_MIGRATOR_RSS_MB)
    print(f"    controller resident memory: {rss_mb(bench.stack.processes['controller'].pid):.1f} MB")


async def run(args: argparse.Namespace) -> None:
    rate_bps, size_bytes = parse_size(args.migration_rate), parse_size(args.size)
    slots = args.migrators * args.concurrency
    print(f"machine: {machine()} (at start)")
    with contextlib.ExitStack() as cleanup:
        work = Path(args.workdir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-migration-")))
        if args.only_cross_pool:
            await _cross_pool(work / "f", args)
            return
        started = time.perf_counter()
        async with bench_stack(work / "a", args, cap=slots) as bench:
            print(f"stack up in {time.perf_counter() - started:.1f} s: {args.migrators} migrators x "
                  f"{args.concurrency}, copy rate {args.migration_rate}/s, per-pool cap {slots}, no injected latency")
            describe_knobs(args, noise_floor=NOISE_EVENTS_PER_S)
            await sequential(bench, args.attaches, size_bytes)
            await herd(bench, args.herd, size_bytes, rate_bps, slots, "under XO's cache lag", target_pct=None)
            memory(bench)
        herd_args = argparse.Namespace(**{**vars(args), "cache_lag_ms": args.herd_cache_lag_ms})
        print(f"\n(c) the scheduling of the jobs (queue, claims, per-SR slots), with XO's cache lag "
              f"{args.herd_cache_lag_ms} ms" + ("" if args.herd_cache_lag_ms == args.cache_lag_ms else
              " (SOFTENED on purpose: the lower bound counts the copies only, and XO's lag, three waits per job "
              "by design, would be most of a worker's time)"))
        async with bench_stack(work / "b", herd_args, cap=slots) as bench:
            await herd(bench, args.herd, size_bytes, rate_bps, slots, "default settings")
            memory(bench)
        if args.per_sr_limit:
            limit = min(slots, args.per_sr_limit)
            async with bench_stack(work / "c", herd_args, cap=slots, per_sr_limit=args.per_sr_limit) as bench:
                await herd(bench, args.herd, size_bytes, rate_bps, limit, f"per-SR limit {args.per_sr_limit}",
                           target_pct=TARGET_HERD_TUNED_PCT)
                memory(bench)
        if args.cross_pool_size and args.cross_pool_size != "0":
            await _cross_pool(work / "f", args)
    print(f"\nmachine: {machine()} (at end)")


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
    parser.add_argument("--per-sr-limit", type=int, default=2, help="the migrators' --per-sr-limit in the third (c) "
                        "run; 0 = skip")
    parser.add_argument("--herd-cache-lag-ms", default="0", help="XO's cache lag in the (c) runs after the first "
                        "(default 0: they measure the driver's scheduling against the copies alone)")
    parser.add_argument("--cross-pool-size", default="4GiB", help="virtual size of the disk of (f); 0 = skip (f)")
    parser.add_argument("--cross-pool-allocated", type=float, default=0.25,
                        help="fraction of (f)'s 2 MiB blocks holding data (0.25)")
    parser.add_argument("--cache-lag-ms", default=DEFAULT_CACHE_LAG,
                        help=f"XO's cache lag, LOW-HIGH ms (default {DEFAULT_CACHE_LAG}: the simulator's harsh one)")
    parser.add_argument("--noise-events-per-s", type=float, default=NOISE_EVENTS_PER_S,
                        help=f"background notification events/s (default {NOISE_EVENTS_PER_S:g})")
    parser.add_argument("--only-cross-pool", action="store_true", help="run (f) only")
    parser.add_argument("--workdir", help="keep the stack's logs here (default: a temporary dir, removed)")
    configure_logging("warning")
    sys.exit(signals.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
