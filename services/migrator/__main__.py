"""xo-csi-migrator: build settings, configure logging, run what ``build_migrator`` wires until SIGTERM. Nothing
else."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from contextlib import AsyncExitStack
from typing import Any

from pydantic import ValidationError

from services.migrator.app import build_migrator
from services.migrator.settings import MigratorSettings
from shared.config import LogSettings, RabbitSettings, RedisSettings, XoSettings
from shared.errors import DomainError
from shared.logging import configure_logging, get_logger

log = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xo-csi-migrator",
        description="Disk migration worker (RabbitMQ consumer). Flags override MIGRATOR_* envs; AMQP_URL (one URL, "
                    "or a cluster's nodes comma-separated), REDIS_URL (or REDIS_SENTINELS + REDIS_SENTINEL_MASTER) "
                    "and XOA_* configure access.")
    p.add_argument("--concurrency", type=int, help="copies at once (default 1)")
    p.add_argument("--prepare-ahead", type=int, help="jobs taken and prepared beyond --concurrency while every copy "
                   "slot is busy (claimed, locked, read, marked), so the next copy starts the moment one ends "
                   "(default 1; 0 = off)")
    p.add_argument("--per-sr-limit", type=int, help="most migrations at once whose source or target is a given SR, "
                   "across all replicas (default 0 = no limit)")
    p.add_argument("--amqp-url", help="AMQP_URL: one URL, or the nodes of a cluster as comma-separated URLs")
    p.add_argument("--redis-url", help="REDIS_URL (unused when REDIS_SENTINELS is set)")
    p.add_argument("--redis-key-prefix", help="prefix of Redis keys (default xocsi:)")
    p.add_argument("--xoa-url", help="XOA_URL")
    p.add_argument("--xoa-insecure", action="store_true", default=None, help="skip TLS verification (testing)")
    p.add_argument("--grace", type=float, help="seconds in-flight migrations may finish after SIGTERM before "
                   "they are handed back to the queue")
    p.add_argument("--health-port", type=int, help="serve /livez and /readyz on this port (default 0 = off)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default 0 = off)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


# The flags that override a MigratorSettings field when given: flag (argparse dest) -> field.
_FLAG_SETTINGS = {"concurrency": "concurrency", "prepare_ahead": "prepare_ahead", "per_sr_limit": "per_sr_limit",
                  "grace": "grace_s",
                  "health_port": "health_port", "metrics_port": "metrics_port"}


def load_settings(args: argparse.Namespace) -> tuple[MigratorSettings, RabbitSettings, RedisSettings, XoSettings,
                                                      LogSettings]:
    migrator: dict[str, Any] = {setting: getattr(args, flag) for flag, setting in _FLAG_SETTINGS.items()
                                if getattr(args, flag) is not None}
    rabbit = RabbitSettings(**({"amqp_url": args.amqp_url} if args.amqp_url else {}))
    redis_args: dict[str, Any] = {"redis_url": args.redis_url} if args.redis_url else {}
    if args.redis_key_prefix:
        redis_args["key_prefix"] = args.redis_key_prefix
    xo: dict[str, Any] = {"url": args.xoa_url} if args.xoa_url else {}
    if args.xoa_insecure:
        xo["insecure"] = True
    logs = LogSettings(**({"level": args.log_level} if args.log_level else {}))
    return MigratorSettings(**migrator), rabbit, RedisSettings(**redis_args), XoSettings(**xo), logs


async def run(settings: MigratorSettings, rabbit: RabbitSettings, redis_settings: RedisSettings,
              xo_settings: XoSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        migrator = await build_migrator(stack, settings, rabbit=rabbit, redis=redis_settings, xo=xo_settings)
        await migrator.start()
        await stop.wait()
        await migrator.stop(settings.grace_s)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings, rabbit, redis_settings, xo_settings, log_settings = load_settings(args)
        xo_settings.require_credentials()
    except (ValidationError, ValueError) as exc:
        print(f"xo-csi-migrator: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(log_settings.level, json=log_settings.json_output, service="migrator")
    try:
        asyncio.run(run(settings, rabbit, redis_settings, xo_settings))
    except DomainError as exc:
        log.error("migrator_failed", error=exc.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
