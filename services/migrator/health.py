"""Liveness and readiness of xo-csi-migrator over HTTP: ``GET /livez`` and ``GET /readyz``, 200 or 503 with a
small JSON body. Liveness = the consume loop ticked within ``liveness_timeout_s`` (a wedged event loop or a
dead loop fails it: restart). Readiness = every check (RabbitMQ connected, Redis PING, XO ping) passes within
``probe_timeout_s``. Nothing else lives here.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping

from aiohttp import web

from shared.health import Check, http_answer, run_checks
from shared.logging import get_logger

log = get_logger(__name__)


class HealthServer:
    """Serves the probes on ``host:port`` (port 0 picks a free one: see ``port`` after ``start()``)."""

    def __init__(self, *, loop_age_s: Callable[[], float], checks: Mapping[str, Check], liveness_timeout_s: float,
                 probe_timeout_s: float) -> None:
        self._loop_age_s = loop_age_s
        self._checks = dict(checks)
        self._liveness_timeout_s = liveness_timeout_s
        self._probe_timeout_s = probe_timeout_s
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.create_server((host, port))  # our own socket, so that the bound port is known
        try:
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            await self.close()
            raise
        self.port = sock.getsockname()[1]
        log.info("health_server_started", host=host, port=self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def liveness(self) -> tuple[bool, dict[str, object]]:
        age_s = self._loop_age_s()
        return age_s < self._liveness_timeout_s, {"consume_loop_age_s": round(age_s, 3)}

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        return await run_checks(self._checks, self._probe_timeout_s)

    async def _livez(self, _request: web.Request) -> web.Response:
        return http_answer(*await self.liveness())

    async def _readyz(self, _request: web.Request) -> web.Response:
        return http_answer(*await self.readiness())
