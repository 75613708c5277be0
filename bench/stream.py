"""Disk content streaming benchmark: XO REST export -> import between two VDIs on loopback, real bytes.

    make bench-stream      # or: .venv/bin/python -m bench.stream --size 4GiB --allocated 0.25 --runs 3

The XO simulator runs as a separate process in real data mode (needs root); a 4 GiB sparse disk gets ~25 %
random data in runs of whole 2 MiB blocks (as a file system that wrote large files leaves it). Then, each the
median of --runs:
  (a) plain copy: the backing file's data extents copied by pread/pwrite into a new sparse file, then fsync
      (what the machine does without HTTP, VHD or XO in the way);
  (b) stream_copy vhd and raw, each in its own process (the "streaming process", like a migrator): export ->
      exact length -> import into a new VDI of another SR, the simulator writing and fsyncing the target.
Prints throughput as a ratio of (a) (target >= 0.8; throughput = the disk's allocated data / wall time, the
same work as the plain copy), bytes sent / allocated data (vhd target <= 1.01) and the streaming process's
peak RSS (target <= 100 MB). The functions are reusable (bench.migration can call them for a cross-pool figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from dev import signals
from dev.stack import simulator_process
from services.xo_simulator.content import data_extents
from services.xo_simulator.topology import derived_id
from shared.config import XoSettings
from shared.logging import configure_logging
from shared.units import parse_size
from shared.xo.rest import Format, XoRest
from shared.xo.streaming import stream_copy

TOKEN = "sim-token"
BLOCK = 2 * 1024**2
COPY_CHUNK = 8 * 1024**2
SR_A = derived_id("sr", "Pool A", "host-a1", "Local A1")
SR_B = derived_id("sr", "Pool A", "host-a2", "Local A2")
TARGETS = {"ratio": 0.8, "bytes_per_allocated": 1.01, "rss_mb": 100.0}


@dataclass(frozen=True)
class StreamFigures:
    """One streaming run, as the child process measured it."""

    fmt: str
    bytes_sent: int
    duration_s: float
    peak_rss_mb: float


def fill_sparse(path: Path, size: int, fraction: float, seed: int) -> int:
    """Write random data into ``fraction`` of the 2 MiB blocks of ``path`` (runs of 1-16 blocks); returns the
    bytes written."""
    rng = random.Random(seed)
    blocks = size // BLOCK
    wanted = int(blocks * fraction)
    chosen: set[int] = set()
    while len(chosen) < wanted:
        start = rng.randrange(blocks)
        chosen.update(range(start, min(blocks, start + rng.randint(1, 16), start + wanted - len(chosen))))
    fd = os.open(path, os.O_WRONLY)
    try:
        for index in sorted(chosen):
            os.pwrite(fd, os.urandom(BLOCK), index * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(chosen) * BLOCK


def plain_copy(source: Path, target: Path) -> float:
    """Copy the data extents of ``source`` into a new sparse ``target`` and fsync; returns the seconds taken."""
    started = time.perf_counter()
    size = source.stat().st_size
    src = os.open(source, os.O_RDONLY)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(dst, size)
        for first, end in data_extents(src, 0, size):
            for offset in range(first, end, COPY_CHUNK):
                os.pwrite(dst, os.pread(src, min(COPY_CHUNK, end - offset), offset), offset)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    return time.perf_counter() - started


def plain_copies(source: Path, work: Path, runs: int) -> list[float]:
    """``runs`` plain copies of ``source`` into new files of ``work`` (kept until the last one is done, then
    removed); the seconds each took."""
    targets = [work / f"plain-{n}.img" for n in range(runs)]
    try:
        return [plain_copy(source, target) for target in targets]
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


async def measure_stream(xo_url: str, src: str, dst: str, fmt: str) -> StreamFigures:
    """Run one stream_copy in a child process (so its peak RSS is its own) and return its figures."""
    env = {**os.environ, "XOA_URL": xo_url, "XOA_TOKEN": TOKEN}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.stream", "--child", src, dst, fmt, env=env,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the streaming process failed ({proc.returncode})")
    figures = json.loads(out.decode().strip().splitlines()[-1])
    return StreamFigures(fmt, figures["bytes_sent"], figures["duration_s"], figures["peak_rss_mb"])


async def child(src: str, dst: str, fmt: Format) -> None:
    """The streaming process: one stream_copy, then its figures as one JSON line."""
    async with XoRest.from_settings(XoSettings()) as rest:
        result = await stream_copy(rest, src, dst, fmt)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"bytes_sent": result.bytes_sent, "duration_s": result.duration_s, "peak_rss_mb": peak_mb}))


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        return await _measure(args, work)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _measure(args: argparse.Namespace, work: Path) -> int:
    backing = work / "backing"
    sim_args = ("--backing-dir", str(backing), "--device-root", str(work / "dev"), "--log-level", "warning")
    async with simulator_process(work / "logs", *sim_args) as (_, url):
        async with XoRest.from_settings(XoSettings(url=url, token=SecretStr(TOKEN))) as rest:
            src = await rest.create_vdi(SR_A, args.size, "bench-source")
            source = backing / SR_A / f"{src}.img"
            written = await asyncio.to_thread(fill_sparse, source, args.size, args.allocated, args.seed)
            allocated = allocated_bytes(source)
            print(f"disk: {args.size / 1024**3:.2f} GiB virtual, {written / 1024**3:.3f} GiB of data written, "
                  f"{allocated / 1024**3:.3f} GiB allocated")
            plain_s = statistics.median(await asyncio.to_thread(plain_copies, source, work, args.runs))
            print(f"plain copy: {allocated / plain_s / 1024**2:.0f} MiB/s (median of {args.runs}: {plain_s:.2f} s)")
            for fmt in args.formats:
                runs = []
                for n in range(args.runs):
                    dst = await rest.create_vdi(SR_B, args.size, f"bench-{fmt}-{n}")
                    runs.append(await measure_stream(url, src, dst, fmt))
                    await rest.delete_vdi(dst)
                show(fmt, runs, allocated, plain_s)
    return 0


def show(fmt: str, runs: list[StreamFigures], allocated: int, plain_s: float) -> None:
    duration_s = statistics.median(r.duration_s for r in runs)
    ratio = plain_s / duration_s
    per_allocated = runs[0].bytes_sent / allocated
    rss = max(r.peak_rss_mb for r in runs)
    print(f"stream {fmt}: {allocated / duration_s / 1024**2:.0f} MiB/s of disk data "
          f"({runs[0].bytes_sent / duration_s / 1024**2:.0f} MiB/s on the wire, median {duration_s:.2f} s)")
    print(f"  throughput / plain copy = {ratio:.2f}   (target >= {TARGETS['ratio']})")
    bound = f"target <= {TARGETS['bytes_per_allocated']}" if fmt == "vhd" else "raw sends the whole disk: no target"
    print(f"  bytes sent / allocated  = {per_allocated:.4f} ({bound})")
    print(f"  streaming process peak RSS = {rss:.1f} MB   (target <= {TARGETS['rss_mb']:.0f} MB)")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=4 * 1024**3, help="virtual size (default 4GiB)")
    parser.add_argument("--allocated", type=float, default=0.25, help="fraction of blocks with data (0.25)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--formats", nargs="+", default=["vhd", "raw"], choices=["vhd", "raw"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", nargs=3, metavar=("SRC", "DST", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging("warning")
    if args.child:
        asyncio.run(child(*args.child))
        return 0
    if os.geteuid() != 0:
        print("bench.stream: the simulator's real data mode needs root", file=sys.stderr)
        return 1
    return signals.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
