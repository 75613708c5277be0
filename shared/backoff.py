"""Capped exponential backoff: the one helper behind every retry loop and capped poll of the project (STYLE §5),
and ``retrying`` for calls retried until they succeed. Sleeping here is backoff, never synchronisation.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays ``start_s``, ``2 * start_s``, ``4 * start_s`` ... capped at ``cap_s``. With ``jitter`` each delay d is
    drawn uniformly from [d/2, d], so that waiters that collided do not retry in lockstep."""

    start_s: float
    cap_s: float
    jitter: bool = True

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay after the ``attempt``-th failure (0 = the first)."""
        delay_s = min(self.start_s * 2.0 ** max(attempt, 0), self.cap_s)
        return delay_s * (rng or random).uniform(0.5, 1.0) if self.jitter else delay_s

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The endless sequence of delays, from the first."""
        attempt = 0
        while True:
            yield self.delay_s(attempt, rng)
            attempt += 1


async def retrying(call: Callable[[int], Awaitable[T]], *, backoff: Backoff,
                   retry_if: Callable[[Exception], bool], give_up_after_s: float | None = None,
                   on_retry: Callable[[Exception], None] | None = None) -> T:
    """``await call(attempt)`` (attempt 0, 1, ...) until it returns, sleeping ``backoff`` between tries.

    An exception ``retry_if`` refuses is raised at once; an accepted one is raised once ``give_up_after_s`` has
    passed since the first try (None: never gives up). ``on_retry`` sees each exception that is retried.
    """
    started = time.monotonic()
    for attempt, delay_s in enumerate(backoff.delays()):
        try:
            return await call(attempt)
        except Exception as exc:
            if not retry_if(exc) or (give_up_after_s is not None and time.monotonic() - started > give_up_after_s):
                raise
            if on_retry is not None:
                on_retry(exc)
        await asyncio.sleep(delay_s)
    raise AssertionError("unreachable: the delays never end")
