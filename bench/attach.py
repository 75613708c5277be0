"""Controller attach benchmark against the simulator (no injected latency), frontend as a separate process.

    make bench-attach        # or: .venv/bin/python -m bench.attach --volumes 200

Prints: fresh-attach latency minus the simulator's own time (targets p50 <= 10 ms, p99 <= 50 ms),
idempotent ControllerPublishVolume throughput (target >= 500 RPC/s), XO calls per fresh attach
(target <= 4, from the simulator's stats) and the frontend's resident memory (target <= 100 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.report import percentiles, show
from dev.stack import StackOptions, running_stack
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.logging import configure_logging

_Mode = csi_pb2.VolumeCapability.AccessMode
CAP = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                               access_mode=_Mode(mode=_Mode.SINGLE_NODE_WRITER))


async def stats(admin: httpx.AsyncClient) -> dict[str, Any]:
    response = await admin.get("/_sim/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run(args: argparse.Namespace) -> None:
    options = StackOptions(real_data=False, nodes=False, log_level="warning", sim_args=("--log-level", "warning"))
    with tempfile.TemporaryDirectory(prefix="bench-attach-") as work:
        async with running_stack(Path(work), options) as stack, \
                httpx.AsyncClient(base_url=stack.admin_url) as admin:
            sr_id = await stack.sr_id("Local A1")
            await measure(args, stack.controller, admin, sr_id, stack.vm_ids["node-a1"])
            print(f"frontend resident memory: {rss_mb(stack.processes['controller'].pid):.1f} MB")


async def measure(args: argparse.Namespace, controller: csi_pb2_grpc.ControllerStub, admin: httpx.AsyncClient,
                  sr_id: str, vm_id: str) -> None:
    ids = []
    for n in range(args.volumes):
        volume = await controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=f"bench-{n}", capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 20),
            volume_capabilities=[CAP], parameters={"srUUID": sr_id}), timeout=30)
        ids.append(volume.volume.volume_id)
    latencies, overheads, xo_calls = [], [], []
    for volume_id in ids:
        before = await stats(admin)
        started = time.perf_counter()
        await controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=vm_id, volume_capability=CAP), timeout=30)
        elapsed = time.perf_counter() - started
        after = await stats(admin)
        sim_s = sum(after["busy_s"].values()) - sum(before["busy_s"].values())
        latencies.append(elapsed)
        overheads.append(elapsed - sim_s)
        xo_calls.append(after["total_calls"] - before["total_calls"])
        await controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=vm_id), timeout=30)
    show(f"fresh attach, {len(ids)} volumes, publish latency", percentiles(latencies))
    show("fresh attach minus the simulator's own time", percentiles(overheads))
    print(f"XO calls per fresh attach: mean={sum(xo_calls) / len(xo_calls):.2f} max={max(xo_calls)}")
    attached = ids[: args.attached]
    for volume_id in attached:
        await controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=vm_id, volume_capability=CAP), timeout=30)
    samples: list[float] = []

    async def worker(k: int) -> None:
        for i in range(args.repeat // args.concurrency):
            started = time.perf_counter()
            await controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
                volume_id=attached[(k + i) % len(attached)], node_id=vm_id, volume_capability=CAP), timeout=30)
            samples.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for k in range(args.concurrency):
            group.create_task(worker(k))
    elapsed = time.perf_counter() - started
    show(f"idempotent publish, {len(samples)} calls, {args.concurrency} concurrent",
         {"rpc_per_s": len(samples) / elapsed, **percentiles(samples)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=200, help="fresh attaches to measure")
    parser.add_argument("--attached", type=int, default=20, help="volumes kept attached for the idempotent run")
    parser.add_argument("--repeat", type=int, default=4000, help="idempotent publishes")
    parser.add_argument("--concurrency", type=int, default=32)
    configure_logging("warning")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
