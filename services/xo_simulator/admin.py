"""Admin HTTP API under ``/_sim/`` (only mounted with ``--admin``): state, stats, faults, reset. JSON in and out."""

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

    async def state(_: web.Request) -> web.Response:
        return web.json_response(sim.store.all())

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(sim.stats.snapshot(
            active_migrations=sim.migrator.active, open_connections=len(sim.connections)))

    async def list_faults(_: web.Request) -> web.Response:
        return web.json_response({"rules": sim.faults.rules()})

    async def add_faults(request: web.Request) -> web.Response:
        body = await _json_body(request)
        specs = body.get("rules", body) if isinstance(body, dict) else body
        try:
            rules = Faults.parse(specs)
        except (ValidationError, TypeError, ValueError) as exc:
            raise _bad_request(str(exc)) from exc
        await sim.add_faults(rules)
        return web.json_response({"rules": sim.faults.rules()})

    async def clear_faults(_: web.Request) -> web.Response:
        sim.faults.clear()
        return web.json_response({"rules": []})

    async def set_latency(request: web.Request) -> web.Response:
        body = await _json_body(request)
        spec = body.get("spec", "") if isinstance(body, dict) else ""
        try:
            sim.faults.latency = Latency.parse(str(spec)) if spec else Latency({})
        except ValueError as exc:
            raise _bad_request(str(exc)) from exc
        return web.json_response({"spec": str(spec)})

    async def reset(request: web.Request) -> web.Response:
        body = await _json_body(request) if request.can_read_body else {}
        reload_topology = bool(body.get("topology", False)) if isinstance(body, dict) else False
        await sim.reset(reload_topology=reload_topology)
        return web.json_response({"reset": True, "topology": reload_topology, "objects": len(sim.store)})

    app.router.add_get("/_sim/state", state)
    app.router.add_get("/_sim/stats", stats)
    app.router.add_get("/_sim/faults", list_faults)
    app.router.add_post("/_sim/faults", add_faults)
    app.router.add_delete("/_sim/faults", clear_faults)
    app.router.add_post("/_sim/reset", reset)
    app.router.add_put("/_sim/latency", set_latency)


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
