"""`make demo`: the whole stack on embedded defaults (RabbitMQ with its management UI, Redis, the XO simulator
in real data mode, a controller, a node plugin per node VM, two migrators), then the seed's story:

act one: create a migrating volume on host A's tagged SR, attach it on host A's node, write data, move the
workload to host B's node (the disk migrates through the queue), attach, read the data back;
act two: a volume on pool A's shared SR, written on a node of pool A, attached on a node of pool B: the migrator
streams the disk into pool B's shared SR (XO's REST export and import), a progress bar following the job record;
then the timeline. Topology: two-pools (each pool: two hosts with local SRs, one shared SR).

    python -m dev.demo [--once] [--size 256MiB] [--migration-rate 64MiB] [--stream-rate 32MiB] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import redis.asyncio as aioredis
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from dev import signals
from dev.stack import Stack, StackOptions, running_stack
from dev.wait import eventually
from shared import placement
from shared.csi import csi_pb2
from shared.jobs import DEFAULT_ACTIVE_TTL_S, DEFAULT_RESULT_TTL_S, JobStore
from shared.logging import configure_logging
from shared.units import format_size, parse_size
from shared.xo.models import Vdi

T = TypeVar("T")
console = Console()
CAP = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                               access_mode=csi_pb2.VolumeCapability.AccessMode(
                                   mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
VOLUME = "pvc-demo"
DISK = f"csi-{VOLUME}"
SHARED_VOLUME = "pvc-demo-shared"
SHARED_DISK = f"csi-{SHARED_VOLUME}"
# The migrators write a stream's progress into the job record with each heartbeat: every 0.5 s here, for the bar.
MIGRATOR_ENV = {"MIGRATOR_JOB_HEARTBEAT_S": "0.5"}
DATA_BYTES = 96 << 20


@dataclass
class Timeline:
    steps: list[tuple[str, float, str]] = field(default_factory=list)

    @asynccontextmanager
    async def step(self, title: str, note: str = "") -> AsyncIterator[None]:
        console.print(f"[bold cyan]▶[/] {title}")
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        self.steps.append((title, elapsed, note))
        console.print(f"  [green]done[/] in {elapsed * 1000:.0f} ms")

    def show(self) -> None:
        table = Table(title="Timeline")
        for column in ("step", "duration", "where the time went"):
            table.add_column(column)
        for title, elapsed, note in self.steps:
            table.add_row(title, f"{elapsed * 1000:,.0f} ms", note)
        console.print(table)


async def show_topology(stack: Stack) -> None:
    table = Table(title="XO simulator topology")
    for column in ("pool", "host", "SR", "tags", "free", "node VM"):
        table.add_column(column)
    pools = {p["id"]: p["name_label"] for p in await stack.xo.get_objects({"type": "pool"})}
    hosts = await stack.xo.get_objects({"type": "host"})
    vms = await stack.xo.get_objects({"type": "VM"})
    srs = await stack.xo.find_srs()
    for host in sorted(hosts, key=lambda h: h["name_label"]):
        local = [sr for sr in srs if sr.container == host["id"]]
        vm_names = ", ".join(vm["name_label"] for vm in vms if vm.get("$container") == host["id"])
        for sr in local:
            table.add_row(pools.get(host["$pool"], "?"), host["name_label"], sr.name_label, ",".join(sr.tags),
                          format_size(placement.free_bytes(sr)), vm_names)
    for sr in (sr for sr in srs if sr.shared):
        table.add_row(pools.get(sr.pool_id, "?"), "(shared)", sr.name_label, ",".join(sr.tags),
                      format_size(placement.free_bytes(sr)), "")
    console.print(table)


async def story(stack: Stack, size_bytes: int, rate_bps: int) -> Timeline:
    timeline = Timeline()
    vms = {vm["name_label"]: vm for vm in await stack.xo.get_objects({"type": "VM"})}
    host_of = {name: vm["$container"] for name, vm in vms.items()}
    pool = vms["node-a1"]["$pool"]
    controller = stack.controller
    console.rule("act one: a volume follows its pod to another host")
    async with timeline.step("CreateVolume pvc-demo (srsWithTag k8s-migrating, migrating: true)",
                             "placement on node-a1's host (WaitForFirstConsumer preferred topology)"):
        created = await controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=VOLUME, capacity_range=csi_pb2.CapacityRange(required_bytes=size_bytes), volume_capabilities=[CAP],
            parameters={"srsWithTag": "k8s-migrating", "migrating": "true", "csi.storage.k8s.io/fstype": "ext4"},
            accessibility_requirements=csi_pb2.TopologyRequirement(preferred=[csi_pb2.Topology(
                segments={"pool": pool, "host": host_of["node-a1"]})])), timeout=60)
    volume_id = created.volume.volume_id
    console.print(f"  volume [bold]{volume_id}[/] on SR {await _sr_name(stack, DISK)}")
    checksum = await attach_write(stack, timeline, volume_id, "node-a1")
    console.print(f"  wrote {format_size(DATA_BYTES)}, sha256 {checksum[:16]}…")
    expected_s = DATA_BYTES / rate_bps
    async with timeline.step("ControllerPublishVolume on node-a2 (migration through the queue)",
                             f"sparse copy of the written blocks (~{format_size(DATA_BYTES)}) at "
                             f"{format_size(rate_bps)}/s ≈ {expected_s:.1f} s; the rest is queue, lock and XO"):
        publish = controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=stack.vm_ids["node-a2"], volume_capability=CAP), timeout=300)
        await with_progress(publish, expected_s, "migrating disk to host-a2's SR")
    console.print(f"  disk now on SR {await _sr_name(stack, DISK)}")
    await check_read_back(stack, timeline, volume_id, "node-a2", checksum, shown="read back",
                          differs="data read back differs from what was written")
    await act_two(stack, timeline, size_bytes, pool, vms["node-b1"]["$pool"])
    return timeline


async def act_two(stack: Stack, timeline: Timeline, size_bytes: int, pool_a: str, pool_b: str) -> None:
    """A shared-SR volume of pool A attached in pool B: the disk's content is streamed across pools."""
    console.rule("act two: a volume follows its pod to another pool")
    async with timeline.step(f"CreateVolume {SHARED_VOLUME} (srsWithTag k8s-shared, migrating: true)",
                             "on pool A's shared SR; topology: every pool with an SR of the tag"):
        created = await stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=SHARED_VOLUME, capacity_range=csi_pb2.CapacityRange(required_bytes=size_bytes),
            volume_capabilities=[CAP], parameters={"srsWithTag": "k8s-shared", "migrating": "true"},
            accessibility_requirements=csi_pb2.TopologyRequirement(preferred=[csi_pb2.Topology(
                segments={"pool": pool_a})])), timeout=60)
    volume_id = created.volume.volume_id
    pools = sorted(dict(t.segments)["pool"] for t in created.volume.accessible_topology)
    console.print(f"  volume [bold]{volume_id}[/] on SR {await _sr_name(stack, SHARED_DISK)}, accessible from "
                  f"{len(pools)} pools")
    checksum = await attach_write(stack, timeline, volume_id, "node-a1")
    async with timeline.step("ControllerPublishVolume on node-b1 (another pool: a content stream)",
                             "REST export of pool A's disk -> import into a new disk on NFS B, exact length "
                             "from the VHD head; then the names swap and the source goes"):
        publish = stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=stack.vm_ids["node-b1"], volume_capability=CAP), timeout=300)
        await with_stream_progress(stack, publish, SHARED_DISK)
    console.print(f"  disk now on SR {await _sr_name(stack, SHARED_DISK)} (pool B)")
    await check_read_back(stack, timeline, volume_id, "node-b1", checksum, shown="read back on node-b1:",
                          differs="data read back in pool B differs from what was written in pool A")


async def check_read_back(stack: Stack, timeline: Timeline, volume_id: str, node: str, checksum: str, *,
                          shown: str, differs: str) -> None:
    """Stage the volume on ``node`` and read it back; print whether it matches ``checksum``, exit if it differs."""
    read_back = await stage_and_read(stack, timeline, volume_id, node)
    ok = read_back == checksum
    console.print(f"  {shown} sha256 {read_back[:16]}… [{'green' if ok else 'red'}]{'matches' if ok else 'DIFFERS'}[/]")
    if not ok:
        raise SystemExit(differs)


async def with_stream_progress(stack: Stack, call: Awaitable[T], disk: str) -> T:
    """Await ``call`` while a bar shows the stream's progress as the job record in Redis has it (written with
    every heartbeat of the migrator: what ``xocsi jobs list`` shows)."""
    assert stack.redis_url is not None
    task = asyncio.ensure_future(call)
    redis = aioredis.Redis.from_url(stack.redis_url, socket_timeout=5)
    jobs = JobStore(redis, stack.options.redis_prefix, active_ttl_s=DEFAULT_ACTIVE_TTL_S,
                    result_ttl_s=DEFAULT_RESULT_TTL_S)
    columns = (TextColumn("streaming {task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            handle = bar.add_task(disk, total=None)
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                record = await jobs.get(disk)
                if record is not None and record.progress is not None:
                    bar.update(handle, total=record.progress.total_bytes, completed=record.progress.done_bytes)
            record = await jobs.get(disk)
            if record is not None and record.progress is not None:
                bar.update(handle, total=record.progress.total_bytes, completed=record.progress.total_bytes)
    finally:
        await redis.aclose()
    return task.result()


async def attach_write(stack: Stack, timeline: Timeline, volume_id: str, node: str) -> str:
    async with timeline.step(f"ControllerPublishVolume on {node}", "disk already on a usable SR: attach only"):
        ctx = dict((await stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=stack.vm_ids[node], volume_capability=CAP), timeout=60)).publish_context)
    staging, target = await _mount(stack, timeline, volume_id, node, ctx)
    data = os.urandom(DATA_BYTES)
    (target / "data.bin").write_bytes(data)
    await _unmount(stack, timeline, volume_id, node, staging, target)
    async with timeline.step(f"ControllerUnpublishVolume from {node}", "vbd.delete"):
        await stack.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=stack.vm_ids[node]), timeout=60)
    return hashlib.sha256(data).hexdigest()


async def stage_and_read(stack: Stack, timeline: Timeline, volume_id: str, node: str) -> str:
    ctx = dict((await stack.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=stack.vm_ids[node], volume_capability=CAP), timeout=60)).publish_context)
    staging, target = await _mount(stack, timeline, volume_id, node, ctx)
    digest = hashlib.sha256((target / "data.bin").read_bytes()).hexdigest()
    await _unmount(stack, timeline, volume_id, node, staging, target)
    return digest


async def _mount(stack: Stack, timeline: Timeline, volume_id: str, node: str, ctx: dict[str, str]
                 ) -> tuple[Path, Path]:
    staging, target = stack.work / node / "staging", stack.work / node / "target"
    async with timeline.step(f"NodeStageVolume + NodePublishVolume on {node}", f"device {ctx['device']}: "
                             "blkid, mkfs.ext4 when blank, mount, bind mount"):
        await stack.node(node).NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging), volume_capability=CAP),
            timeout=120)
        await stack.node(node).NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging), target_path=str(target),
            volume_capability=CAP), timeout=60)
    return staging, target


async def _unmount(stack: Stack, timeline: Timeline, volume_id: str, node: str, staging: Path, target: Path) -> None:
    async with timeline.step(f"NodeUnpublishVolume + NodeUnstageVolume on {node}", "umount"):
        await stack.node(node).NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=str(target)), timeout=60)
        await stack.node(node).NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging)), timeout=60)


async def with_progress(call: Awaitable[T], expected_s: float, label: str) -> T:
    """Await ``call`` while a bar shows the elapsed share of the expected copy time."""
    task = asyncio.ensure_future(call)
    with Progress(TextColumn(label), BarColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        handle = bar.add_task(label, total=max(expected_s, 0.1))
        started = time.perf_counter()
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            bar.update(handle, completed=min(time.perf_counter() - started, expected_s * 0.99))
    return task.result()


async def _sr_name(stack: Stack, disk: str) -> str:
    async def one_disk() -> Vdi:
        # XO's cache shows a rename, and the end of a copy, a moment after the call that made them
        found = await stack.xo.find_vdis(name_label=disk)
        assert len(found) == 1, [vdi.id for vdi in found]  # "not yet" for eventually
        return found[0]

    vdi = await eventually(one_disk, 30, interval_s=0.05, description=f"exactly one VDI {disk} in XO")
    sr = await stack.xo.get_sr(vdi.sr_id)
    return sr.name_label if sr else vdi.sr_id


def where_to_look(stack: Stack) -> None:
    table = Table(title="Where to look", show_header=False)
    table.add_row("RabbitMQ management UI", f"{stack.management_url}  (user guest, password guest); "
                  "queues xocsi.migrations and xocsi.migrations.dead")
    table.add_row("jobs", f"AMQP_URL={stack.amqp_url} REDIS_URL={stack.redis_url} .venv/bin/xocsi jobs list")
    table.add_row("CSI controller", f".venv/bin/xocsi --endpoint unix://{stack.controller_socket} volume list")
    admin = stack.admin_url
    table.add_row("XO simulator", f"{stack.xo_url}  (admin API: {admin}/_sim/stats, {admin}/_sim/state)")
    for name, port in sorted(stack.metrics_ports.items()):
        table.add_row(f"metrics: {name}", f"http://127.0.0.1:{port}/metrics")
    table.add_row("logs", str(stack.log_dir))
    console.print(table)


async def main_async(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        console.print("[red]The demo needs root[/]: the simulator attaches loop devices and the node mounts them.")
        return 2
    size, rate = parse_size(args.size), parse_size(args.migration_rate)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="xo-csi-demo-"))
    options = StackOptions(topology="two-pools", migrators=2, management=True, host_topology=True, log_level="info",
                           metrics=True, sim_args=("--migration-rate", str(rate),
                                                   "--stream-rate", str(parse_size(args.stream_rate))))
    os.environ.update(MIGRATOR_ENV)  # the migrators this demo starts inherit it
    started = time.perf_counter()
    _stop_on_signals()
    with console.status("starting RabbitMQ (management), Redis, the XO simulator (two pools), frontends and 2 "
                        "migrators…"):
        stack_cm = running_stack(work, options)
        stack = await stack_cm.__aenter__()
    try:
        console.print(f"stack up in {time.perf_counter() - started:.1f} s (logs in {stack.log_dir})")
        await show_topology(stack)
        timeline = await story(stack, size, rate)
        timeline.show()
        where_to_look(stack)
        if not args.once:
            console.print("[bold]The stack stays up; Ctrl-C stops everything.[/]")
            await asyncio.Event().wait()
    finally:
        with console.status("stopping everything the demo started…"):
            await stack_cm.__aexit__(*sys.exc_info())
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _stop_on_signals() -> None:
    """SIGTERM (``timeout``, a service manager, a CI runner) and SIGHUP stop the demo as Ctrl-C does: the main task
    is cancelled, so the ``finally`` above stops everything it started (dev/signals.py)."""
    signals.stop_on_signals(lambda sig: console.print(f"[yellow]{sig.name}: stopping everything the demo started…[/]"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="play the story, stop everything, exit 0")
    parser.add_argument("--size", default="256MiB", help="volume size (default 256MiB)")
    parser.add_argument("--migration-rate", default="64MiB", help="simulated copy rate per second (default 64MiB)")
    parser.add_argument("--stream-rate", default="32MiB", help="simulated pace of XO's REST exports, act two's "
                        "content stream (default 32MiB)")
    parser.add_argument("--workdir", help="keep state and logs here (default: a temp dir, removed at the end)")
    args = parser.parse_args(argv)
    configure_logging("warning")
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 0
    except asyncio.CancelledError:  # SIGTERM/SIGHUP, after the cleanup
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
