"""Polling waits: wait for a condition with a deadline instead of sleeping a fixed time (tests, demo, soak).

`eventually` is for async tests; `wait_until` for sync code outside an event loop (session fixtures).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")


class _Attempts:
    """What `eventually` and `wait_until` keep between calls of the predicate: how many, the last result or
    assertion, and the deadline (on the clock ``now``)."""

    def __init__(self, predicate: Callable[[], object], description: str | None, timeout_s: float,
                 now: Callable[[], float]) -> None:
        self.what = description or str(getattr(predicate, "__qualname__", repr(predicate)))
        self.timeout_s, self.now = timeout_s, now
        self.deadline = now() + timeout_s
        self.count = 0
        self.last_result: object = None
        self.last_error: AssertionError | None = None

    def met(self, result: object) -> bool:
        """Whether ``result`` is truthy; if not, it is the last result."""
        if not result:
            self.last_result, self.last_error = result, None
        return bool(result)

    def pause_s(self, interval_s: float) -> float:
        """How long to sleep before the next call; raises the timeout AssertionError once the deadline passed."""
        remaining_s = self.deadline - self.now()
        if remaining_s <= 0:
            raise self.timeout_error(self.last_result, self.last_error)
        return min(interval_s, remaining_s)

    def timeout_error(self, last_result: object, last_error: AssertionError | None) -> AssertionError:
        detail = f"last assertion: {last_error}" if last_error is not None else f"last result: {last_result!r}"
        return AssertionError(
            f"condition not met within {self.timeout_s} s ({self.count} attempts): {self.what}; {detail}")


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T]], timeout_s: float, interval_s: float = ..., *, description: str | None = ...
) -> T: ...


@overload
async def eventually(
    predicate: Callable[[], T], timeout_s: float, interval_s: float = ..., *, description: str | None = ...
) -> T: ...


async def eventually(
    predicate: Callable[[], object],
    timeout_s: float,
    interval_s: float = 0.01,
    *,
    description: str | None = None,
) -> object:
    """Call `predicate` (sync or async) every `interval_s` until it returns a truthy value, and return that value.

    An AssertionError raised by the predicate means "not yet" (so a predicate may use plain asserts); any other
    exception propagates at once. An async predicate still running at the deadline is cancelled.
    Raises AssertionError naming the predicate and its last result or assertion once `timeout_s` has passed.
    """
    loop = asyncio.get_running_loop()
    attempts = _Attempts(predicate, description, timeout_s, loop.time)
    while True:
        attempts.count += 1
        try:
            result = predicate()
            if inspect.isawaitable(result):
                async with asyncio.timeout_at(attempts.deadline):
                    result = await result
        except AssertionError as exc:
            attempts.last_error = exc
        except TimeoutError as exc:
            if loop.time() < attempts.deadline:
                raise
            raise attempts.timeout_error("<still running at the deadline>", None) from exc
        else:
            if attempts.met(result):
                return result
        await asyncio.sleep(attempts.pause_s(interval_s))


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.1,
    *,
    description: str | None = None,
) -> T:
    """Blocking twin of `eventually` for sync code that runs outside any event loop (e.g. session fixtures).

    Never call it from a coroutine: it blocks the thread.
    """
    attempts = _Attempts(predicate, description, timeout_s, time.monotonic)
    while True:
        attempts.count += 1
        try:
            result = predicate()
        except AssertionError as exc:
            attempts.last_error = exc
        else:
            if attempts.met(result):
                return result
        time.sleep(attempts.pause_s(interval_s))
