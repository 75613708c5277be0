"""XO's object cache: a lagged, batched mirror of the XAPI-side truth, in which whole pools can vanish.

xo-server never reads XAPI directly: it polls XAPI events (at least 200 ms apart) into its own cache and
answers ``xo.getAllObjects``, ``all`` notifications and the id resolution of every method from that cache.
CacheMirror models it: every change of the truth store reaches the cache after a random lag, changes that
fall due together are applied as one batch (one ``enter`` and one ``exit`` notification), and a pool that
XO lost is hidden from the cache until it comes back. XAPI-level checks never read the cache. Every step costs
O(changes): nothing here scans the stores.

``CallTrace`` ties truth changes to the JSON-RPC call that made them (a context variable the dispatcher sets), so
the simulator can tell how long after its answer a call's effect reached the cache: the time a client that reads
its own writes spends waiting for XO's cache by design (stats ``cache_wait_s``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from .model import ObjectStore
from .shapes import XoObject

# A timer may fire a little before its deadline (asyncio clock resolution): treat that as due.
_EARLY_S = 0.001


@dataclass(frozen=True)
class Lag:
    """How long a change takes to reach the cache, uniform in [low_ms, high_ms]; ``0`` means at once."""

    low_ms: float
    high_ms: float

    @classmethod
    def parse(cls, spec: str | float | int | None) -> Lag:
        """Parse ``"20-150"``, ``"50"`` or a number of ms; ValueError when malformed or negative."""
        if spec is None or spec == "":
            return cls(0.0, 0.0)
        if isinstance(spec, int | float):
            low, high = float(spec), float(spec)
        else:
            first, sep, second = spec.strip().partition("-")
            try:
                low = float(first)
                high = float(second) if sep else low
            except ValueError as exc:
                raise ValueError(f"cache lag {spec!r} must be MS or LOW-HIGH in ms, e.g. 20-150") from exc
        if low < 0 or high < low:
            raise ValueError(f"cache lag {spec!r} must satisfy 0 <= LOW <= HIGH")
        return cls(low, high)

    @property
    def is_instant(self) -> bool:
        """Whether changes reach the cache in the same step as the truth (benchmarks only)."""
        return self.high_ms <= 0

    def draw_s(self, rng: random.Random) -> float:
        """One lag, in seconds."""
        return rng.uniform(self.low_ms, self.high_ms) / 1000

    def __str__(self) -> str:
        return f"{self.low_ms:g}-{self.high_ms:g}" if self.high_ms != self.low_ms else f"{self.high_ms:g}"


@dataclass
class CallTrace:
    """The truth changes of one call: ``ticket`` is the mirror ticket whose application shows them all (0: none
    pending, e.g. an instant cache)."""

    ticket: int = 0


CURRENT_CALL: ContextVar[CallTrace | None] = ContextVar("xo_sim_current_call", default=None)
"""Set by the dispatcher around each call; changes made in that task (and tasks it starts) count as the call's."""


class CacheMirror:
    """The cache (``self.cache``) following the truth store after a lag, with hidden (disconnected) pools.

    Each changed id is applied at its due time by reading the truth's *current* version of it, as an XAPI
    event poll does; due times never go backwards, so the cache never shows an older state after a newer one.
    """

    def __init__(self, truth: ObjectStore, lag: Lag, rng: random.Random) -> None:
        self.truth = truth
        self.cache = ObjectStore()
        self.lag = lag
        self._rng = rng
        self._pending: dict[str, tuple[float, int]] = {}  # id -> (due, ticket), in due order
        self._last_due = 0.0
        self._issued = 0  # last ticket handed out
        self._applied = 0  # every ticket up to this one has reached the cache
        self._waiters: list[tuple[int, int, Callable[[], None]]] = []  # heap of (ticket, sequence, callback)
        self._sequence = itertools.count()
        self._hidden: dict[str, asyncio.Event] = {}
        self._loading: dict[str, asyncio.TimerHandle] = {}  # reconnected pools whose objects have not entered yet
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        truth.subscribe(self._on_truth_change)

    # -- queries -------------------------------------------------------------------------------------
    @property
    def hidden_pools(self) -> list[str]:
        """Pools XO has lost (their objects are absent from the cache)."""
        return list(self._hidden)

    def is_connected(self, pool_id: str) -> bool:
        """Whether XO has a connection to this pool (``server.getAll``'s status), its objects loaded or loading."""
        return pool_id not in self._hidden or pool_id in self._loading

    @property
    def pending(self) -> int:
        """Number of changed ids that have not reached the cache yet."""
        return len(self._pending)

    # -- following the truth -------------------------------------------------------------------------
    def _on_truth_change(self, entered: Mapping[str, XoObject], exited: Mapping[str, XoObject]) -> None:
        changed = [*entered, *exited]
        if self.lag.is_instant:
            self._apply(changed)
            return
        loop = asyncio.get_running_loop()
        due = max(loop.time() + self.lag.draw_s(self._rng), self._last_due)
        self._last_due = due
        shown_by = 0
        for obj_id in changed:
            scheduled = self._pending.get(obj_id)
            if scheduled is None:
                self._issued += 1
                scheduled = self._pending[obj_id] = (due, self._issued)
            shown_by = max(shown_by, scheduled[1])  # already scheduled: that poll will read the newest version
        if (trace := CURRENT_CALL.get()) is not None:
            trace.ticket = max(trace.ticket, shown_by)
        self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None and self._pending and not self._closed:
            first_due = next(iter(self._pending.values()))[0]
            self._timer = loop.call_at(first_due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time() + _EARLY_S
        due_ids = []
        last_ticket = self._applied
        for obj_id, (due, ticket) in self._pending.items():
            if due > now:
                break
            due_ids.append(obj_id)
            last_ticket = ticket
        for obj_id in due_ids:
            del self._pending[obj_id]
        self._apply(due_ids)
        self._settle(last_ticket)
        self._arm(loop)

    def _apply(self, obj_ids: list[str]) -> None:
        with self.cache.batch():
            for obj_id in obj_ids:
                self._sync(obj_id)

    def _sync(self, obj_id: str) -> None:
        obj = self.truth.find(obj_id)
        is_visible = obj is not None and obj["$pool"] not in self._hidden
        shown = self.cache.find(obj_id)
        if obj is None or not is_visible:
            if shown is not None:
                self.cache.remove(obj_id)
        elif shown is not obj:  # objects are copy-on-write: identity means nothing changed
            self.cache.put(obj)

    def _settle(self, ticket: int) -> None:
        self._applied = max(self._applied, ticket)
        while self._waiters and self._waiters[0][0] <= self._applied:
            heapq.heappop(self._waiters)[2]()

    def shows(self, ticket: int) -> bool:
        """Whether the change batch ``ticket`` (a ``CallTrace.ticket``; 0: none) already shows in the cache."""
        return ticket <= self._applied or self._closed

    def when_shown(self, ticket: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the change batch ``ticket`` (a ``CallTrace.ticket``) shows in the cache: now when
        it already does, else right after the batch's notification is queued (or at close())."""
        if self.shows(ticket):
            callback()
        else:
            heapq.heappush(self._waiters, (ticket, next(self._sequence), callback))

    def flush(self) -> None:
        """Apply every pending change now (topology load and reset)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        obj_ids = list(self._pending)
        self._pending.clear()
        self._apply(obj_ids)
        self._settle(self._issued)

    async def barrier(self, pool_id: str | None = None) -> None:
        """Wait until every truth change made so far shows in the cache, and ``pool_id`` is connected.

        XO's ``barrier``/``_getOrWaitObject``: used by the calls that return only once their new object is
        in the cache (disk.create, vdi.migrate). Has no timeout, like XO's; close() releases it.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.when_shown(self._issued, lambda: None if future.done() else future.set_result(None))
        await future
        while pool_id is not None and not self._closed and (lost := self._hidden.get(pool_id)) is not None:
            await lost.wait()

    # -- lost pools ----------------------------------------------------------------------------------
    def hide_pool(self, pool_id: str) -> None:
        """XO lost the pool: every object of it leaves the cache at once (one ``exit``)."""
        if (loading := self._loading.pop(pool_id, None)) is not None:
            loading.cancel()  # lost again before its objects came back
        if pool_id in self._hidden:
            return
        self._hidden[pool_id] = asyncio.Event()
        with self.cache.batch():
            for obj in self.cache.in_pool(pool_id):
                self.cache.remove(obj["id"])

    def show_pool(self, pool_id: str) -> None:
        """XO reconnected: the pool's status turns ``connected`` at once, and every current object of it enters the
        cache at once (one ``enter``) one cache lag (its high bound) later. xo-server's connectXenServer marks the
        pool connected once XAPI's session is open, then xen-api's initial fetch (``get_all_records`` of every
        type, one batch) brings the objects: in between, an empty lookup in that pool proves nothing."""
        if pool_id not in self._hidden or pool_id in self._loading:
            return
        delay_s = self.lag.high_ms / 1000
        if delay_s <= 0 or self._closed:
            self._show_now(pool_id)
            return
        self._loading[pool_id] = asyncio.get_running_loop().call_later(delay_s, self._show_now, pool_id)

    def _show_now(self, pool_id: str) -> None:
        self._loading.pop(pool_id, None)
        lost = self._hidden.pop(pool_id, None)
        if lost is None:
            return
        with self.cache.batch():
            for obj in self.truth.in_pool(pool_id):
                if self.cache.find(obj["id"]) is not obj:
                    self.cache.put(obj)
        lost.set()

    def close(self) -> None:
        """Stop following the truth and release every barrier (the simulator is stopping)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._settle(self._issued)
        for loading in self._loading.values():
            loading.cancel()
        self._loading.clear()
        for lost in self._hidden.values():
            lost.set()
