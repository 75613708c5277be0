"""JSON-RPC 2.0 over one WebSocket, as json-rpc-peer speaks it: framing, batches, dispatch, replies, notifications.

Dispatch order for a call: method lookup (-32601), sign-in check (code 2), parameter validation (code 10),
object resolution through XO's cache (code 1, then code 2 for non-admins), latency, injected faults, then
the method. ``undefined`` results are sent as ``true``. XAPI and plain errors reach admins only; others
get "unknown error from the peer". A message arriving after the session's token expired closes the socket
without an answer (xo-server's index.mjs).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from shared.logging import get_logger

from .access import is_admin, resolve
from .cache import CURRENT_CALL, CacheMirror, CallTrace
from .errors import SimError, XoApiError, invalid_parameters, unauthorized
from .faults import Faults
from .methods import Method
from .params import check
from .stats import Stats

log = get_logger(__name__)
INVALID_JSON = {"code": -32700, "message": "invalid JSON"}
INVALID_REQUEST = {"code": -32600, "message": "invalid JSON-RPC request"}


class DropSocket(Exception):
    """Raised by a drop_socket fault: the connection is aborted without an answer."""


def dumps(value: Any) -> str:
    """Compact JSON."""
    return json.dumps(value, separators=(",", ":"))


def notification(kind: str, items: Mapping[str, Any]) -> str:
    """The ``all`` notification XO sends for object changes (``enter``) and removals (``exit``)."""
    return dumps({"jsonrpc": "2.0", "method": "all", "params": {"type": kind, "items": items}})


class Connection:
    """One WebSocket peer: its session (``user``, token expiry), its ordered outgoing queue and its in-flight calls."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, dispatcher: Dispatcher) -> None:
        self.ws = ws
        self.request = request
        self.dispatcher = dispatcher
        self.user: dict[str, Any] | None = None
        self.expires_at_s: float | None = None  # wall clock, like XO's connection 'expiration'
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._calls: set[asyncio.Task[None]] = set()

    @property
    def is_expired(self) -> bool:
        """Whether the token this socket signed in with has expired."""
        return self.expires_at_s is not None and self.expires_at_s < time.time()

    async def serve(self) -> None:
        """Read messages until the socket closes; each message is handled in its own task."""
        writer = asyncio.create_task(self._write_loop())
        try:
            async for message in self.ws:
                if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                if self.is_expired:
                    self.dispatcher.stats.expired_sessions += 1
                    await self.close(code=1000)  # no error: the client must reconnect and sign in again
                    break
                text = message.data if message.type == WSMsgType.TEXT else message.data.decode("utf-8", "replace")
                self._spawn(text)
        finally:
            # Calls finish server-side even when the peer is gone (as XO does); their replies are dropped.
            if self._calls:
                await asyncio.gather(*self._calls, return_exceptions=True)
            self._outbox.put_nowait(None)
            await writer

    def _spawn(self, text: str) -> None:
        task = asyncio.create_task(self._handle(text))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _handle(self, text: str) -> None:
        try:
            reply = await self.dispatcher.handle_text(self, text)
        except DropSocket:
            self.drop()
            return
        if reply is not None:
            self.send(reply)

    def send(self, text: str) -> None:
        """Queue a message; messages leave in queue order."""
        if not self.ws.closed:
            self._outbox.put_nowait(text)

    def notify(self, text: str) -> None:
        """Queue a notification if the socket is signed in."""
        if self.user is not None:
            self.send(text)

    async def _write_loop(self) -> None:
        while (text := await self._outbox.get()) is not None:
            if self.ws.closed:
                continue
            try:
                await self.ws.send_str(text)
            except ConnectionError:
                log.debug("send_failed_peer_gone")

    def drop(self) -> None:
        """Abort the TCP connection without a close frame (a network failure as the client sees it)."""
        self.dispatcher.stats.dropped_sockets += 1
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def close(self, code: int = WSCloseCode.GOING_AWAY) -> None:
        """Close the socket with a close frame and no error (what an expired session looks like)."""
        await self.ws.close(code=code)

    def cancel_calls(self) -> None:
        """Cancel the calls still running (the simulator is stopping; normally they outlive their socket)."""
        for task in list(self._calls):
            task.cancel()


class Dispatcher:
    """Turns JSON-RPC messages into method calls."""

    def __init__(self, methods: Mapping[str, Method], faults: Faults, stats: Stats, mirror: CacheMirror) -> None:
        self.methods = methods
        self.faults = faults
        self.stats = stats
        self.mirror = mirror
        self.cache = mirror.cache

    async def handle_text(self, conn: Connection, text: str) -> str | None:
        """Return the reply text for a message (None for notifications and client responses)."""
        try:
            message = json.loads(text)
        except ValueError:
            return dumps(_error_reply(None, INVALID_JSON))
        if isinstance(message, list):
            if not message:
                return dumps(_error_reply(None, INVALID_REQUEST))
            replies = await asyncio.gather(*(self.handle_message(conn, item) for item in message))
            kept = [reply for reply in replies if reply is not None]
            return dumps(kept) if kept else None
        reply = await self.handle_message(conn, message)
        return None if reply is None else dumps(reply)

    async def handle_message(self, conn: Connection, message: Any) -> dict[str, Any] | None:
        """Handle one request object; DropSocket propagates to the connection."""
        if not isinstance(message, dict):
            return _error_reply(None, INVALID_REQUEST)
        if "method" not in message and ("result" in message or "error" in message):
            return None  # a response from the client: json-rpc-peer ignores unknown ones
        method = message.get("method")
        request_id = message.get("id")
        if not isinstance(method, str) or not isinstance(request_id, str | int | float | type(None)):
            return _error_reply(request_id if isinstance(request_id, str | int) else None, INVALID_REQUEST)
        try:
            result = await self.call(conn, method, message.get("params", {}))
        except SimError as exc:
            reply = _error_reply(request_id, exc.to_json(is_admin=is_admin(conn.user)))
        except DropSocket:
            raise
        except Exception as exc:
            log.exception("rpc_crashed", method=method)
            reply = _error_reply(request_id, {"code": -32000, "message": str(exc) or type(exc).__name__})
        else:
            reply = {"jsonrpc": "2.0", "id": request_id, "result": result}
        return reply if "id" in message else None

    async def call(self, conn: Connection, method: str, params: Any) -> Any:
        """Run one method for this connection and return its result (``true`` for nothing)."""
        started_s = time.perf_counter()
        outcome = "ok"
        self.stats.calls[method] += 1
        self.stats.xo_enter(started_s)
        trace = CallTrace()
        token = CURRENT_CALL.set(trace)  # the changes made from here on in this task (and its children) are the call's
        try:
            entry = self.methods.get(method)
            if entry is None:
                raise XoApiError(-32601, f"method not found: {method}", method)
            if entry.permission is not None and conn.user is None:
                raise unauthorized(entry.permission or None)
            valid = self._validate(method, entry, params)
            objects = resolve(self.cache, entry.resolve, valid, conn.user)
            await self._inject(method)
            result = await entry.handler(conn, valid, objects)
            return True if result is None else result
        except SimError as exc:
            outcome = str(getattr(exc, "code", "error"))
            self.stats.errors[outcome] += 1
            raise
        except DropSocket:
            outcome = "dropped"
            raise
        finally:
            CURRENT_CALL.reset(token)
            answered_s = time.perf_counter()
            elapsed_s = answered_s - started_s
            self.stats.busy_s[method] += elapsed_s
            if self.mirror.shows(trace.ticket):
                self.stats.cache_wait_s[method] += 0.0
                self.stats.xo_leave(answered_s)
            else:
                self.stats.cache_waits_pending += 1
                self.mirror.when_shown(trace.ticket, lambda: self._cache_waited(method, answered_s))
            log.debug("rpc_finished", rpc=method, outcome=outcome, duration_ms=round(elapsed_s * 1000, 3))

    def _cache_waited(self, method: str, answered_s: float) -> None:
        now_s = time.perf_counter()
        self.stats.cache_waits_pending -= 1
        self.stats.cache_wait_s[method] += now_s - answered_s
        self.stats.xo_leave(now_s)
        log.debug("rpc_shown", rpc=method, cache_wait_ms=round((now_s - answered_s) * 1000, 3))

    async def _inject(self, method: str) -> None:
        delay_s = self.faults.latency.for_method_s(method)
        if delay_s > 0:
            await asyncio.sleep(delay_s)  # simulated network/XO latency
        rule = self.faults.pick(method)
        if rule is None:
            return
        if rule.kind == "drop_socket":
            raise DropSocket(method)
        raise rule.to_error(method)

    @staticmethod
    def _validate(method: str, entry: Method, params: Any) -> dict[str, Any]:
        namespace = method.partition(".")[0]
        if entry.schema is not None:
            return check(namespace, entry.schema, params)
        if not isinstance(params, Mapping):
            raise invalid_parameters([{"instancePath": "", "message": "must be object"}])
        return dict(params)


def _error_reply(request_id: Any, error: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error}
