"""Soak and fault injection: many migrating volumes moved between nodes while faults hit every component,
then an invariant check and a report. Seeded, so a failing run can be replayed.

    make soak DURATION=10m SEED=1         # python -m dev.soak --duration 10m --seed 1

Workload: workers publish volumes to random nodes the way external-attacher does (per-call timeout,
exponential backoff on every error), stage, verify the checksum written at the previous attach, write new
data, and detach. Faults: kill -9 + restart of migrators, the controller and node plugins, RabbitMQ and
Redis restarts, XO errors, XO latency spikes, dropped XO sockets, deadlines expiring mid-wait.
Exit status: 0 when every invariant holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx

from dev import faults, signals
from dev.invariants import check_during, check_final
from dev.stack import Stack, StackOptions, running_stack
from shared import backoff
from shared.csi import csi_pb2
from shared.errors import DomainError, OperationPending
from shared.logging import configure_logging
from shared.units import parse_duration_s

T = TypeVar("T")
CAP = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                               access_mode=csi_pb2.VolumeCapability.AccessMode(
                                   mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
CALL_TIMEOUT_S = 15.0  # like external-attacher --timeout (scaled down)
SIDECAR_BACKOFF = backoff.Backoff(start_s=0.2, cap_s=5.0, jitter=False)  # the sidecars' exponential backoff
OP_DEADLINE_S = 240.0  # an operation still failing after this is a violation
DATA_BYTES = 1 << 20


@dataclass
class Volume:
    name: str
    volume_id: str
    node: str | None = None  # where it was last attached
    checksum: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Report:
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    attach_s: dict[str, list[float]] = field(default_factory=lambda: {"migrated": [], "direct": []})
    violations: list[str] = field(default_factory=list)
    invariants: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self, migrations: int, seconds: float) -> dict[str, Any]:
        return {
            "seconds": round(seconds, 1), "operations": dict(self.ops), "faults": dict(self.faults),
            "retries_by_code": dict(self.retries), "migrations": migrations,
            "attach_latency_ms": {kind: _percentiles(samples) for kind, samples in self.attach_s.items()},
            "invariants": self.invariants, "violations": self.violations, "notes": self.notes,
        }


def _percentiles(samples: list[float]) -> dict[str, float]:
    if len(samples) < 2:
        return {"n": len(samples)}
    q = statistics.quantiles(sorted(samples), n=100, method="inclusive")
    return {"n": len(samples), "p50": round(q[49] * 1000, 1), "p95": round(q[94] * 1000, 1),
            "p99": round(q[98] * 1000, 1)}


async def retrying(what: str, report: Report, call: Any, *, first_timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """Call ``call(timeout)`` until it succeeds, as a CSI sidecar would: exponential backoff on any error."""
    def count(exc: Exception) -> None:
        assert isinstance(exc, grpc.aio.AioRpcError)
        report.retries[exc.code().name] += 1

    try:
        return await backoff.retrying(lambda n: call(first_timeout_s if n == 0 else CALL_TIMEOUT_S),
                                      backoff=SIDECAR_BACKOFF, give_up_after_s=OP_DEADLINE_S, on_retry=count,
                                      retry_if=lambda exc: isinstance(exc, grpc.aio.AioRpcError))
    except grpc.aio.AioRpcError as exc:
        report.retries[exc.code().name] += 1
        raise AssertionError(f"{what} still failing after {OP_DEADLINE_S:g}s: {exc.code().name} "
                             f"{exc.details()}") from exc


async def xo_retrying(read: Callable[[], Awaitable[T]]) -> T:
    """The soak's own XO reads go through the injected XO faults too: retry them with a backoff."""
    return await backoff.retrying(lambda _: read(), backoff=SIDECAR_BACKOFF, give_up_after_s=OP_DEADLINE_S,
                                  retry_if=lambda exc: isinstance(exc, DomainError))


class Workload:
    """The attacher + kubelet side: move volumes between nodes, checking data at every attach."""

    def __init__(self, stack: Stack, volumes: list[Volume], report: Report, short_deadline_rate: float) -> None:
        self.stack, self.volumes, self.report = stack, volumes, report
        self.short_deadline_rate = short_deadline_rate
        self.host_of: dict[str, str] = {}
        self.expected_migrations = 0

    async def worker(self, rng: random.Random, stop: asyncio.Event) -> None:
        while not stop.is_set():
            idle = [v for v in self.volumes if not v.lock.locked()]
            if not idle:
                await asyncio.sleep(0.05)  # every volume busy: yield to the other workers
                continue
            volume = rng.choice(idle)
            async with volume.lock:
                node = rng.choice(sorted(self.stack.vm_ids))
                try:
                    await self.move(volume, node, rng)
                except AssertionError as exc:
                    self.report.violations.append(str(exc))

    async def needs_migration(self, volume: Volume, node: str) -> bool:
        """Whether the disk's SR is unusable from the node's host, read from XO before the publish."""
        async def read() -> bool:
            name = f"csi-{volume.name}"
            vdis = await self.stack.xo.find_vdis(name_label=name)
            sr = await self.stack.xo.get_sr(vdis[0].sr_id) if len(vdis) == 1 else None
            if sr is None:  # the disk or its SR invisible (XO lost the pool, maybe between the two reads): retried
                await self.stack.xo.check_view_complete(f"disk {name}")
                raise OperationPending(f"{len(vdis)} VDIs named {name} or no SR of theirs in XO's view; read again")
            return sr.container != self.host_of[node]

        return await xo_retrying(read)

    async def move(self, volume: Volume, node: str, rng: random.Random) -> None:
        migrated = await self.needs_migration(volume, node)
        self.expected_migrations += migrated
        first_timeout = 0.5 if migrated and rng.random() < self.short_deadline_rate else CALL_TIMEOUT_S
        request = csi_pb2.ControllerPublishVolumeRequest(volume_id=volume.volume_id,
                                                         node_id=self.stack.vm_ids[node], volume_capability=CAP)
        started = time.perf_counter()
        response = await retrying(f"publish {volume.name} to {node}", self.report,
                                  lambda t: self.stack.controller.ControllerPublishVolume(request, timeout=t),
                                  first_timeout_s=first_timeout)
        self.report.attach_s["migrated" if migrated else "direct"].append(time.perf_counter() - started)
        self.report.ops["publish"] += 1
        await self.use(volume, node, dict(response.publish_context))
        unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id,
                                                             node_id=self.stack.vm_ids[node])
        await retrying(f"unpublish {volume.name}", self.report,
                       lambda t: self.stack.controller.ControllerUnpublishVolume(unpublish, timeout=t))
        self.report.ops["unpublish"] += 1
        volume.node = node

    async def use(self, volume: Volume, node: str, ctx: dict[str, str]) -> None:
        stub = self.stack.node(node)
        staging = self.stack.work / "mnt" / node / volume.name / "staging"
        target = self.stack.work / "mnt" / node / volume.name / "target"
        stage = csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, publish_context=ctx,
                                               staging_target_path=str(staging), volume_capability=CAP)
        await retrying(f"stage {volume.name}", self.report, lambda t: stub.NodeStageVolume(stage, timeout=t))
        publish = csi_pb2.NodePublishVolumeRequest(volume_id=volume.volume_id, publish_context=ctx,
                                                   staging_target_path=str(staging), target_path=str(target),
                                                   volume_capability=CAP)
        await retrying(f"node publish {volume.name}", self.report,
                       lambda t: stub.NodePublishVolume(publish, timeout=t))
        self.verify_and_write(volume, target)
        self.report.ops["stage+write"] += 1
        unpub = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
        await retrying(f"node unpublish {volume.name}", self.report,
                       lambda t: stub.NodeUnpublishVolume(unpub, timeout=t))
        unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=str(staging))
        await retrying(f"unstage {volume.name}", self.report, lambda t: stub.NodeUnstageVolume(unstage, timeout=t))

    def verify_and_write(self, volume: Volume, target: Path) -> None:
        data_file = target / "data.bin"
        if volume.checksum is not None:
            found = hashlib.sha256(data_file.read_bytes()).hexdigest() if data_file.exists() else "(missing)"
            if found != volume.checksum:
                self.report.violations.append(f"{volume.name}: checksum {found[:12]} != written "
                                              f"{volume.checksum[:12]}")
            self.report.ops["checksums_verified"] += 1
        data = os.urandom(DATA_BYTES)
        data_file.write_bytes(data)
        with data_file.open("rb") as handle:
            os.fsync(handle.fileno())
        volume.checksum = hashlib.sha256(data).hexdigest()


async def create_volumes(stack: Stack, count: int, report: Report) -> list[Volume]:
    volumes = []
    for n in range(count):
        request = csi_pb2.CreateVolumeRequest(
            name=f"soak-{n:03d}", capacity_range=csi_pb2.CapacityRange(required_bytes=64 << 20),
            volume_capabilities=[CAP], parameters={"srsWithTag": "k8s-migrating", "migrating": "true"})
        response = await retrying(f"create soak-{n:03d}", report,
                                  lambda t, r=request: stack.controller.CreateVolume(r, timeout=t))
        volumes.append(Volume(request.name, response.volume.volume_id))
    return volumes


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="xo-csi-soak-"))
    options = StackOptions(
        migrators=args.migrators, management=True, log_level="info",
        sim_args=("--migration-rate", args.migration_rate, "--fault-seed", str(args.seed)),
        controller_args=(), migrator_args=("--concurrency", "2"))
    report, started = Report(), time.monotonic()
    os.environ.update({"MIGRATOR_JOB_RESULT_TTL_S": "3", "CSI_JOB_RESULT_TTL_S": "3"})
    async with running_stack(work, options) as stack:
        vms = await stack.xo.get_objects({"type": "VM"})
        # the node VMs' system disks: there before the soak, not its business
        preexisting = frozenset(str(v["id"]) for v in await stack.xo.get_objects({"type": "VDI"}))
        volumes = await create_volumes(stack, args.volumes, report)
        workload = Workload(stack, volumes, report, short_deadline_rate=0.2)
        workload.host_of = {vm["name_label"]: vm["$container"] for vm in vms}
        async with httpx.AsyncClient(base_url=stack.admin_url,
                                     timeout=10) as admin:
            stop = asyncio.Event()
            schedule = faults.Schedule(stack, admin, random.Random(rng.random()), report.faults,
                                       interval_s=args.fault_interval, kinds=args.faults)
            async with asyncio.TaskGroup() as group:
                for _ in range(args.workers):
                    group.create_task(workload.worker(random.Random(rng.random()), stop))
                fault_task = group.create_task(schedule.run(stop, after_each=lambda: xo_retrying(
                    lambda: check_during(stack, volumes, report, preexisting))))
                await asyncio.sleep(parse_duration_s(args.duration))  # the soak's duration
                stop.set()
                await fault_task
            await schedule.clear()
        await check_final(stack, volumes, workload.host_of, report, preexisting)
        migrations = sum((await admin_stats(stack)).get("migrations", {}).values())
        report.invariants["each_migrating_attach_migrated_exactly_once"] = migrations == workload.expected_migrations
        if migrations != workload.expected_migrations:
            report.violations.append(f"{migrations} migrations in XO for {workload.expected_migrations} attaches "
                                     "that needed one")
        summary = report.summary(migrations, time.monotonic() - started)
    print_report(summary, args)
    return 0 if not report.violations and all(report.invariants.values()) else 1


async def admin_stats(stack: Stack) -> dict[str, Any]:
    base = stack.admin_url
    async with httpx.AsyncClient(base_url=base, timeout=10) as admin:
        return dict((await admin.get("/_sim/stats")).json())


def print_report(summary: dict[str, Any], args: argparse.Namespace) -> None:
    print(json.dumps(summary, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2))
    verdict = "PASSED" if not summary["violations"] and all(summary["invariants"].values()) else "FAILED"
    print(f"soak {verdict}: seed {args.seed}, {summary['seconds']} s, {sum(summary['operations'].values())} "
          f"operations, {sum(summary['faults'].values())} faults, {summary['migrations']} migrations")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", default="2m", help="how long the workload and faults run (e.g. 90s, 15m)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--migrators", type=int, default=2)
    parser.add_argument("--migration-rate", default="64MiB")
    parser.add_argument("--fault-interval", type=float, default=8.0, help="mean seconds between faults")
    parser.add_argument("--faults", nargs="*", default=list(faults.KINDS), choices=list(faults.KINDS))
    parser.add_argument("--report", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (the simulator attaches loop devices, the node plugins mount)", file=sys.stderr)
        return 2
    configure_logging("warning")
    return signals.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
