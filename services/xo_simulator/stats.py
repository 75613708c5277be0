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
        self.started_at_s = time.time()

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
            "since_s": self.started_at_s,
        }
