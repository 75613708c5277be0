"""xo-csi-frontend: build settings, configure logging, then serve what ``build_frontend`` wires. Nothing else."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from contextlib import AsyncExitStack
from typing import Any

from pydantic import ValidationError

from services.csi_frontend.app import build_frontend
from services.csi_frontend.settings import FrontendSettings
from shared.config import LogSettings, RabbitSettings, RedisSettings, XoSettings
from shared.errors import DomainError
from shared.logging import configure_logging, get_logger
from shared.units import parse_duration_s

log = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xo-csi-frontend",
        description="CSI Identity/Controller/Node services for XCP-ng pools managed by Xen Orchestra. "
        "Every flag can also be set by its environment variable (CSI_<NAME>); XO access comes from "
        "XOA_URL and XOA_TOKEN, or XOA_USERNAME and XOA_PASSWORD (the controller's account must be an XO admin; "
        "node plugins need no XO account unless --node-metadata=xo).",
    )
    p.add_argument("--endpoint", help="CSI endpoint, unix:///csi/csi.sock (default) or tcp://host:port")
    p.add_argument("--mode", choices=["controller", "node", "all"], help="services to serve (default all)")
    p.add_argument("--driver-name", help="CSI driver name (default csi.xen-orchestra.marcsi.ch)")
    p.add_argument("--node-id", help="VM UUID of this node (default: /sys/class/dmi/id/product_uuid)")
    p.add_argument("--node-metadata", choices=["kubernetes", "xo"],
                   help="node plugin: read pool/host from this Node's labels set by the XO cloud controller manager "
                   "(default kubernetes: no XO credentials needed) or from XO once at start (any signed-in XO account; "
                   "the session closes once it knows)")
    p.add_argument("--node-name", help="this node's Kubernetes name (CSI_NODE_NAME; downward API spec.nodeName)")
    p.add_argument("--kubeconfig", help="Kubernetes API access outside a pod (default: in-cluster, else $KUBECONFIG)")
    p.add_argument("--disk-name-prefix", help="prefix of VDI names (default csi-)")
    p.add_argument("--host-topology", action="store_true", default=None, help="add the host topology segment")
    p.add_argument("--temp-cleanup", action="store_true", default=None,
                   help="periodically delete leaked csi-temp-* disks (controller)")
    p.add_argument("--temp-cleanup-min-age", help="how long a csi-temp-* disk must be seen before it is marked "
                   "for deletion, e.g. 10m (default 10m; deleted 30m after the mark)")
    p.add_argument("--stale-mark-after", help="clear a disk's migration mark after this long without a live "
                   "migration job, e.g. 70s (default 70s = 2 x the migrators' default stale-after)")
    p.add_argument("--device-dir", help="where the node finds attached disks (default /dev)")
    p.add_argument("--device-wait", help="how long to wait for an attached device, e.g. 10s")
    p.add_argument("--max-volumes-per-node", type=int, help="NodeGetInfo max_volumes_per_node (default 239)")
    p.add_argument("--xoa-url", help="XO address (XOA_URL)")
    p.add_argument("--xoa-timeout", help="bound on one XO call, e.g. 60s (default 60s)")
    p.add_argument("--xoa-ca-file", help="CA bundle for XO's TLS certificate")
    p.add_argument("--xoa-insecure", action="store_true", default=None, help="skip TLS verification (testing)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default 0 = off)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def load_settings(args: argparse.Namespace) -> tuple[FrontendSettings, XoSettings, LogSettings]:
    frontend = _given(args, "endpoint", "mode", "driver_name", "node_id", "node_metadata", "node_name", "kubeconfig",
                      "disk_name_prefix", "host_topology", "temp_cleanup", "device_dir", "max_volumes_per_node",
                      "metrics_port")
    for flag, setting in (("device_wait", "device_wait_s"), ("temp_cleanup_min_age", "temp_cleanup_min_age_s"),
                          ("stale_mark_after", "stale_mark_after_s")):
        if getattr(args, flag):
            frontend[setting] = parse_duration_s(getattr(args, flag))
    xo: dict[str, Any] = {}
    if args.xoa_url:
        xo["url"] = args.xoa_url
    if args.xoa_timeout:
        xo["timeout_s"] = parse_duration_s(args.xoa_timeout)
    if args.xoa_ca_file:
        xo["ca_file"] = args.xoa_ca_file
    if args.xoa_insecure:
        xo["insecure"] = True
    logs = {"level": args.log_level} if args.log_level else {}
    return FrontendSettings(**frontend), XoSettings(**xo), LogSettings(**logs)


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def messaging_settings() -> tuple[RabbitSettings | None, RedisSettings | None]:
    """RabbitMQ settings when AMQP_URL is set, Redis settings when REDIS_URL (or REDIS_SENTINELS) is set; migrations
    need both, the temporary-disk cleanup's lease only Redis."""
    rabbit, redis = RabbitSettings(), RedisSettings()
    return (rabbit if "amqp_url" in rabbit.model_fields_set else None, redis if redis.configured else None)


async def run(settings: FrontendSettings, xo_settings: XoSettings,
              messaging: tuple[RabbitSettings | None, RedisSettings | None]) -> None:
    rabbit, redis = messaging
    async with AsyncExitStack() as stack:
        frontend = await build_frontend(stack, settings, xo_settings, rabbit=rabbit, redis=redis)
        # What start-up made (modules, gRPC, clients) lives as long as the process: keep it out of the cyclic GC,
        # whose full passes over it otherwise stall the event loop for 40-60 ms now and then (an attach's p99).
        gc.freeze()
        await frontend.serve()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings, xo_settings, log_settings = load_settings(args)
        if settings.needs_xo:
            xo_settings.require_credentials()
        messaging = messaging_settings()
    except (ValidationError, ValueError) as exc:
        print(f"xo-csi-frontend: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(log_settings.level, json=log_settings.json_output, service="csi-frontend")
    try:
        asyncio.run(run(settings, xo_settings, messaging))
    except DomainError as exc:
        log.error("frontend_failed", error=exc.message)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
