"""Readiness checks shared by the services' probe endpoints: run named checks concurrently, each bounded, and
report which failed. The migrator serves them on its health port, the CSI controller on its metrics port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from shared import broker

Check = Callable[[], Awaitable[object]]
Report = tuple[bool, dict[str, object]]


async def run_checks(checks: Mapping[str, Check], timeout_s: float) -> Report:
    """(every check passed, name -> "ok" or why not). A check fails by raising or outliving ``timeout_s``."""
    names = list(checks)
    results = await asyncio.gather(*(_run(checks[name], timeout_s) for name in names))
    return all(result == "ok" for result in results), dict(zip(names, results, strict=True))


async def _run(check: Check, timeout_s: float) -> str:
    try:
        async with asyncio.timeout(timeout_s):
            await check()
    except TimeoutError:
        return f"timed out after {timeout_s:g} s"
    except Exception as exc:  # a probe reports any failure of its check; nothing propagates to the HTTP server
        return f"{type(exc).__name__}: {exc}"[:200]
    return "ok"


async def connected(publisher: broker.Publisher) -> None:
    """The RabbitMQ check: raises while the robust connection is down (it reconnects on its own)."""
    if not publisher.is_connected:
        raise ConnectionError("not connected to RabbitMQ (reconnecting)")


def http_answer(ok: bool, report: Mapping[str, object]) -> web.Response:
    """200 or 503 with ``{"ok": ..., <check>: "ok" | why}`` as JSON, for /livez and /readyz."""
    return web.Response(status=200 if ok else 503, content_type="application/json",
                        text=json.dumps({"ok": ok, **report}))
