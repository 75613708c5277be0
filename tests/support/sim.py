"""Helpers for the XO simulator tests: a raw JSON-RPC WebSocket client, waits on the cache (polled with
dev/wait.py's `eventually`), ids of bundled topologies.

Not a pytest conftest (pytest does not load it by name): test modules import what they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from dev.wait import eventually
from services.xo_simulator.server import SimulatorHandle, start_simulator
from services.xo_simulator.topology import derived_id

TOKEN = "sim-token"
VIEWER_TOKEN = "viewer-token"  # viewer@example.org, permission "none"
INSTANT = {"cache_lag_ms": 0, "noise_events_per_s": 0}  # the softened simulator, where a test counts events

# Ids of the bundled two-hosts topology (derived from names, see topology.derived_id).
POOL_A = derived_id("pool", "Pool A")
HOST_A1 = derived_id("host", "Pool A", "host-a1")
HOST_A2 = derived_id("host", "Pool A", "host-a2")
SR_NFS_A = derived_id("sr", "Pool A", "NFS A")
SR_LOCAL_A1 = derived_id("sr", "Pool A", "host-a1", "Local A1")
SR_LOCAL_A2 = derived_id("sr", "Pool A", "host-a2", "Local A2")
VM_A1 = derived_id("vm", "Pool A", "host-a1", "node-a1")
VM_A2 = derived_id("vm", "Pool A", "host-a2", "node-a2")
ROOT_A1 = derived_id("vdi", "Pool A", "host-a1", "node-a1", "root")  # node-a1's 10 GiB system disk, xvda
ROOT_A2 = derived_id("vdi", "Pool A", "host-a2", "node-a2", "root")


class RpcError(Exception):
    """A JSON-RPC error reply."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.error = error
        self.code = error.get("code")
        self.data = error.get("data")

    @property
    def xapi_code(self) -> str | None:
        return self.data.get("code") if isinstance(self.data, dict) else None


class RpcClient:
    """Minimal XO JSON-RPC client over ``websockets``; keeps every notification it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.notifications: list[dict[str, Any]] = []
        self.raw_replies: list[Any] = []
        self._changed = asyncio.Condition()
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> RpcClient:
        return cls(await connect(url, max_size=None, compression=None))

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                message = json.loads(text)
                await self._dispatch(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("socket closed"))
            async with self._changed:
                self._changed.notify_all()

    async def _dispatch(self, message: Any) -> None:
        if isinstance(message, dict) and "id" not in message:
            async with self._changed:
                self.notifications.append(message)
                self._changed.notify_all()
            return
        key = message.get("id") if isinstance(message, dict) else None
        future = self._pending.pop(key, None) if key is not None else None
        if future is not None and not future.done():
            future.set_result(message)
        else:
            self.raw_replies.append(message)
            async with self._changed:
                self._changed.notify_all()

    async def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one request object (its ``id`` is used as given) and return the reply object."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[payload["id"]] = future
        await self.ws.send(json.dumps(payload))
        return await asyncio.wait_for(future, 10)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call a method; raises RpcError on an error reply."""
        reply = await self.request({"jsonrpc": "2.0", "id": next(self._ids), "method": method,
                                    "params": params or {}})
        if "error" in reply:
            raise RpcError(reply["error"])
        return reply["result"]

    async def send_text(self, text: str) -> Any:
        """Send raw text and return the next reply that matches no pending call."""
        count = len(self.raw_replies)
        await self.ws.send(text)
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: len(self.raw_replies) > count or self.closed.is_set())
        return self.raw_replies[count]

    async def wait_notification(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10,
                                since: int = 0) -> dict:
        """Return the first notification (received from index ``since`` on, or upcoming) matching ``predicate``."""
        async with asyncio.timeout(timeout_s), self._changed:
            while True:
                for message in self.notifications[since:]:
                    if predicate(message):
                        return message
                await self._changed.wait()

    async def settled(self) -> int:
        """The number of notifications received once all those queued so far arrived (replies follow them)."""
        await self.call("system.getServerVersion")
        return len(self.notifications)

    async def sign_in(self, token: str = TOKEN) -> Any:
        return await self.call("session.signIn", {"token": token})

    async def objects(self, **filter_: Any) -> dict[str, Any]:
        return dict(await self.call("xo.getAllObjects", {"filter": filter_}))

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def cached(handle: SimulatorHandle, obj_id: str, predicate: Callable[[dict[str, Any]], bool] | None = None,
                 timeout_s: float = 10) -> dict[str, Any]:
    """Wait until XO's cache shows ``obj_id`` (matching ``predicate``) and return it."""
    def shown() -> bool:
        obj = handle.cache.find(obj_id)
        return obj is not None and (predicate is None or predicate(obj))

    await eventually(shown, timeout_s)
    return handle.cache.get(obj_id)


async def uncached(handle: SimulatorHandle, obj_id: str, timeout_s: float = 10) -> None:
    """Wait until XO's cache no longer shows ``obj_id``."""
    await eventually(lambda: obj_id not in handle.cache, timeout_s)


def items_of(notification: dict[str, Any], kind: str) -> dict[str, Any]:
    """The ``items`` of an ``all`` notification of ``kind`` (enter/exit), else {}."""
    params = notification.get("params", {})
    if notification.get("method") == "all" and params.get("type") == kind:
        return dict(params.get("items", {}))
    return {}


@contextlib.asynccontextmanager
async def running(topology: Any = "two-hosts", **options: Any) -> AsyncIterator[SimulatorHandle]:
    """A simulator for one test, stopped afterwards."""
    handle = await start_simulator(topology, **options)
    try:
        yield handle
    finally:
        await handle.stop()


@contextlib.asynccontextmanager
async def client(handle: SimulatorHandle, *, signed_in: bool = True, token: str = TOKEN) -> AsyncIterator[RpcClient]:
    """A client connected (and by default signed in with the admin token) to ``handle``."""
    rpc = await RpcClient.open(handle.url)
    try:
        if signed_in:
            await rpc.sign_in(token)
        yield rpc
    finally:
        await rpc.close()
