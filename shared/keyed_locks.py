"""In-process asyncio locks by key (a volume, a VM), each dropped when nobody holds or waits for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class KeyedLocks:
    """One ``asyncio.Lock`` per key, created on first use and dropped when its last holder or waiter leaves."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def locked(self, key: str) -> bool:
        """Whether someone holds ``key`` now."""
        entry = self._entries.get(key)
        return entry is not None and entry.lock.locked()

    def __len__(self) -> int:
        """Keys held or waited for now."""
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def hold(self, key: str, *, timeout_s: float | None = None,
                   on_timeout: Callable[[], BaseException] | None = None) -> AsyncIterator[None]:
        """Hold ``key`` for the block. A waiter gives up after ``timeout_s`` (None: waits as long as it takes) with
        ``on_timeout()`` (default: TimeoutError); a TimeoutError raised by the block itself passes unchanged."""
        entry = self._entries.setdefault(key, _Entry())
        entry.users += 1
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    await entry.lock.acquire()
            except TimeoutError as exc:
                if on_timeout is None:
                    raise
                raise on_timeout() from exc
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0:
                self._entries.pop(key, None)
