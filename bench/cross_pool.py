"""(f) of ``make bench-migration``: moves across pools with real bytes, the whole stack as separate processes.

The simulator (real data mode, topology two-pools, as harsh as by default), a controller and one migrator; a
migrating volume on pool A's shared SR whose backing file gets --cross-pool-allocated of its 2 MiB blocks filled
with random data (bench.stream.fill_sparse) and is copied plainly (bench.stream.plain_copies, as make bench-stream
does), then ControllerPublishVolume to a node of pool B, of pool A, of pool B: each time the migrator streams it
through XO's REST export and import into the other pool's shared SR. Prints, beside their targets (medians):
  - stream throughput (the disk's allocated data / the stream's time, from the migrator's
    xocsi_migration_stream_duration_seconds) as a ratio of a plain copy of the backing file's data extents
    (median of 3; target >= 0.8),
  - bytes sent (xocsi_migration_stream_bytes_total) / allocated bytes of the source (target <= 1.01),
  - the migrator's peak resident memory while it streams (VmHWM; target <= 100 MB: nothing is buffered).
Needs root (loop devices, sparse backing files).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.stream import TARGETS, allocated_bytes, fill_sparse, plain_copies
from dev.stack import Stack, StackOptions, running_stack
from shared.backoff import Backoff, retrying
from shared.csi import csi_pb2
from shared.units import format_size

SHARED_MIGRATING = {"srsWithTag": "k8s-shared", "migrating": "true"}
DISK = "csi-bench-xpool"
CAP = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                               access_mode=csi_pb2.VolumeCapability.AccessMode(
                                   mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
RETRIED = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
PLAIN_RUNS = 3


async def measure(work: Path, size: int, fraction: float, seed: int, moves: int = 3) -> None:
    """Run (f) under ``work`` and print its figures: the plain copies as bench.stream makes them (3 in a row, right
    after the data is written), then ``moves`` moves between the pools (A -> B -> A ...); medians are shown."""
    # info: the stack knows a migrator is up by its consumer_started line
    options = StackOptions(topology="two-pools", migrators=1, metrics=True, nodes=False, log_level="info",
                           sim_args=("--log-level", "warning"))
    started = time.perf_counter()
    async with running_stack(work, options) as stack:
        print(f"\n(f) moves across pools, real bytes: stack up in {time.perf_counter() - started:.1f} s "
              "(simulator as harsh as by default, 1 migrator)")
        volume_id = await _volume_on_pool_a(stack, size)
        source = await _backing_file(stack)
        written = await asyncio.to_thread(fill_sparse, source, size, fraction, seed)
        allocated = allocated_bytes(source)
        print(f"    disk: {format_size(size)} virtual, {format_size(written)} of data written, "
              f"{format_size(allocated)} allocated; {moves} moves A -> B -> A ...")
        plain_s = statistics.median(await asyncio.to_thread(plain_copies, source, work, PLAIN_RUNS))
        port, pid = stack.metrics_ports["migrator-1"], stack.processes["migrator-1"].pid
        streams, sent, publishes, peaks = [], [], [], []
        for move in range(moves):
            before = await _stream_figures(port)
            publish_s, peak = await _publish(stack, volume_id, "node-b1" if move % 2 == 0 else "node-a1", pid)
            after = await _stream_figures(port)
            streams.append(after[0] - before[0])
            sent.append(after[1] - before[1])
            publishes.append(publish_s)
            peaks.append(peak)
    stream_s = statistics.median(streams)
    print(f"    plain copy of the data extents: {allocated / plain_s / 2**20:.0f} MiB/s (median of {PLAIN_RUNS}, "
          f"{plain_s:.2f} s, measured as make bench-stream does; on a VM whose disk writes land in the host's cache "
          "it varies several-fold from run to run)")
    print(f"    stream: {allocated / stream_s / 2**20:.0f} MiB/s of disk data (median {stream_s:.2f} s; the whole "
          f"publish: median {statistics.median(publishes):.2f} s)")
    print(f"    throughput / plain copy = {plain_s / stream_s:.2f}   (target >= {TARGETS['ratio']})")
    print(f"    bytes sent / allocated  = {max(sent) / allocated:.4f}   (target <= {TARGETS['bytes_per_allocated']})")
    print(f"    migrator peak RSS while streaming = {max(peaks):.1f} MB   (target <= {TARGETS['rss_mb']:.0f} MB)")


async def _volume_on_pool_a(stack: Stack, size: int) -> str:
    vm = await stack.xo.get_vm(stack.vm_ids["node-a1"])
    assert vm is not None
    response = await stack.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="bench-xpool", capacity_range=csi_pb2.CapacityRange(required_bytes=size), volume_capabilities=[CAP],
        parameters=SHARED_MIGRATING, accessibility_requirements=csi_pb2.TopologyRequirement(
            preferred=[csi_pb2.Topology(segments={"pool": vm.pool_id})])), timeout=60)
    return str(response.volume.volume_id)


async def _backing_file(stack: Stack) -> Path:
    [vdi] = await stack.xo.find_vdis(name_label=DISK)
    return stack.work / "backing" / vdi.sr_id / f"{vdi.id}.img"


async def _publish(stack: Stack, volume_id: str, node: str, migrator_pid: int) -> tuple[float, float]:
    """Publish on ``node`` as external-attacher does (ABORTED retried), then unpublish; (seconds of the publish,
    the migrator's peak RSS in MB meanwhile)."""
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=stack.vm_ids[node],
                                                     volume_capability=CAP)
    started = time.perf_counter()
    async with _sampling_rss(migrator_pid) as peak:
        await retrying(lambda _: stack.controller.ControllerPublishVolume(request, timeout=300),
                       backoff=Backoff(start_s=0.1, cap_s=2.0, jitter=False), give_up_after_s=1800,
                       retry_if=lambda exc: isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRIED)
    elapsed = time.perf_counter() - started
    await stack.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, node_id=stack.vm_ids[node]), timeout=60)
    return elapsed, max(peak)


@contextlib.asynccontextmanager
async def _sampling_rss(pid: int) -> AsyncIterator[list[float]]:
    """The process's peak RSS (VmHWM, MB) while the block runs, sampled every 50 ms and read once at the end."""
    samples = [_status_mb(pid, "VmRSS:")]

    async def sample() -> None:
        while True:
            samples.append(_status_mb(pid, "VmRSS:"))
            await asyncio.sleep(0.05)  # a sampling period, not synchronisation

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        samples.append(_status_mb(pid, "VmHWM:"))


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


async def _stream_figures(metrics_port: int) -> tuple[float, float]:
    """(seconds streamed, bytes sent) from the migrator's /metrics."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    values = {sample.name: sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples}
    return values.get("xocsi_migration_stream_duration_seconds_sum", 0.0), \
        values.get("xocsi_migration_stream_bytes_total", 0.0)
