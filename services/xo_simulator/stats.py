"""Counters exposed by the admin API: calls per method, errors per code, completed migrations per disk."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    """Mutable counters; reset() zeroes them."""

    calls: Counter[str] = field(default_factory=Counter)
    busy_s: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))  # own time per method
    # per method: time from a call's answer until XO's cache showed every change it made (cache.CallTrace)
    cache_wait_s: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    errors: Counter[str] = field(default_factory=Counter)
    migrations: Counter[str] = field(default_factory=Counter)
    live_migrations: int = 0
    copy_migrations: int = 0
    connections: int = 0
    dropped_sockets: int = 0
    expired_sessions: int = 0  # sockets closed at their first message after their token expired
    notifications: int = 0  # ``all`` messages sent (one per socket and batch)
    streams: Counter[str] = field(default_factory=Counter)  # REST content streams started: rest.vdi.export|import
    active_streams: int = 0  # REST content streams running now
    cache_waits_pending: int = 0  # calls answered whose changes XO's cache does not show yet (kept by reset())
    # Wall time during which a call ran or a call's change was not in XO's cache yet: XO's share of a client's
    # time when one client works at a time (busy_s and cache_wait_s add up overlapping calls and waits).
    xo_time_s: float = 0.0
    _xo_open: int = 0  # calls running + changes pending (kept by reset())
    _xo_since_s: float = 0.0
    started_at_s: float = field(default_factory=time.time)

    def reset(self) -> None:
        """Zero every counter (open connections are kept)."""
        self.calls.clear()
        self.busy_s.clear()
        self.cache_wait_s.clear()
        self.errors.clear()
        self.migrations.clear()
        self.streams.clear()
        self.live_migrations = self.copy_migrations = self.dropped_sockets = 0
        self.expired_sessions = self.notifications = 0
        self.xo_time_s = 0.0
        if self._xo_open:
            self._xo_since_s = time.perf_counter()
        self.started_at_s = time.time()

    def xo_enter(self, now_s: float) -> None:
        """A call starts (``time.perf_counter()`` now)."""
        if self._xo_open == 0:
            self._xo_since_s = now_s
        self._xo_open += 1

    def xo_leave(self, now_s: float) -> None:
        """A call is over: answered and its changes shown in XO's cache."""
        self._xo_open -= 1
        if self._xo_open == 0:
            self.xo_time_s += now_s - self._xo_since_s

    def snapshot(self, *, active_migrations: int, open_connections: int) -> dict[str, Any]:
        """JSON-ready view of the counters."""
        return {
            "calls": dict(self.calls),
            "total_calls": sum(self.calls.values()),
            "busy_s": {method: round(seconds, 6) for method, seconds in self.busy_s.items()},
            "cache_wait_s": {method: round(seconds, 6) for method, seconds in self.cache_wait_s.items()},
            "errors": dict(self.errors),
            "migrations": dict(self.migrations),
            "live_migrations": self.live_migrations,
            "copy_migrations": self.copy_migrations,
            "active_migrations": active_migrations,
            "connections": self.connections,
            "open_connections": open_connections,
            "dropped_sockets": self.dropped_sockets,
            "expired_sessions": self.expired_sessions,
            "notifications": self.notifications,
            "streams": dict(self.streams),
            "active_streams": self.active_streams,
            "cache_waits_pending": self.cache_waits_pending,
            "xo_time_s": round(self.xo_time_s + (time.perf_counter() - self._xo_since_s if self._xo_open else 0.0), 6),
            "since_s": self.started_at_s,
        }
