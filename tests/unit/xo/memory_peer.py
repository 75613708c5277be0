"""An in-memory JSON-RPC peer: the transport seam for XoClient unit tests (no network)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from shared.xo.transport import Link, LinkClosed

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]
_CLOSE = object()


class RpcFault(Exception):
    """Raised by a test handler to answer with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            self.error["data"] = data


class DropSocket(Exception):
    """Raised by a test handler to close the connection without answering."""


class _MemoryLink:
    def __init__(self, peer: MemoryPeer) -> None:
        self._peer = peer
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False

    async def send(self, text: str) -> None:
        if self.closed:
            raise LinkClosed("closed")
        self._peer.received.append(json.loads(text))
        self._peer.spawn(self, json.loads(text))

    async def recv(self) -> str:
        item = await self.inbox.get()
        if item is _CLOSE:
            self.closed = True
            raise LinkClosed("peer closed")
        if isinstance(item, Exception):
            raise item
        assert isinstance(item, str)
        return item

    async def close(self) -> None:
        self.closed = True
        self.inbox.put_nowait(_CLOSE)

    def push(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self.inbox.put_nowait(json.dumps(message))

    def drop(self) -> None:
        self.inbox.put_nowait(_CLOSE)

    def unreadable(self) -> None:
        """The next recv fails as a frame that is not valid UTF-8 would (the link stays open)."""
        self.inbox.put_nowait(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))


class MemoryPeer:
    """Answers each request with ``handler(method, params)``; records what it received."""

    def __init__(self, handler: Handler, *, tokens: tuple[str, ...] = ("good-token",)) -> None:
        self.handler = handler
        self.tokens = tokens
        self.received: list[dict[str, Any]] = []
        self.links: list[_MemoryLink] = []
        self.connects = 0
        self.user: dict[str, Any] = {"id": "user", "email": "admin@example.org", "permission": "admin"}
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self) -> Link:
        self.connects += 1
        link = _MemoryLink(self)
        self.links.append(link)
        return link

    def spawn(self, link: _MemoryLink, request: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(link, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def notify(self, items: dict[str, Any]) -> None:
        """An ``all`` notification of objects that entered or changed (full objects, as XO sends them)."""
        for link in self.links:
            link.push({"jsonrpc": "2.0", "method": "all", "params": {"type": "enter", "items": items}})

    def notify_exit(self, *ids: str) -> None:
        """An ``all`` notification of removed objects: XO sends ``0`` as each one's value."""
        for link in self.links:
            link.push({"jsonrpc": "2.0", "method": "all", "params": {"type": "exit", "items": dict.fromkeys(ids, 0)}})

    async def _answer(self, link: _MemoryLink, request: dict[str, Any]) -> None:
        method, params = request["method"], request.get("params") or {}
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        try:
            if method == "session.signIn":
                if params.get("token") in self.tokens or params.get("password") == "pw":
                    reply["result"] = dict(self.user)
                else:
                    raise RpcFault(3, "invalid credentials")
            else:
                reply["result"] = await self.handler(method, params)
        except RpcFault as fault:
            reply.pop("result", None)
            reply["error"] = fault.error
        except DropSocket:
            link.drop()
            return
        link.push(reply)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
