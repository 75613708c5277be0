"""``xo-sim`` CLI: parse flags, configure logging, start the simulator, print its URL, run until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from shared.logging import configure_logging, get_logger
from shared.units import parse_size

from .cache import Lag
from .faults import FaultRule, Faults, Latency
from .server import (
    DEFAULT_CACHE_LAG,
    DEFAULT_DESTROY_RETRY_MS,
    DEFAULT_MIGRATE_RETRY_MS,
    DEFAULT_MIGRATION_RATE_BPS,
    DEFAULT_NOISE_EVENTS_PER_S,
    start_simulator,
)

log = get_logger(__name__)
T = TypeVar("T")


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen must be HOST:PORT, not {value!r}")
    return host or "127.0.0.1", int(port)


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` from a parser that raises ValueError (its message becomes the error)."""
    def convert(value: str) -> T:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return convert


_size = _argument(parse_size)
_latency = _argument(Latency.parse)
_lag = _argument(Lag.parse)


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from exc
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
    return number


def _fault(value: str) -> list[FaultRule]:
    try:
        return Faults.parse(json.loads(value))
    except (ValueError, ValidationError) as exc:
        raise argparse.ArgumentTypeError(f"bad --fault {value!r}: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    """The xo-sim argument parser."""
    parser = argparse.ArgumentParser(prog="xo-sim", description="Xen Orchestra JSON-RPC simulator")
    parser.add_argument("--topology", default="two-hosts",
                        help="topology YAML file, a bundled name (two-hosts, shared-pool, two-pools), or a generated "
                             "one of real size: generated:pools=4,hosts=32,vms=2000,vdis=10000,seed=1,csi=0.15")
    parser.add_argument("--listen", type=_listen, default=("127.0.0.1", 8080), metavar="HOST:PORT",
                        help="address to listen on; port 0 picks a free port (default 127.0.0.1:8080)")
    parser.add_argument("--admin", action="store_true", help="enable the /_sim/ admin HTTP API")
    parser.add_argument("--migration-rate", type=_size, default=DEFAULT_MIGRATION_RATE_BPS, metavar="BYTES_PER_S",
                        help="migration copy rate in bytes/s, units allowed (200MiB); 0 = instant (default 1GiB)")
    parser.add_argument("--stream-rate", type=_size, default=0, metavar="BYTES_PER_S",
                        help="pace of REST content exports (GET /rest/v0/vdis/{id}.vhd|raw) in bytes/s, units "
                             "allowed; 0 = as fast as disk and socket go (default)")
    parser.add_argument("--max-storage-migrations", type=int, default=3, metavar="N",
                        help="concurrent storage migrations per pool before TOO_MANY_STORAGE_MIGRATES (default 3)")
    parser.add_argument("--plug-delay-ms", type=float, default=0, metavar="MS",
                        help="0: plugs complete before the call answers; >0: they complete later, reported by event")
    parser.add_argument("--latency-ms", type=_latency, default=Latency({}), metavar="SPEC",
                        help="added latency: '5' for every method or 'vdi.migrate=50,*=2'")
    parser.add_argument("--fault", type=_fault, action="append", default=[], metavar="JSON",
                        help='fault rule(s), repeatable: {"method":"vdi.migrate","xapi":"SR_BACKEND_FAILURE_44",'
                             '"count":1}, {"kind":"drop_socket","method":"vbd.connect"} or '
                             '{"kind":"pool_disconnect","pool":"<uuid>","duration_s":30}')
    parser.add_argument("--fault-seed", type=int, default=None,
                        help="seed for fault 'rate' draws, cache lags and noise")
    parser.add_argument("--cache-lag-ms", type=_lag, default=Lag.parse(DEFAULT_CACHE_LAG), metavar="LOW-HIGH",
                        help="how long XO's cache takes to show a change, uniform in LOW-HIGH ms "
                             f"(default {DEFAULT_CACHE_LAG}); 0 = instant, for benchmarks only")
    parser.add_argument("--noise-events-per-s", type=_non_negative, default=DEFAULT_NOISE_EVENTS_PER_S,
                        metavar="N", help="background changes of unrelated objects per second "
                                          f"(default {DEFAULT_NOISE_EVENTS_PER_S:g}); 0 = off, for benchmarks only")
    parser.add_argument("--migrate-retry-ms", type=_non_negative, default=DEFAULT_MIGRATE_RETRY_MS, metavar="MS",
                        help="delay between XO's 10 tries of a live migration refused with "
                             f"TOO_MANY_STORAGE_MIGRATES (default {DEFAULT_MIGRATE_RETRY_MS:g})")
    parser.add_argument("--destroy-retry-ms", type=_non_negative, default=DEFAULT_DESTROY_RETRY_MS, metavar="MS",
                        help="delay between XO's 10 tries of vdi.delete on a VDI in use "
                             f"(default {DEFAULT_DESTROY_RETRY_MS:g})")
    parser.add_argument("--backing-dir", type=Path, help="real data mode: folder for sparse VDI files (root)")
    parser.add_argument("--device-root", type=Path, help="real data mode: folder for <vm>/<device> symlinks (root)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly (loop devices detached)."""
    host, port = args.listen
    started_s = time.perf_counter()
    handle = await start_simulator(
        args.topology, host=host, port=port, admin=args.admin, migration_rate_bps=args.migration_rate,
        max_storage_migrations=args.max_storage_migrations, plug_delay_ms=args.plug_delay_ms,
        latency=args.latency_ms, faults=[rule for rules in args.fault for rule in rules],
        fault_seed=args.fault_seed, backing_dir=args.backing_dir, device_root=args.device_root,
        cache_lag_ms=args.cache_lag_ms, noise_events_per_s=args.noise_events_per_s,
        migrate_retry_ms=args.migrate_retry_ms, destroy_retry_ms=args.destroy_retry_ms,
        stream_rate_bps=args.stream_rate,
    )
    # The loaded objects live as long as the process: keep them out of the cyclic GC, whose full pass over a generated
    # XO of real size (tens of thousands of objects) would stall every answer for ~100 ms (XO's V8 heap does not).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        kinds = Counter(obj["type"] for obj in handle.state.all().values())
        shown = ("pool", "host", "VM-controller", "SR", "VM", "VDI", "VBD")
        print(f"xo-sim started in {time.perf_counter() - started_s:.2f} s: {len(handle.state)} objects ("
              + ", ".join(f"{kinds[kind]} {kind}" for kind in shown) + ")")
        print(f"xo-sim listening on {handle.url}", flush=True)
        await stop.wait()
        log.info("simulator_stopping")
    finally:
        await handle.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.backing_dir is None) != (args.device_root is None):
        parser.error("--backing-dir and --device-root go together")
    configure_logging(args.log_level, service="xo-sim")
    try:
        asyncio.run(serve(args))
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"xo-sim: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
