"""xo-csi-frontend: build settings, configure logging, wire the CSI services, serve. Nothing else."""

from __future__ import annotations

import argparse
import asyncio
import sys
from contextlib import AsyncExitStack
from typing import Any

from pydantic import ValidationError

from services.csi_frontend.attach import Attacher
from services.csi_frontend.controller import ControllerServicer
from services.csi_frontend.disks import DiskLocator
from services.csi_frontend.identity import IdentityServicer
from services.csi_frontend.migration_gate import QueueMigrationGate
from services.csi_frontend.node import NodeConfig, NodeServicer
from services.csi_frontend.node_identity import resolve_node, topology
from services.csi_frontend.provisioning import Provisioner
from services.csi_frontend.server import serve
from services.csi_frontend.settings import FrontendSettings, parse_duration_s
from services.csi_frontend.temp_cleanup import run_forever as temp_cleanup_forever
from shared import metrics
from shared.backends import open_messaging
from shared.config import LogSettings, RabbitSettings, RedisSettings, XoSettings
from shared.csi import csi_pb2_grpc
from shared.errors import DomainError
from shared.jobs import JobStore
from shared.logging import configure_logging, get_logger
from shared.xo.client import XoClient
from shared.xo.inventory import Inventory

log = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xo-csi-frontend",
        description="CSI Identity/Controller/Node services for XCP-ng pools managed by Xen Orchestra. "
        "Every flag can also be set by its environment variable (CSI_<NAME>); XO access comes from "
        "XOA_URL and XOA_TOKEN, or XOA_USERNAME and XOA_PASSWORD.",
    )
    p.add_argument("--endpoint", help="CSI endpoint, unix:///csi/csi.sock (default) or tcp://host:port")
    p.add_argument("--mode", choices=["controller", "node", "all"], help="services to serve (default all)")
    p.add_argument("--driver-name", help="CSI driver name (default csi.xen-orchestra.marcsi.ch)")
    p.add_argument("--node-id", help="VM UUID of this node (default: /sys/class/dmi/id/product_uuid)")
    p.add_argument("--disk-name-prefix", help="prefix of VDI names (default csi-)")
    p.add_argument("--host-topology", action="store_true", default=None, help="add the host topology segment")
    p.add_argument("--temp-cleanup", action="store_true", default=None,
                   help="periodically delete leaked csi-temp-* disks (controller)")
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
    frontend = _given(args, "endpoint", "mode", "driver_name", "node_id", "disk_name_prefix", "host_topology",
                      "temp_cleanup", "device_dir", "max_volumes_per_node", "metrics_port")
    if args.device_wait:
        frontend["device_wait_s"] = parse_duration_s(args.device_wait)
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


async def _migration_gate(
    stack: AsyncExitStack, xo: XoClient, disks: DiskLocator, settings: FrontendSettings
) -> QueueMigrationGate | None:
    """The queue-backed MigrationGate when both AMQP_URL and REDIS_URL are set, else None (no migrations)."""
    rabbit, redis_settings = RabbitSettings(), RedisSettings()
    if "amqp_url" not in rabbit.model_fields_set or "redis_url" not in redis_settings.model_fields_set:
        return None
    redis, connection, publisher = await open_messaging(stack, rabbit, redis_settings,
                                                        name=f"csi-frontend:{settings.node_id}")
    jobs = JobStore(redis, redis_settings.key_prefix, active_ttl_s=settings.job_active_ttl_s,
                    result_ttl_s=settings.job_result_ttl_s)
    gate = QueueMigrationGate(connection, publisher, jobs, disks, xo, margin_s=settings.publish_margin_s)
    stack.push_async_callback(gate.close)
    log.info("migrations_enabled")
    return gate


async def run(settings: FrontendSettings, xo_settings: XoSettings) -> None:
    xo = XoClient.from_settings(xo_settings)
    inventory = Inventory(xo)
    disks = DiskLocator(xo, settings.disk_name_prefix)
    stack = AsyncExitStack()
    try:
        if settings.serves_controller:
            await xo.require_admin("controller")  # XoAuthError ends the process with the reason
        servicers: list[tuple[object, object]] = [(
            IdentityServicer(settings.driver_name, controller=settings.serves_controller,
                             probe=xo.ping if settings.serves_controller else None),
            csi_pb2_grpc.add_IdentityServicer_to_server,
        )]
        if settings.serves_controller:
            gate = await _migration_gate(stack, xo, disks, settings)
            attacher = Attacher(xo, inventory, disks, device_wait_s=settings.device_wait_s, migrations=gate)
            provisioner = Provisioner(xo, inventory, disks, host_topology=settings.host_topology)
            servicers.append((ControllerServicer(provisioner, attacher, disks, inventory),
                              csi_pb2_grpc.add_ControllerServicer_to_server))
        if settings.serves_node:
            servicers.append((await _node_servicer(settings, inventory, xo), csi_pb2_grpc.add_NodeServicer_to_server))
        async with asyncio.TaskGroup() as tasks:
            cleanup = None
            if settings.serves_controller and settings.temp_cleanup:
                cleanup = tasks.create_task(temp_cleanup_forever(
                    xo, settings.disk_name_prefix, interval_s=settings.temp_cleanup_interval_s,
                    delete_after_s=settings.temp_cleanup_delete_after_s))
            async with metrics.serving(settings.metrics_port):
                await serve(servicers, settings.endpoint, grace_s=settings.grace_s, observe=_observe_rpc)
            if cleanup is not None:
                cleanup.cancel()
    finally:
        await stack.aclose()
        await xo.close()


async def _node_servicer(settings: FrontendSettings, inventory: Inventory, xo: XoClient) -> NodeServicer:
    node_id = await resolve_node(inventory, settings.node_id, settings.dmi_uuid_path)
    place = await Attacher(xo, inventory, DiskLocator(xo, settings.disk_name_prefix),
                           device_wait_s=settings.device_wait_s).place_of(node_id)
    config = NodeConfig(
        node_id=node_id,
        topology=topology(place, settings.host_topology),
        device_dir=settings.device_dir,
        max_volumes_per_node=settings.max_volumes_per_node,
        device_wait_s=settings.device_wait_s,
    )
    log.info("node_identified", node_id=node_id, topology=dict(config.topology))
    return NodeServicer(config)


def _observe_rpc(method: str, code: str, seconds: float) -> None:
    metrics.CSI_REQUESTS.labels(method, code).inc()
    metrics.CSI_DURATION.labels(method).observe(seconds)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings, xo_settings, log_settings = load_settings(args)
        xo_settings.require_credentials()
    except (ValidationError, ValueError) as exc:
        print(f"xo-csi-frontend: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(log_settings.level, json=log_settings.json_output, service="csi-frontend")
    try:
        asyncio.run(run(settings, xo_settings))
    except DomainError as exc:
        log.error("frontend_failed", error=exc.message)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
