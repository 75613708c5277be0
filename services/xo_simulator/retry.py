"""xo-server's own retries of XAPI calls (promise-toolbox ``pRetry``), which make callers wait before they see an error.

``VDI.pool_migrate`` is retried on TOO_MANY_STORAGE_MIGRATES (10 tries, 1 s apart: ``Xapi#moveVdi``) and
``VDI.destroy`` on VDI_IN_USE (10 tries, 5 s apart: ``vdiDestroyRetryWhenInUse``). The delays are knobs so
tests stay fast; the number of tries is XO's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import SimError

T = TypeVar("T")
XO_TRIES = 10


@dataclass(frozen=True)
class RetryPolicy:
    """``tries`` attempts, ``delay_s`` apart, while the error matches ``when``."""

    when: Callable[[SimError], bool]
    delay_s: float
    tries: int = XO_TRIES

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Call ``attempt`` until it succeeds, fails otherwise, or the tries are used up (last error raised)."""
        for number in range(1, self.tries + 1):
            try:
                return await attempt()
            except SimError as exc:
                if number == self.tries or not self.when(exc):
                    raise
            await asyncio.sleep(self.delay_s)  # XO's pDelay between tries: simulated waiting, not synchronisation
        raise AssertionError("unreachable: the last try returns or raises")


def has_xapi_code(code: str) -> Callable[[SimError], bool]:
    """A ``when`` for an XAPI error code (``TOO_MANY_STORAGE_MIGRATES``)."""
    return lambda exc: getattr(exc, "code", None) == code


def has_xo_code(code: int) -> Callable[[SimError], bool]:
    """A ``when`` for an XO error code (17 is XO's translation of VDI_IN_USE)."""
    return lambda exc: getattr(exc, "code", None) == code
