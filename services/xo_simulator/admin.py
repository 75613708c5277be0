"""Admin HTTP API under ``/_sim/`` (only with ``--admin``): truth, cache, stats, faults, reset; JSON in and out."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from .faults import Faults, Latency

if TYPE_CHECKING:
    from .server import Simulator


def add_routes(app: web.Application, sim: Simulator) -> None:
    """Mount the admin routes for ``sim`` on ``app``."""
    routes = _AdminRoutes(sim)
    app.router.add_get("/_sim/state", routes.state)
    app.router.add_get("/_sim/cache", routes.cache)
    app.router.add_get("/_sim/stats", routes.stats)
    app.router.add_get("/_sim/faults", routes.list_faults)
    app.router.add_post("/_sim/faults", routes.add_faults)
    app.router.add_delete("/_sim/faults", routes.clear_faults)
    app.router.add_post("/_sim/reset", routes.reset)
    app.router.add_put("/_sim/latency", routes.set_latency)


class _AdminRoutes:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def state(self, _: web.Request) -> web.Response:
        """The truth: every object XAPI knows, keyed by id."""
        return web.json_response(self.sim.store.all())

    async def cache(self, _: web.Request) -> web.Response:
        """XO's cache: what xo.getAllObjects shows right now."""
        return web.json_response(self.sim.cache.all())

    async def stats(self, _: web.Request) -> web.Response:
        sim = self.sim
        snapshot = sim.stats.snapshot(active_migrations=sim.migrator.active, open_connections=len(sim.connections))
        snapshot |= {"noise_events": sim.noise.emitted, "cache_pending": sim.mirror.pending,
                     "cache_lag_ms": str(sim.options.cache_lag), "disconnected_pools": sim.mirror.hidden_pools}
        return web.json_response(snapshot)

    def _faults_view(self) -> dict[str, Any]:
        return {"rules": self.sim.faults.rules(), "disconnected_pools": self.sim.outages.describe()}

    async def list_faults(self, _: web.Request) -> web.Response:
        return web.json_response(self._faults_view())

    async def add_faults(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        specs = body.get("rules", body) if isinstance(body, dict) else body
        try:
            await self.sim.add_faults(Faults.parse(specs))
        except (ValidationError, TypeError, ValueError) as exc:
            raise _bad_request(str(exc)) from exc
        return web.json_response(self._faults_view())

    async def clear_faults(self, _: web.Request) -> web.Response:
        """Remove every rule and reconnect every lost pool."""
        self.sim.clear_faults()
        return web.json_response(self._faults_view())

    async def set_latency(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        spec = body.get("spec", "") if isinstance(body, dict) else ""
        try:
            self.sim.faults.latency = Latency.parse(str(spec)) if spec else Latency({})
        except ValueError as exc:
            raise _bad_request(str(exc)) from exc
        return web.json_response({"spec": str(spec)})

    async def reset(self, request: web.Request) -> web.Response:
        body = await _json_body(request) if request.can_read_body else {}
        reload_topology = bool(body.get("topology", False)) if isinstance(body, dict) else False
        await self.sim.reset(reload_topology=reload_topology)
        return web.json_response({"reset": True, "topology": reload_topology, "objects": len(self.sim.store)})


async def _json_body(request: web.Request) -> Any:
    text = await request.text()
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _bad_request(f"invalid JSON: {exc}") from exc


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")
