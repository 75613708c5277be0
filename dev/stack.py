"""The whole stack as separate processes, as in production: the XO simulator (real data mode when root),
a controller frontend, a node frontend per node VM and, with migrators, RabbitMQ + Redis and N migrators.

Used by the demo, the e2e tests and the soak. Everything started here is stopped on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from pydantic import SecretStr

from dev.brokers import LocalRabbit, LocalRedis, pick_free_port
from dev.process import ServiceProcess, service_process
from shared.config import XoSettings
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.xo.client import XoClient

URL_RE = re.compile(r"xo-sim listening on (ws://\S+)")
SIM_TOKEN = "sim-token"


@dataclass(frozen=True)
class StackOptions:
    """What to run. ``amqp_url`` (one URL or a cluster's, comma-separated) with ``redis_url`` or
    ``redis_sentinels`` reuse existing brokers; else, with migrators, local ones start."""

    topology: str = "two-hosts"
    real_data: bool = True
    migrators: int = 0
    amqp_url: str | None = None
    redis_url: str | None = None
    redis_sentinels: str | None = None  # REDIS_SENTINELS (host:port,...): Redis through Sentinel, not redis_url
    redis_sentinel_master: str = "xocsi"
    redis_prefix: str = "xocsi:"
    management: bool = False
    host_topology: bool = False
    sim_args: tuple[str, ...] = ()
    controller_args: tuple[str, ...] = ()
    migrator_args: tuple[str, ...] = ()
    node_args: tuple[str, ...] = ()
    metrics: bool = False  # serve /metrics from the controller and every migrator on free ports
    nodes: bool = True  # a node plugin per node VM (the benchmarks need only the controller)
    all_in_one: str | None = None  # this VM's node plugin runs inside the controller (--mode all), as csi-sanity wants
    log_level: str = "info"


@dataclass
class Stack:
    """Handles on the running stack."""

    options: StackOptions
    work: Path
    xo_url: str
    xo: XoClient
    vm_ids: dict[str, str]  # VM name -> VM UUID
    device_root: Path
    controller_socket: Path
    node_sockets: dict[str, Path]  # VM name -> socket
    amqp_url: str | None = None
    redis_url: str | None = None
    management_url: str | None = None
    rabbit: LocalRabbit | None = None
    redis: LocalRedis | None = None
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # service name -> /metrics port
    exits: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, socket: Path) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"unix://{socket}")
        self._channels.append(channel)
        return channel

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel(self.controller_socket))

    def node(self, vm_name: str) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel(self.node_sockets[vm_name]))

    @property
    def nodes(self) -> dict[str, csi_pb2_grpc.NodeStub]:
        return {name: self.node(name) for name in self.node_sockets}

    @property
    def log_dir(self) -> Path:
        return self.work / "logs"

    def service_env(self) -> dict[str, str]:
        env = {"XOA_URL": self.xo_url, "XOA_TOKEN": SIM_TOKEN, "LOG_LEVEL": self.options.log_level,
               "REDIS_KEY_PREFIX": self.options.redis_prefix}
        if self.amqp_url and self.options.redis_sentinels:
            env |= {"AMQP_URL": self.amqp_url, "REDIS_SENTINELS": self.options.redis_sentinels,
                    "REDIS_SENTINEL_MASTER": self.options.redis_sentinel_master}
        elif self.amqp_url and self.redis_url:
            env |= {"AMQP_URL": self.amqp_url, "REDIS_URL": self.redis_url}
        return env

    def _metrics_args(self, name: str) -> list[str]:
        if not self.options.metrics:
            return []
        port = self.metrics_ports.setdefault(name, pick_free_port(frozenset(self.metrics_ports.values())))
        return ["--metrics-port", str(port)]

    async def start_controller(self, name: str = "controller", socket: Path | None = None) -> ServiceProcess:
        """The controller frontend; with ``options.all_in_one`` a frontend in mode all, also that VM's node plugin.
        Another ``name`` and ``socket`` start one more replica (a leader handover: two act at once)."""
        mode = ["--mode", "controller"]
        if self.options.all_in_one is not None and name == "controller":
            mode = ["--mode", "all", *self._node_args(self.options.all_in_one)]
        args = [*mode, *(["--host-topology"] if self.options.host_topology else []),
                *self._metrics_args(name), *self.options.controller_args]
        proc = await self._frontend(name, socket or self.controller_socket, *args)
        self.processes[name] = proc
        return proc

    async def start_migrator(self, name: str) -> ServiceProcess:
        argv = [sys.executable, "-m", "services.migrator", *self._metrics_args(name), *self.options.migrator_args]
        proc = await self.exits.enter_async_context(service_process(
            argv, log_dir=self.log_dir, env=self.service_env(), ready_line_regex="consumer_started", name=name,
            timeout_s=60))
        self.processes[name] = proc
        return proc

    async def crash_and_restart(self, name: str) -> ServiceProcess:
        """kill -9 the service ``name`` (controller, node-<vm>, migrator-<n>) and start it again."""
        await self.processes[name].kill()
        if name == "controller":
            return await self.start_controller()
        if name.startswith("migrator"):
            return await self.start_migrator(name)
        vm_name = name.removeprefix("node-")
        return await self._start_node(vm_name)

    async def _frontend(self, name: str, socket: Path, *args: str) -> ServiceProcess:
        argv = [sys.executable, "-m", "services.csi_frontend", "--endpoint", f"unix://{socket}", *args]
        channel = self.channel(socket)
        return await self.exits.enter_async_context(service_process(
            argv, log_dir=self.log_dir, env=self.service_env(), ready=lambda: _answers(channel), name=name,
            timeout_s=60))

    async def start_nodes(self) -> None:
        for vm_name in sorted(self.vm_ids):
            await self._start_node(vm_name)

    def _node_args(self, vm_name: str) -> list[str]:
        vm_id = self.vm_ids[vm_name]
        # no Kubernetes API here: the simulator stands in for XO, and the node plugin asks it (--node-metadata xo)
        return ["--node-id", vm_id, "--node-metadata", "xo", "--device-dir", str(self.device_root / vm_id),
                *self.options.node_args]

    async def _start_node(self, vm_name: str) -> ServiceProcess:
        args = ["--mode", "node", *self._node_args(vm_name)]
        if self.options.host_topology:
            args.append("--host-topology")
        proc = await self._frontend(f"node-{vm_name}", self.node_sockets[vm_name], *args)
        self.processes[f"node-{vm_name}"] = proc
        return proc

    async def sr_id(self, name: str) -> str:
        return next(sr.id for sr in await self.xo.find_srs() if sr.name_label == name)

    async def node_for_disk(self, disk_name: str, *, same_host: bool = True) -> str:
        """A node VM name on the host of the disk's (local) SR, or on another host."""
        vdi = (await self.xo.find_vdis(name_label=disk_name))[0]
        sr = await self.xo.get_sr(vdi.sr_id)
        assert sr is not None
        for name, vm_id in sorted(self.vm_ids.items()):
            vm = await self.xo.get_vm(vm_id)
            if vm is not None and (vm.container == sr.container) == same_host:
                return name
        raise LookupError(f"no node {'on' if same_host else 'off'} the host of {disk_name}")

    @property
    def admin_url(self) -> str:
        """The simulator's admin API (``/_sim/...``)."""
        return admin_url(self.xo_url)

    async def close_channels(self) -> None:
        channels, self._channels = self._channels, []
        await asyncio.gather(*(channel.close() for channel in channels))

    async def close(self) -> None:
        await self.close_channels()
        await self.exits.aclose()


def admin_url(xo_url: str) -> str:
    """``ws://host:port/api/`` -> ``http://host:port``, where the simulator serves its admin API."""
    return xo_url.replace("ws://", "http://").removesuffix("/api/")


def sim_client(xo_url: str) -> XoClient:
    """An XO client signed in to the simulator with its token (no I/O until the first call)."""
    return XoClient.from_settings(XoSettings(url=xo_url, token=SecretStr(SIM_TOKEN)))


@contextlib.asynccontextmanager
async def simulator_process(log_dir: Path, *args: str) -> AsyncIterator[tuple[ServiceProcess, str]]:
    """``xo-sim`` on a free 127.0.0.1 port as a separate process (``args`` added to its command line); yields
    it and its ws:// URL once it listens, and stops it on exit."""
    argv = [sys.executable, "-m", "services.xo_simulator", "--listen", "127.0.0.1:0", *args]
    async with service_process(argv, log_dir=log_dir, ready_line_regex=URL_RE.pattern, name="xo-sim",
                               timeout_s=30) as sim:
        match = URL_RE.search(sim.log_text())
        assert match is not None, sim.log_tail()
        yield sim, match.group(1)


async def socket_answers(socket: Path) -> bool:
    """True once a CSI plugin answers GetPluginInfo on the unix socket (a readiness check)."""
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        return await _answers(channel)


async def _answers(channel: grpc.aio.Channel) -> bool:
    try:
        await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return True


@contextlib.asynccontextmanager
async def running_stack(work: Path, options: StackOptions = StackOptions()) -> AsyncIterator[Stack]:
    """Start everything ``options`` asks for under ``work`` (logs in ``work/logs``) and stop it on exit."""
    exits = contextlib.AsyncExitStack()
    async with exits:
        rabbit, redis = await _brokers(exits, options)
        amqp_url = options.amqp_url or (rabbit.endpoint.amqp_url if rabbit else None)
        redis_url = options.redis_url or (redis.endpoint.url if redis else None)
        management_url = rabbit.endpoint.management_url if rabbit else None
        device_root = work / "devices"
        sim_args = ["--topology", options.topology, "--admin", *options.sim_args]
        if options.real_data and os.geteuid() == 0:
            sim_args += ["--backing-dir", str(work / "backing"), "--device-root", str(device_root)]
        sim, xo_url = await exits.enter_async_context(simulator_process(work / "logs", *sim_args))
        xo = sim_client(xo_url)
        exits.push_async_callback(xo.close)
        vms = {vm["name_label"]: vm["id"] for vm in await xo.get_objects({"type": "VM"})}
        stack = Stack(options, work, xo_url, xo, vms, device_root, work / "controller.sock",
                      {name: work / f"{name}.sock" for name in vms}, amqp_url, redis_url, management_url,
                      rabbit, redis, processes={"xo-sim": sim}, exits=exits)
        exits.push_async_callback(stack.close_channels)
        await stack.start_controller()
        if options.nodes and options.all_in_one is None:
            await stack.start_nodes()
        for n in range(options.migrators):
            await stack.start_migrator(f"migrator-{n + 1}")
        yield stack


async def _brokers(exits: contextlib.AsyncExitStack, options: StackOptions
                   ) -> tuple[LocalRabbit | None, LocalRedis | None]:
    given = options.amqp_url and (options.redis_url or options.redis_sentinels)
    if given or (options.migrators == 0 and not options.management):
        return None, None
    rabbit, redis = LocalRabbit(), LocalRedis()
    exits.callback(rabbit.stop)
    exits.callback(redis.stop, crash=True)
    starting = asyncio.gather(asyncio.to_thread(rabbit.start), asyncio.to_thread(redis.start))
    try:
        await asyncio.shield(starting)
    except asyncio.CancelledError:
        # A thread cannot be cancelled: let the starts finish, or the stops above would race them and a broker
        # that finished starting afterwards would outlive us (a SIGTERM during `make demo`'s start-up).
        await asyncio.wait({starting})
        if not starting.cancelled():
            starting.exception()  # retrieved: what propagates is the cancellation
        raise
    return rabbit, redis
