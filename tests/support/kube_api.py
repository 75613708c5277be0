"""A Kubernetes API server stand-in over plain HTTP (aiohttp) for tests without the control-plane binaries: GET of
Nodes, PersistentVolumeClaims and CSINodes from dicts, a 404 Status for anything else, every request recorded,
and a kubeconfig pointing at it. Real HTTP, real client (lightkube): only the server side is small.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

Obj = dict[str, Any]


@dataclass
class FakeKubeApi:
    """Objects served by name; ``forbidden`` paths answer 403, ``requests`` lists every (method, path) seen."""

    nodes: dict[str, Obj] = field(default_factory=dict)
    pvcs: dict[tuple[str, str], Obj] = field(default_factory=dict)
    csinodes: dict[str, Obj] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    def add_node(self, name: str, labels: dict[str, str] | None = None, provider_id: str = "") -> Obj:
        node: Obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": dict(labels or {})},
                     "spec": {"providerID": provider_id} if provider_id else {}}
        self.nodes[name] = node
        return node

    def add_pvc(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.pvcs[(namespace, name)] = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                        "metadata": {"name": name, "namespace": namespace,
                                                     "annotations": annotations}, "spec": {}}

    def add_csinode(self, name: str, drivers: dict[str, str]) -> None:
        self.csinodes[name] = {"apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": name},
                               "spec": {"drivers": [{"name": driver, "nodeID": node_id, "topologyKeys": []}
                                                    for driver, node_id in drivers.items()]}}

    def kubeconfig(self, path: Path) -> Path:
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                  "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                  "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                  "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
        path.write_text(yaml.safe_dump(config))
        return path

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        if request.path in self.forbidden:
            return _status(403, "Forbidden", f"forbidden: cannot get {request.path}")
        found = self._lookup(request.path.strip("/").split("/")) if request.method == "GET" else None
        if found is None:
            return _status(404, "NotFound", f"{request.path} not found")
        return _json(found, 200)

    def _lookup(self, parts: list[str]) -> Obj | None:
        match parts:
            case ["api", "v1", "nodes", name]:
                return self.nodes.get(name)
            case ["api", "v1", "namespaces", namespace, "persistentvolumeclaims", name]:
                return self.pvcs.get((namespace, name))
            case ["apis", "storage.k8s.io", "v1", "csinodes", name]:
                return self.csinodes.get(name)
        return None


def _status(code: int, reason: str, message: str) -> web.Response:
    return _json({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
                  "code": code}, code)


def _json(body: Obj, status: int) -> web.Response:
    # exactly "application/json", as kube-apiserver sends it (lightkube reads error Status bodies only then)
    return web.Response(body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"})


@asynccontextmanager
async def fake_kube_api() -> AsyncIterator[FakeKubeApi]:
    """Serve a FakeKubeApi on a free 127.0.0.1 port for the block."""
    api = FakeKubeApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api._handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        await web.SockSite(runner, sock).start()
        api.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        yield api
    finally:
        await runner.cleanup()
        sock.close()
