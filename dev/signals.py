"""SIGTERM and SIGHUP stop a dev command (the demo, the benchmarks, the soak) as Ctrl-C does.

Python's default for SIGTERM and SIGHUP ends the process at once, with no ``finally`` run: the stack's services and
brokers, started in sessions of their own, would go on running (a RabbitMQ node, Redis, the simulator and the
migrators left busy on a CI runner after its timeout, or under the next benchmark). With these handlers the main
task is cancelled instead, so the stack's exit stops everything it started. Once only: a second signal must not cut
that cleanup short (SIGKILL is the way to abandon it).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _say(sig: signal.Signals) -> None:
    print(f"{sig.name}: stopping everything this command started…", file=sys.stderr, flush=True)


def stop_on_signals(announce: Callable[[signal.Signals], None] = _say) -> None:
    """From the main task: SIGTERM or SIGHUP cancels it (after ``announce(signal)``); later ones are ignored."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def stop(sig: signal.Signals) -> None:
        announce(sig)
        for other in STOP_SIGNALS:
            loop.add_signal_handler(other, lambda: None)
        main_task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)


def run(main: Coroutine[Any, Any, T]) -> T | int:
    """``asyncio.run(main)``, stopped by SIGTERM or SIGHUP as by Ctrl-C: ``main`` is cancelled and its cleanup runs.
    Returns what ``main`` returns, 130 after Ctrl-C, 128 + SIGTERM after a stop signal."""

    async def guarded() -> T:
        stop_on_signals()
        return await main

    try:
        return asyncio.run(guarded())
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except asyncio.CancelledError:
        return 128 + signal.SIGTERM
