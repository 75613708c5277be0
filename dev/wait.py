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


def _describe(predicate: Callable[[], object], description: str | None) -> str:
    return description or str(getattr(predicate, "__qualname__", repr(predicate)))


def _timeout_error(
    what: str, timeout_s: float, attempts: int, last_result: object, last_error: AssertionError | None
) -> AssertionError:
    detail = f"last assertion: {last_error}" if last_error is not None else f"last result: {last_result!r}"
    return AssertionError(f"condition not met within {timeout_s} s ({attempts} attempts): {what}; {detail}")


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
    deadline = loop.time() + timeout_s
    attempts, last_result, last_error = 0, None, None
    while True:
        attempts += 1
        try:
            result = predicate()
            if inspect.isawaitable(result):
                async with asyncio.timeout_at(deadline):
                    result = await result
        except AssertionError as exc:
            last_error = exc
        except TimeoutError as exc:
            if loop.time() < deadline:
                raise
            raise _timeout_error(
                _describe(predicate, description), timeout_s, attempts, "<still running at the deadline>", None
            ) from exc
        else:
            if result:
                return result
            last_result, last_error = result, None
        remaining_s = deadline - loop.time()
        if remaining_s <= 0:
            raise _timeout_error(_describe(predicate, description), timeout_s, attempts, last_result, last_error)
        await asyncio.sleep(min(interval_s, remaining_s))


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
    deadline = time.monotonic() + timeout_s
    attempts, last_result, last_error = 0, None, None
    while True:
        attempts += 1
        try:
            result = predicate()
        except AssertionError as exc:
            last_error = exc
        else:
            if result:
                return result
            last_result, last_error = result, None
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise _timeout_error(_describe(predicate, description), timeout_s, attempts, last_result, last_error)
        time.sleep(min(interval_s, remaining_s))
