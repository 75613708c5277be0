"""build_frontend(...): the one place the CSI frontend is wired (XO client, inventory, provisioner, attacher, the
queue-backed migration gate when RabbitMQ and Redis are given, the servicers of its mode). __main__, the tests,
the demo and the benchmarks all run what it builds; settings come in built, nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection

from services.csi_frontend.attach import Attacher
from services.csi_frontend.cloning import Cloner
from services.csi_frontend.controller import ControllerServicer
from services.csi_frontend.disks import DiskLocator
from services.csi_frontend.events import MigrationEvents
from services.csi_frontend.identity import IdentityServicer
from services.csi_frontend.migration_gate import QueueMigrationGate
from services.csi_frontend.node import NodeConfig, NodeServicer
from services.csi_frontend.node_identity import NodeMetadata, from_kubernetes, resolve_node
from services.csi_frontend.provisioning import Provisioner
from services.csi_frontend.selected_node import SelectedNode
from services.csi_frontend.server import serve
from services.csi_frontend.settings import FrontendSettings
from services.csi_frontend.sightings import VdiSightings
from services.csi_frontend.stale_marks import STALE_MARK_LOCK_TTL_S, STALE_MARK_LOCK_WAIT_S, MarkPolicy
from services.csi_frontend.temp_cleanup import TempCleanup
from services.csi_frontend.temp_cleanup import run_forever as temp_cleanup_forever
from services.csi_frontend.volume_locks import VolumeLocks
from shared import broker, health, metrics, placement
from shared.backends import open_messaging, redis_client
from shared.config import RabbitSettings, RedisSettings, XoSettings
from shared.csi import csi_pb2_grpc
from shared.errors import InvalidRequest
from shared.jobs import JobStore
from shared.kube import KubeReader, in_cluster
from shared.locks import DiskLock, Lease
from shared.logging import get_logger
from shared.xo.client import XoClient
from shared.xo.inventory import Inventory

log = get_logger(__name__)

Servicers = list[tuple[object, object]]  # (servicer, add_XServicer_to_server)


@dataclass
class Frontend:
    """A wired frontend: its parts (for tests and tools) and ``serve()``. A node plugin has no XO client,
    inventory, disk locator or attacher: it reads its metadata from Kubernetes (the default), or from XO once at
    start (--node-metadata=xo), then signs out."""

    settings: FrontendSettings
    servicers: Servicers
    xo: XoClient | None = None
    inventory: Inventory | None = None
    disks: DiskLocator | None = None
    attacher: Attacher | None = None
    provisioner: Provisioner | None = None
    gate: QueueMigrationGate | None = None
    jobs: JobStore | None = None
    connection: AbstractRobustConnection | None = None
    publisher: broker.Publisher | None = None
    node: NodeServicer | None = field(default=None)
    locks: VolumeLocks = field(default_factory=VolumeLocks)
    marks: MarkPolicy | None = None
    redis: aioredis.Redis | None = None
    redis_prefix: str = ""
    cloner: Cloner | None = None  # CreateVolume from a volume (with the migration queue only)

    async def readiness(self) -> health.Report:
        """/readyz on the metrics port: XO answers (controller), and with migrations on,
        RabbitMQ is connected and Redis answers PING. CSI Probe (the liveness probe) never asks these."""
        checks: dict[str, health.Check] = {}
        if self.xo is not None:
            checks["xo"] = self.xo.ping
        if self.publisher is not None:
            publisher = self.publisher
            checks["rabbitmq"] = lambda: health.connected(publisher)
        if self.redis is not None:
            checks["redis"] = self.redis.ping
        return await health.run_checks(checks, self.settings.probe_timeout_s)

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Serve the CSI services on ``settings.endpoint`` (with /metrics, /readyz, /livez and, when asked, the
        temp-disk cleanup) until SIGTERM/SIGINT or ``stop``; then stop gracefully within ``settings.grace_s``.
        XO's SRs and VMs are loaded meanwhile, and the migration events subscribed, so that no request waits for
        them."""
        settings = self.settings
        async with asyncio.TaskGroup() as tasks:
            warm = tasks.create_task(self.inventory.warm()) if self.inventory is not None else None
            subscribe = tasks.create_task(self.gate.prepare()) if self.gate is not None else None
            cleanup = None
            if settings.serves_controller and settings.temp_cleanup:
                cleanup = tasks.create_task(self._temp_cleanup())
            async with metrics.serving(settings.metrics_port, readiness=self.readiness):
                await serve(self.servicers, settings.endpoint, grace_s=settings.grace_s, observe=_observe_rpc,
                            stop=stop)
            for task in (warm, subscribe, cleanup):
                if task is not None:
                    task.cancel()

    async def _temp_cleanup(self) -> None:
        settings = self.settings
        assert self.xo is not None, "the controller always has XO"
        cleanup = TempCleanup(self.xo, settings.disk_name_prefix, self.locks, min_age_s=settings.temp_cleanup_min_age_s,
                              delete_after_s=settings.temp_cleanup_delete_after_s)
        lease = None
        if self.redis is not None:
            lease = Lease(self.redis, self.redis_prefix, "temp-cleanup", ttl_s=3 * settings.temp_cleanup_interval_s,
                          holder=settings.node_id or "controller")
        else:
            log.warning("temp_cleanup_without_lease", note="no REDIS_URL: this replica assumes it is the only one")
        await temp_cleanup_forever(cleanup, interval_s=settings.temp_cleanup_interval_s, lease=lease)


async def build_frontend(stack: AsyncExitStack, settings: FrontendSettings, xo_settings: XoSettings, *,
                         rabbit: RabbitSettings | None = None, redis: RedisSettings | None = None) -> Frontend:
    """Wire the frontend for ``settings.mode``; every client it opens is closed when ``stack`` closes.

    Migrations are enabled (controller mode) when both ``rabbit`` and ``redis`` are given: it connects to both
    now (BackendUnavailable when it cannot). Redis also holds the temporary-disk cleanup's lease (one replica).
    Controller mode refuses a non-admin XO account (XoAuthError).
    Node mode learns its VM and topology now (node_identity.py): from its Node object by default, with no XO
    client at all; from XO with --node-metadata=xo (any signed-in account), whose session closes once it knows.
    """
    frontend = Frontend(settings, [])
    if settings.needs_xo:
        xo = XoClient.from_settings(xo_settings)
        stack.push_async_callback(xo.close)
        if settings.serves_controller:
            await xo.require_admin("controller")  # XoAuthError: a non-admin account is refused, with the reason
        frontend.xo, frontend.inventory = xo, Inventory(xo)
        stack.push_async_callback(frontend.inventory.close)
        frontend.disks = DiskLocator(xo, settings.disk_name_prefix)
        frontend.locks = VolumeLocks(margin_s=settings.publish_margin_s)  # the one per-volume lock of this controller
        if settings.serves_controller and rabbit is not None and redis is not None:
            await _enable_migrations(stack, frontend, frontend.disks, rabbit, redis)
        # Built once: with the job store and the migration gate when migrations are on, else without.
        frontend.marks = MarkPolicy(xo, frontend.jobs, clear_after_s=settings.stale_mark_after_s,
                                    disk_lock=_disk_lock(frontend), inventory=frontend.inventory)
        frontend.attacher = Attacher(xo, frontend.inventory, frontend.disks, device_wait_s=settings.device_wait_s,
                                     locks=frontend.locks, migrations=frontend.gate, marks=frontend.marks)
    frontend.servicers.append((IdentityServicer(settings.driver_name), csi_pb2_grpc.add_IdentityServicer_to_server))
    if settings.serves_controller:
        await _controller(stack, frontend, rabbit, redis)
    if settings.serves_node:
        frontend.node = NodeServicer(await _node_config(frontend))
        frontend.servicers.append((frontend.node, csi_pb2_grpc.add_NodeServicer_to_server))
        if not settings.serves_controller:
            await _sign_out(frontend)
    return frontend


def _disk_lock(frontend: Frontend) -> Callable[[str], AbstractAsyncContextManager[object]] | None:
    """The migrators' per-disk lock, for the stale-mark clearing (stale_marks.py); None without migrations."""
    redis = frontend.redis
    if frontend.jobs is None or redis is None:
        return None
    return lambda disk_name: DiskLock(redis, frontend.redis_prefix, disk_name, ttl_s=STALE_MARK_LOCK_TTL_S,
                                      wait_s=STALE_MARK_LOCK_WAIT_S)


async def _sign_out(frontend: Frontend) -> None:
    """A node plugin that asked XO who it is (--node-metadata=xo) needs nothing more from it: its session closes,
    as XO sends every signed-in connection every change of every pool (a storm per node, for nothing)."""
    if frontend.xo is None:
        return
    assert frontend.inventory is not None
    await frontend.inventory.close()
    await frontend.xo.close()
    frontend.xo = frontend.inventory = frontend.disks = frontend.attacher = frontend.marks = None
    log.info("xo_session_closed", reason="node identified: a node plugin reads XO only at start")


async def _controller(stack: AsyncExitStack, frontend: Frontend, rabbit: RabbitSettings | None,
                      redis: RedisSettings | None) -> None:
    settings, xo, inventory, disks = frontend.settings, frontend.xo, frontend.inventory, frontend.disks
    assert xo is not None and inventory is not None and disks is not None, "the controller always has XO"
    if rabbit is None and redis is not None:  # Redis alone: the temporary-disk cleanup's lease (else: migrations)
        frontend.redis, frontend.redis_prefix = redis_client(stack, redis), redis.key_prefix
    assert frontend.attacher is not None
    frontend.provisioner = Provisioner(xo, inventory, disks, host_topology=settings.host_topology,
                                       locks=frontend.locks, marks=frontend.marks)
    if frontend.gate is not None:
        frontend.cloner = Cloner(xo, disks, frontend.provisioner, frontend.gate)
    selected = _selected_node(stack, settings, inventory)
    frontend.servicers.append((ControllerServicer(frontend.provisioner, frontend.attacher, disks, inventory, selected,
                                                  frontend.cloner), csi_pb2_grpc.add_ControllerServicer_to_server))


def _selected_node(stack: AsyncExitStack, settings: FrontendSettings, inventory: Inventory) -> SelectedNode | None:
    """In a pod (or with --kubeconfig) the controller reads the claim's selected node for WaitForFirstConsumer
    placement (RBAC: get persistentvolumeclaims, csinodes); elsewhere (tests, xocsi) CreateVolume places as before."""
    if settings.kubeconfig is None and not in_cluster():
        log.info("selected_node_placement_off", reason="not in a pod and no --kubeconfig")
        return None
    kube = KubeReader.from_config(settings.kubeconfig)
    stack.push_async_callback(kube.close)
    return SelectedNode(kube, inventory, settings.driver_name)


async def _enable_migrations(stack: AsyncExitStack, frontend: Frontend, disks: DiskLocator, rabbit: RabbitSettings,
                             redis_settings: RedisSettings) -> None:
    settings = frontend.settings
    assert frontend.xo is not None and frontend.inventory is not None
    redis, connection, publisher = await open_messaging(stack, rabbit, redis_settings,
                                                        name=f"csi-frontend:{settings.node_id}")
    jobs = JobStore(redis, redis_settings.key_prefix, active_ttl_s=settings.job_active_ttl_s,
                    result_ttl_s=settings.job_result_ttl_s)
    events = MigrationEvents(connection, setup_timeout_s=rabbit.connect_timeout_s)
    stack.push_async_callback(events.close)
    gate = QueueMigrationGate(events, publisher, jobs, disks, frontend.inventory,
                              sightings=VdiSightings(frontend.xo), margin_s=settings.publish_margin_s)
    frontend.gate, frontend.jobs, frontend.connection, frontend.publisher = gate, jobs, connection, publisher
    frontend.redis, frontend.redis_prefix = redis, redis_settings.key_prefix
    log.info("migrations_enabled")


async def _node_config(frontend: Frontend) -> NodeConfig:
    settings = frontend.settings
    metadata = await _node_metadata(frontend)
    config = NodeConfig(
        node_id=metadata.node_id,
        topology=metadata.topology,
        device_dir=settings.device_dir,
        max_volumes_per_node=settings.max_volumes_per_node,
        device_wait_s=settings.device_wait_s,
        margin_s=settings.publish_margin_s,
    )
    log.info("node_identified", node_id=config.node_id, topology=dict(config.topology), source=settings.node_metadata)
    return config


async def _node_metadata(frontend: Frontend) -> NodeMetadata:
    settings = frontend.settings
    if settings.node_metadata == "xo":
        assert frontend.inventory is not None and frontend.attacher is not None
        node_id = await resolve_node(frontend.inventory, settings.node_id, settings.dmi_uuid_path)
        place = await frontend.attacher.place_of(node_id)
        return NodeMetadata(node_id, placement.node_segments(place.pool_id, place.host_id, settings.host_topology))
    if not settings.node_name:
        raise InvalidRequest("a node plugin needs --node-name (CSI_NODE_NAME; the DaemonSet sets it from the downward "
                             "API spec.nodeName) to read its Node's labels, or --node-metadata=xo with an XO account")
    kube = KubeReader.from_config(settings.kubeconfig)
    try:  # read once at start-up: no connection is kept
        return await from_kubernetes(kube, settings.node_name, node_id=settings.node_id,
                                     dmi_path=settings.dmi_uuid_path, host_topology=settings.host_topology,
                                     wait_s=settings.node_labels_wait_s)
    finally:
        await kube.close()


def _observe_rpc(method: str, code: str, seconds: float) -> None:
    metrics.CSI_REQUESTS.labels(method, code).inc()
    metrics.CSI_DURATION.labels(method).observe(seconds)
