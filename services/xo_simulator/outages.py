"""``pool_disconnect`` faults: XO loses a pool for a while, the pool's XAPI side keeps running.

On the first failed XAPI event poll xo-server drops every object of the pool from its cache (XO-STREAMS-AND-CACHE
§D5); they come back, current, when the connection recovers. Timers here only decide *when* the pool returns.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shared.logging import get_logger

from .cache import CacheMirror

log = get_logger(__name__)


class PoolOutages:
    """The pools XO has currently lost, each until its timer fires or reconnect() is called."""

    def __init__(self, mirror: CacheMirror) -> None:
        self._mirror = mirror
        self._timers: dict[str, asyncio.TimerHandle | None] = {}
        self._until_s: dict[str, float | None] = {}

    def disconnect(self, pool_id: str, duration_s: float | None) -> None:
        """Lose ``pool_id`` now, for ``duration_s`` seconds (None: until reconnect()). Extends a running outage."""
        if pool_id not in {obj["id"] for obj in self._mirror.truth.of_type("pool")}:
            raise ValueError(f"pool {pool_id!r} is not a pool of this simulator")
        self._cancel_timer(pool_id)
        loop = asyncio.get_running_loop()
        self._mirror.hide_pool(pool_id)
        self._timers[pool_id] = loop.call_later(duration_s, self.reconnect, pool_id) if duration_s else None
        self._until_s[pool_id] = loop.time() + duration_s if duration_s else None
        log.info("pool_disconnected", pool=pool_id, duration_s=duration_s)

    def reconnect(self, pool_id: str) -> None:
        """End the outage of ``pool_id`` (no-op when it is connected)."""
        self._cancel_timer(pool_id)
        self._timers.pop(pool_id, None)
        self._until_s.pop(pool_id, None)
        if not self._mirror.is_connected(pool_id):
            self._mirror.show_pool(pool_id)
            log.info("pool_reconnected", pool=pool_id)

    def reconnect_all(self) -> None:
        """End every outage."""
        for pool_id in self._mirror.hidden_pools:
            self.reconnect(pool_id)

    def describe(self) -> list[dict[str, Any]]:
        """JSON-ready view: ``[{pool, remaining_s}]`` (remaining_s None: until cleared)."""
        now = asyncio.get_running_loop().time()
        return [{"pool": pool_id, "remaining_s": None if until is None else round(max(0.0, until - now), 3)}
                for pool_id, until in self._until_s.items()]

    def close(self) -> None:
        """Cancel the timers (the simulator is stopping; pools stay as they are)."""
        for pool_id in list(self._timers):
            self._cancel_timer(pool_id)
        self._timers.clear()

    def _cancel_timer(self, pool_id: str) -> None:
        timer = self._timers.get(pool_id)
        if timer is not None:
            timer.cancel()
