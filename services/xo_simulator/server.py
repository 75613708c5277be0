"""Wiring: one Simulator (truth, XO's cache, XAPI layer, sessions, web app with /api/ and /_sim/), start_simulator().

start_simulator() is the programmatic entry point for tests; __main__.py is the CLI around it. Defaults
are as harsh as a real xo-server (README: "Where the simulator differs from XO"); every knob that
softens one exists for benchmarks, which must then say so.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from shared.logging import get_logger

from . import admin, rest
from .auth import Authenticator
from .cache import CacheMirror, Lag
from .faults import FaultRule, Faults, Latency
from .generated import GeneratedSpec, generate, is_generated
from .inventory import populate
from .methods import Api
from .migration import Migrator
from .model import ObjectStore
from .noise import Noise
from .outages import PoolOutages
from .realdata import RealData
from .rpc import Connection, Dispatcher, notification
from .stats import Stats
from .topology import Topology, load_topology, parse_topology
from .xapi import Xapi

log = get_logger(__name__)
DEFAULT_MIGRATION_RATE_BPS = 1024**3
DEFAULT_CACHE_LAG = "20-150"
DEFAULT_NOISE_EVENTS_PER_S = 20.0
DEFAULT_MIGRATE_RETRY_MS = 1000.0  # Xapi#moveVdi: pRetry defaults, 10 tries 1 s apart
DEFAULT_DESTROY_RETRY_MS = 5000.0  # vdiDestroyRetryWhenInUse: 10 tries 5 s apart
MAX_MESSAGE_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class SimulatorOptions:
    """Behaviour knobs; see the CLI help in __main__.py for each."""

    admin: bool = False
    migration_rate_bps: int = DEFAULT_MIGRATION_RATE_BPS
    max_storage_migrations: int = 3
    plug_delay_ms: float = 0
    latency: Latency = field(default_factory=lambda: Latency({}))
    faults: tuple[FaultRule, ...] = ()
    fault_seed: int | None = None
    backing_dir: Path | None = None
    device_root: Path | None = None
    cache_lag: Lag = field(default_factory=lambda: Lag.parse(DEFAULT_CACHE_LAG))
    noise_events_per_s: float = DEFAULT_NOISE_EVENTS_PER_S
    migrate_retry_ms: float = DEFAULT_MIGRATE_RETRY_MS
    destroy_retry_ms: float = DEFAULT_DESTROY_RETRY_MS
    stream_rate_bps: int = 0  # pace of REST exports (content streams); 0 = as fast as disk and socket go


class Simulator:
    """One simulated Xen Orchestra: truth and cache stores, XAPI layer, migrations, sessions and the web app."""

    def __init__(self, topology: Topology, options: SimulatorOptions, source: Path | None = None) -> None:
        if (options.backing_dir is None) != (options.device_root is None):
            raise ValueError("real data mode needs both backing_dir and device_root")
        self.topology = topology
        self.source = source
        self.options = options
        self.store = ObjectStore()  # the truth: what XAPI knows
        self.stats = Stats()
        rng = random.Random(options.fault_seed)
        self.faults = Faults(options.latency, options.fault_seed)
        self.mirror = CacheMirror(self.store, options.cache_lag, rng)
        self.cache = self.mirror.cache  # what XO shows: getAllObjects, notifications, id resolution
        self.outages = PoolOutages(self.mirror)
        self.noise = Noise(self.store, options.noise_events_per_s, rng)
        self.data: RealData | None = None
        if options.backing_dir is not None and options.device_root is not None:
            RealData.check_environment()
            self.data = RealData(options.backing_dir, options.device_root)
        self.xapi = Xapi(self.store, self.data, options.plug_delay_ms)
        self.migrator = Migrator(self.xapi, self.stats, rate_bps=options.migration_rate_bps,
                                 max_per_pool=options.max_storage_migrations,
                                 retry_delay_s=options.migrate_retry_ms / 1000, barrier=self.mirror.barrier)
        self.api = Api(self.xapi, self.migrator, Authenticator(topology.tokens, topology.users), self.mirror,
                       destroy_retry_delay_s=options.destroy_retry_ms / 1000)
        self.dispatcher = Dispatcher(self.api.methods(), self.faults, self.stats, self.mirror)
        self.connections: set[Connection] = set()
        self.stream_rate_bps = options.stream_rate_bps  # tests may change it while the simulator runs
        self.cache.subscribe(self._broadcast)

    # -- state ---------------------------------------------------------------------------------------
    async def load(self) -> None:
        """Build the topology's objects (and their backing files in real data mode); XO's cache starts full."""
        populate(self.xapi, self.topology)
        if self.data is not None:
            for vdi in list(self.store.of_type("VDI")):
                await self.data.create(vdi["$SR"], vdi["id"], vdi["size"])
        self.mirror.flush()

    async def start(self) -> None:
        """Load the topology, apply the start-up faults, start the background activity (notification noise)."""
        await self.load()
        await self.add_faults(self.options.faults)
        self.noise.start()

    async def reset(self, *, reload_topology: bool) -> None:
        """Zero the stats; with ``reload_topology`` also drop every object and rebuild the topology.

        Running migrations and delayed plugs are cancelled, loop devices detached, VDI files deleted, lost
        pools reconnected, and XO's cache is brought up to date at once.
        """
        self.stats.reset()
        if not reload_topology:
            return
        await self._quiesce()
        if self.data is not None:
            for vdi in list(self.store.of_type("VDI")):
                await self.data.delete(vdi["$SR"], vdi["id"])
        self.outages.reconnect_all()
        self.store.clear()
        self.noise.forget()
        self.xapi.online_resize_srs.clear()
        if self.source is not None:
            self.topology = load_topology(self.source)
            self.api.auth = Authenticator(self.topology.tokens, self.topology.users)
        await self.load()

    async def _quiesce(self) -> None:
        await self.migrator.close()
        await self.xapi.close()
        if self.data is not None:
            await self.data.close()

    # -- sessions ------------------------------------------------------------------------------------
    def _broadcast(self, entered: Mapping[str, Any], exited: Mapping[str, Any]) -> None:
        """One ``enter`` (full objects) then one ``exit`` per cache batch, to every signed-in socket, unfiltered."""
        signed_in = [conn for conn in self.connections if conn.user is not None]
        if not signed_in:
            return
        # In ``exit`` every value is 0: "we don't care about the value here" (xo-server xo.mjs).
        texts = [notification(kind, items) for kind, items in (("enter", entered), ("exit", dict.fromkeys(exited, 0)))
                 if items]
        for conn in signed_in:
            for text in texts:
                conn.notify(text)
        self.stats.notifications += len(signed_in) * len(texts)

    async def add_faults(self, rules: Iterable[FaultRule]) -> None:
        """Install fault rules and run the actions: ``expire_sessions`` closes every signed-in socket now,
        ``pool_disconnect`` makes XO lose a pool (ValueError for an unknown pool, before anything changes)."""
        rules = list(rules)
        known_pools = {pool["id"] for pool in self.store.of_type("pool")}
        for rule in rules:
            if rule.kind == "pool_disconnect" and rule.pool not in known_pools:
                raise ValueError(f"pool {rule.pool!r} is not a pool of this simulator")
        self.faults.add(rules)
        for rule in rules:
            if rule.kind == "pool_disconnect" and rule.pool is not None:
                self.outages.disconnect(rule.pool, rule.duration_s)
        if any(rule.kind == "expire_sessions" for rule in rules):
            await self.expire_sessions()

    def clear_faults(self) -> None:
        """Remove every rule and end every pool outage (latency is kept)."""
        self.faults.clear()
        self.outages.reconnect_all()

    async def expire_sessions(self) -> None:
        """Close every signed-in socket without an error, as XO does when a token expires."""
        targets = [conn for conn in self.connections if conn.user is not None]
        await asyncio.gather(*(conn.close(code=1000) for conn in targets))

    # -- web -----------------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        """The aiohttp app: ``/api/`` WebSocket, ``/api/<token>`` one-shot NDJSON, ``/rest/v0`` REST, admin routes."""
        app = web.Application()
        app.router.add_get("/api/", self._websocket)
        app.router.add_get("/api/{token}", self._one_shot)
        rest.add_routes(app, self)
        if self.options.admin:
            admin.add_routes(app, self)
        return app

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        # compress=False: xo-server (ws) does not negotiate permessage-deflate either.
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, timeout=2.0, compress=False)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="the XO API is JSON-RPC over WebSocket at /api/")
        await ws.prepare(request)
        conn = Connection(ws, request, self.dispatcher)
        self.connections.add(conn)
        self.stats.connections += 1
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
        return ws

    async def _one_shot(self, request: web.Request) -> web.StreamResponse:
        body = self.api.pop_one_shot(request.match_info["token"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(text=body, content_type="application/x-ndjson")

    async def close(self) -> None:
        """Stop the noise, pool timers and the cache, cancel migrations, delayed plugs and running calls,
        close every socket, detach every loop device."""
        await self.noise.close()
        self.outages.close()
        self.mirror.close()
        await self.migrator.close()
        await self.xapi.close()
        for conn in list(self.connections):
            conn.cancel_calls()
        await asyncio.gather(*(conn.close() for conn in list(self.connections)), return_exceptions=True)
        if self.data is not None:
            await self.data.close()


class SimulatorHandle:
    """A running simulator: ``url`` (ws://host:port/api/), ``http_url``, ``state`` (the object store)."""

    def __init__(self, simulator: Simulator, runner: web.AppRunner, host: str, port: int) -> None:
        self.simulator = simulator
        self.host = host
        self.port = port
        self.url = f"ws://{host}:{port}/api/"
        self.http_url = f"http://{host}:{port}"
        self._runner = runner
        self._stopped = False

    @property
    def state(self) -> ObjectStore:
        """The truth (what XAPI knows), for assertions (do not mutate it)."""
        return self.simulator.store

    @property
    def cache(self) -> ObjectStore:
        """XO's cache (what callers see, after the lag), for assertions (do not mutate it)."""
        return self.simulator.cache

    async def stop(self) -> None:
        """Close sockets, cancel migrations, detach loop devices, stop listening. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.simulator.close()
        finally:
            await self._runner.cleanup()
            if self.simulator.data is not None:
                await self.simulator.data.close()

    async def __aenter__(self) -> SimulatorHandle:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def resolve_topology(topology: Topology | Mapping[str, Any] | str | Path) -> tuple[Topology, Path | None]:
    """Accept a Topology, a mapping, YAML text, a file path, a bundled topology name or ``generated:...``
    (generated.py)."""
    if isinstance(topology, Topology):
        return topology, None
    if is_generated(topology):
        return generate(GeneratedSpec.parse(str(topology))), None
    if isinstance(topology, Mapping):
        return parse_topology(topology), None
    if isinstance(topology, str) and "\n" in topology:
        return parse_topology(topology), None
    path = Path(topology)
    loaded = load_topology(path)
    return loaded, path if path.exists() else None


async def start_simulator(
    topology: Topology | Mapping[str, Any] | str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    admin: bool = False,
    migration_rate_bps: int = DEFAULT_MIGRATION_RATE_BPS,
    max_storage_migrations: int = 3,
    plug_delay_ms: float = 0,
    latency: Latency | str | float | None = None,
    faults: Iterable[Mapping[str, Any] | FaultRule] = (),
    fault_seed: int | None = None,
    backing_dir: Path | str | None = None,
    device_root: Path | str | None = None,
    cache_lag_ms: Lag | str | float | None = DEFAULT_CACHE_LAG,
    noise_events_per_s: float = DEFAULT_NOISE_EVENTS_PER_S,
    migrate_retry_ms: float = DEFAULT_MIGRATE_RETRY_MS,
    destroy_retry_ms: float = DEFAULT_DESTROY_RETRY_MS,
    stream_rate_bps: int = 0,
) -> SimulatorHandle:
    """Start a simulator listening on host:port (0 picks a free port) and return its handle.

    Harsh by default: ``cache_lag_ms`` "20-150" (0 = instant), ``noise_events_per_s`` 20 (0 = off), XO's
    own retries 1 s (TOO_MANY_STORAGE_MIGRATES) and 5 s (VDI_IN_USE on destroy) apart. Raises
    ValueError/pydantic.ValidationError for a bad topology, fault or knob, RuntimeError when real data
    mode is asked for without root, OSError when the port cannot be bound.
    """
    resolved, source = resolve_topology(topology)
    rules = tuple(rule if isinstance(rule, FaultRule) else FaultRule.model_validate(rule) for rule in faults)
    if migrate_retry_ms < 0 or destroy_retry_ms < 0:
        raise ValueError("retry delays must be >= 0 ms")
    if stream_rate_bps < 0:
        raise ValueError("stream_rate_bps must be >= 0 (0 = unpaced)")
    options = SimulatorOptions(
        admin=admin, migration_rate_bps=migration_rate_bps, max_storage_migrations=max_storage_migrations,
        plug_delay_ms=plug_delay_ms, latency=latency if isinstance(latency, Latency) else Latency.parse(latency),
        faults=rules, fault_seed=fault_seed,
        backing_dir=Path(backing_dir) if backing_dir is not None else None,
        device_root=Path(device_root) if device_root is not None else None,
        cache_lag=cache_lag_ms if isinstance(cache_lag_ms, Lag) else Lag.parse(cache_lag_ms),
        noise_events_per_s=noise_events_per_s, migrate_retry_ms=migrate_retry_ms, destroy_retry_ms=destroy_retry_ms,
        stream_rate_bps=stream_rate_bps,
    )
    simulator = Simulator(resolved, options, source)
    try:
        await simulator.start()
    except BaseException:
        await simulator.close()
        raise
    runner = web.AppRunner(simulator.make_app(), access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    sock: socket.socket | None = None
    try:
        sock = socket.create_server((host, port))
        site = web.SockSite(runner, sock)
        await site.start()
    except BaseException:
        if sock is not None:
            sock.close()
        await runner.cleanup()
        await simulator.close()
        raise
    bound_port = sock.getsockname()[1]
    log.info("simulator_started", url=f"ws://{host}:{bound_port}/api/", admin=admin,
             real_data=simulator.data is not None, cache_lag_ms=str(options.cache_lag),
             noise_events_per_s=noise_events_per_s)
    return SimulatorHandle(simulator, runner, host, bound_port)
