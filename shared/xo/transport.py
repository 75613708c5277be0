"""JSON-RPC 2.0 over one long-lived WebSocket to XO's ``/api/``: connect, sign in, multiplex, reconnect.

The only module that touches the socket library. A ``Connector`` opens ``Link``s; tests plug an
in-memory connector in (the transport seam) instead of patching internals.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection

from shared import metrics
from shared.logging import get_logger
from shared.xo.errors import XoAuthError, XoError, XoUnavailable, from_rpc_error

log = get_logger(__name__)

NotificationHandler = Callable[[str, Any], None]


class LinkClosed(Exception):
    """Raised by a Link when the peer closed the connection."""


class Link(Protocol):
    """One open message connection. ``recv`` raises LinkClosed when the peer closed it; any other exception
    (e.g. a frame that is not valid UTF-8) makes the session drop this link."""

    async def send(self, text: str) -> None: ...
    async def recv(self) -> str: ...
    async def close(self) -> None: ...


class Connector(Protocol):
    """Opens a new Link; raises OSError/TimeoutError/LinkClosed when it cannot."""

    async def connect(self) -> Link: ...


@dataclass(frozen=True)
class Credentials:
    """Token, or email and password. ``repr`` never shows the secret."""

    token: str | None = None
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(token={'set' if self.token else None}, username={self.username!r})"

    def sign_in_params(self) -> dict[str, str]:
        if self.token:
            return {"token": self.token}
        if self.username and self.password is not None:
            return {"email": self.username, "password": self.password}
        raise XoAuthError("no XO credentials: set XOA_TOKEN, or XOA_USERNAME and XOA_PASSWORD")


def api_url(base_url: str) -> str:
    """``https://xo`` -> ``wss://xo/api/``; ws(s) URLs are kept; the path becomes ``/api/``."""
    parts = urlsplit(base_url if "://" in base_url else f"https://{base_url}")
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"XOA_URL {base_url!r} must look like https://xo.example.org")
    path = parts.path.rstrip("/")
    path = path if path.endswith("/api") else f"{path}/api"
    return urlunsplit((scheme, parts.netloc, f"{path}/", "", ""))


def tls_context(ca_file: Path | None, insecure: bool) -> ssl.SSLContext:
    """TLS context for wss: system CAs, or ``ca_file``; ``insecure`` turns verification off explicitly."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _WsLink:
    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn

    async def send(self, text: str) -> None:
        try:
            await self._conn.send(text)
        except websockets.ConnectionClosed as exc:
            raise LinkClosed(str(exc)) from exc

    async def recv(self) -> str:
        try:
            message = await self._conn.recv()
        except websockets.ConnectionClosed as exc:
            raise LinkClosed(str(exc)) from exc
        return message if isinstance(message, str) else message.decode()

    async def close(self) -> None:
        await self._conn.close()


class WebSocketConnector:
    """Opens WebSockets to ``url`` (already the ``/api/`` URL)."""

    def __init__(self, url: str, *, ssl_context: ssl.SSLContext | None, max_message_bytes: int) -> None:
        self._url = url
        self._ssl = ssl_context if url.startswith("wss:") else None
        self._max = max_message_bytes

    async def connect(self) -> Link:
        try:
            conn = await websockets.connect(
                self._url, ssl=self._ssl, max_size=self._max, open_timeout=None, ping_interval=20, compression=None
            )
        except websockets.InvalidHandshake as exc:
            raise LinkClosed(f"WebSocket handshake refused: {exc}") from exc
        except websockets.InvalidURI as exc:
            raise LinkClosed(f"invalid XO URL: {exc}") from exc
        return _WsLink(conn)


class _Connection:
    """One signed-in link with its own reader task and its own calls in flight.

    When its reader stops (the peer closed, a frame could not be read, anything unexpected), it fails only
    its own pending calls and tells the session, which forgets it; the next call opens a new connection. A
    late close of an old connection can therefore never fail calls running on a newer one.
    """

    def __init__(self, link: Link, dispatch: Callable[[dict[str, Any]], None],
                 gone: Callable[[_Connection], None]) -> None:
        self.link = link
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self._dispatch = dispatch
        self._gone = gone
        self.reader = asyncio.create_task(self._read(), name="xo-rpc-reader")

    async def _read(self) -> None:
        reason = "closed by XO"
        try:
            while True:
                message = _parse(await self.link.recv())
                if message is not None:
                    self._route(message)
        except LinkClosed as exc:
            reason = str(exc) or reason
            log.info("xo_connection_closed", reason=reason)
        except asyncio.CancelledError:
            reason = "client closed"
            raise
        except Exception as exc:  # a frame we cannot read: drop this link only, the next call reconnects
            reason = f"unreadable message from XO ({type(exc).__name__})"
            log.warning("xo_connection_dropped", reason=reason)
            await _quiet_close(self.link)
        finally:
            self.fail(_ConnectionLost(reason))
            self._gone(self)

    def _route(self, message: dict[str, Any]) -> None:
        call_id = message.get("id")
        if call_id is None:
            self._dispatch(message)
            return
        future = self.pending.get(call_id) if isinstance(call_id, int) else None
        if future is not None and not future.done():
            future.set_result(message)

    def fail(self, exc: Exception) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await _quiet_close(self.link)


class RpcSession:
    """JSON-RPC calls multiplexed by id over one signed-in Link, reconnecting on demand.

    ``call`` is bounded by ``timeout_s``; connect plus sign-in by ``connect_timeout_s``. When the socket
    closes (XO closes it silently when a token expires), pending calls fail with XoUnavailable and the
    next call reconnects and signs in again. A call flagged ``idempotent`` is retried once on a fresh
    connection when the socket closed under it. Notifications (no id) go to ``subscribe``d handlers; a
    handler that raises is logged and the others still run.
    """

    def __init__(
        self,
        connector: Connector,
        credentials: Credentials,
        *,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self._connector = connector
        self._credentials = credentials
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._ids = itertools.count(1)
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._handlers: list[NotificationHandler] = []
        self._on_connect: list[Callable[[], Awaitable[None]]] = []
        self.connections_opened = 0
        self.user: dict[str, Any] | None = None
        self._required: tuple[str, str] | None = None

    async def require_admin(self, component: str) -> None:
        """From now on every sign-in must be an XO admin's, else every call fails with XoAuthError saying why:
        XO hides the XAPI errors the driver must classify (busy, no space, in use) from other users. A session
        already signed in with another account is closed at once (XoAuthError)."""
        self._required = ("admin", component)
        if self._connection is not None and (self.user or {}).get("permission") != "admin":
            connection, self._connection = self._connection, None
            await connection.close()
            self._permission_error(self.user or {})

    def subscribe(self, handler: NotificationHandler) -> Callable[[], None]:
        """Call ``handler(method, params)`` for each notification; returns an unsubscribe function."""
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler) if handler in self._handlers else None

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after each successful sign-in (e.g. to resynchronise a cache)."""
        self._on_connect.append(callback)

    @property
    def is_connected(self) -> bool:
        """Whether a signed-in socket is open now (notifications are arriving)."""
        return self._connection is not None and not self._connection.reader.done()

    async def ensure_connected(self) -> None:
        """Connect and sign in now unless connected (the ``on_reconnect`` callbacks run before this returns);
        XoUnavailable/XoAuthError as for a call."""
        await self._ensure_connection()

    async def call(self, method: str, params: dict[str, Any], *, timeout_s: float | None = None,
                   idempotent: bool = False) -> Any:
        """Call ``method`` and return its result; raises the XoError subclass for XO's answer."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await self._call_retrying(method, params, timeout_s or self._timeout_s, 2 if idempotent else 1)
        except XoError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            metrics.XO_CALLS.labels(method, outcome).inc()
            metrics.XO_DURATION.labels(method).observe(time.perf_counter() - started)

    async def _call_retrying(self, method: str, params: dict[str, Any], timeout_s: float, attempts: int) -> Any:
        for attempt in range(attempts):
            try:
                return await self._call_once(method, params, timeout_s)
            except _ConnectionLost as exc:
                if attempt + 1 == attempts:
                    raise XoUnavailable(f"XO closed the connection during {method}: {exc}", method=method) from exc
                log.debug("xo_call_retried", method=method, reason=str(exc))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close the socket and fail pending calls. Safe to call twice."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def _call_once(self, method: str, params: dict[str, Any], timeout_s: float) -> Any:
        connection = await self._ensure_connection()
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        connection.pending[call_id] = future
        try:
            if connection.reader.done():  # it died after we picked it: its reader will never answer
                raise _ConnectionLost("the connection closed before the call was sent")
            payload = json.dumps({"jsonrpc": "2.0", "id": call_id, "method": method, "params": params})
            try:
                async with asyncio.timeout(timeout_s):
                    await connection.link.send(payload)
                    answer = await future
            except LinkClosed as exc:
                raise _ConnectionLost(str(exc)) from exc
            except TimeoutError as exc:
                raise XoUnavailable(f"XO did not answer {method} within {timeout_s:g}s", method=method) from exc
        finally:
            connection.pending.pop(call_id, None)
        if "error" in answer:
            raise from_rpc_error(answer["error"], method)
        return answer.get("result")

    async def _ensure_connection(self) -> _Connection:
        if self._connection is not None:
            return self._connection
        async with self._connecting:
            if self._connection is not None:
                return self._connection
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    link = await self._connector.connect()
                    self.user = await self._sign_in(link)
                    await self._check_permission(link)
            except TimeoutError as exc:
                raise XoUnavailable(f"connecting to XO timed out after {self._connect_timeout_s:g}s") from exc
            except (OSError, LinkClosed) as exc:
                raise XoUnavailable(f"cannot connect to XO: {_describe(exc)}") from exc
            connection = _Connection(link, self._notify, self._forget)
            self._connection = connection
            self.connections_opened += 1
            log.debug("xo_connected", connections=self.connections_opened)
        for callback in self._on_connect:
            await callback()
        return connection

    async def _check_permission(self, link: Link) -> None:
        if self._required is None:
            return
        if (self.user or {}).get("permission") != "admin":
            await _quiet_close(link)
            self._permission_error(self.user or {})

    def _permission_error(self, user: dict[str, Any]) -> None:
        component = self._required[1] if self._required else "driver"
        raise XoAuthError(
            f"the XO account {user.get('email') or user.get('id') or '?'} has permission {user.get('permission')!r}; "
            f"the {component} needs an XO admin account (XO hides the XAPI errors it must classify, such as busy or "
            "no space, from other users): use an admin user's token",
            method="session.signIn",
        )

    def _forget(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None

    async def _sign_in(self, link: Link) -> dict[str, Any] | None:
        # Sign-in runs before the reader task exists, so it reads its own answer (skipping notifications).
        params = self._credentials.sign_in_params()
        await link.send(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "session.signIn", "params": params}))
        while True:
            message = _parse(await link.recv())
            if message is not None and message.get("id") == 0:
                break
        if "error" in message:
            await _quiet_close(link)
            raise _sign_in_error(from_rpc_error(message["error"], "session.signIn"), self._credentials)
        user = message.get("result")
        return user if isinstance(user, dict) else None

    def _notify(self, message: dict[str, Any]) -> None:
        method = str(message.get("method"))
        params = message.get("params")
        for handler in list(self._handlers):
            try:
                handler(method, params)
            except Exception:  # one broken subscriber must not take the connection down
                log.exception("xo_notification_handler_failed", method=method)


def _sign_in_error(error: XoError, credentials: Credentials) -> XoAuthError:
    reason = error.message.removeprefix("XO session.signIn failed: ")
    if error.rpc_code == 3 and credentials.token:
        hint = ("XO refused XOA_TOKEN: it is invalid or has expired (XO tokens expire, 30 days by default). "
                "Create a new one with `xo-cli token.create expiresIn=<ms>` (JSON-RPC token.create) or in XO's "
                "user settings, and update the secret")
    elif error.rpc_code == 3:
        hint = "XO refused XOA_USERNAME/XOA_PASSWORD (invalid credentials); check them"
    else:
        hint = f"XO refused the sign-in ({reason}); check XOA_TOKEN or XOA_USERNAME/XOA_PASSWORD"
    return XoAuthError(hint, rpc_code=error.rpc_code, method="session.signIn")


class _ConnectionLost(Exception):
    """Internal: the socket closed while a call was in flight."""


def _parse(text: str) -> dict[str, Any] | None:
    try:
        message = json.loads(text)
    except ValueError:
        log.warning("xo_message_unparsable", size=len(text))
        return None
    return message if isinstance(message, dict) else None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _quiet_close(link: Link) -> None:
    try:
        async with asyncio.timeout(2):
            await link.close()
    except (TimeoutError, OSError, LinkClosed):
        pass


__all__ = [
    "Connector",
    "Credentials",
    "Link",
    "LinkClosed",
    "RpcSession",
    "WebSocketConnector",
    "XoError",
    "api_url",
    "tls_context",
]
