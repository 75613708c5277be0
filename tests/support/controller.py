"""The controller wired by ``build_frontend`` (controller mode, no brokers unless Redis is given) in the test's
process against an in-process simulator (harsh defaults: cache lag, notification noise): for the controller's
integration tests, which call its parts (provisioner, attacher, servicer) directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from services.csi_frontend.app import Frontend, build_frontend
from services.csi_frontend.controller import ControllerServicer
from services.csi_frontend.settings import FrontendSettings
from services.xo_simulator.server import SimulatorHandle, start_simulator
from shared.config import RedisSettings, XoSettings
from shared.xo.client import XoClient

SETTINGS: dict[str, Any] = {"mode": "controller", "node_id": "test-controller", "publish_margin_s": 1,
                            "device_wait_s": 10}


@dataclass
class Controller:
    sim: SimulatorHandle
    frontend: Frontend
    xo: XoClient  # a client of the test's own, as an operator or another driver would have

    @property
    def servicer(self) -> ControllerServicer:
        return next(s for s, _ in self.frontend.servicers if isinstance(s, ControllerServicer))

    def lose_pool(self, pool: str) -> None:
        """XO loses ``pool`` (as the ``pool_disconnect`` fault) until ``regain_pool``."""
        self.sim.simulator.outages.disconnect(pool, None)

    def regain_pool(self, pool: str) -> None:
        self.sim.simulator.outages.reconnect(pool)


class Context:
    """What a servicer reads of its gRPC context: the time left to the caller."""

    def __init__(self, remaining_s: float = 30.0) -> None:
        self.remaining_s = remaining_s

    def time_remaining(self) -> float:
        return self.remaining_s


@contextlib.asynccontextmanager
async def controller(topology: Any = "two-hosts", *, redis: RedisSettings | None = None,
                     settings: dict[str, Any] | None = None, **sim_options: Any) -> AsyncIterator[Controller]:
    sim = await start_simulator(topology, admin=True, **sim_options)
    xo_settings = XoSettings(url=sim.http_url, token=SecretStr("sim-token"), timeout_s=10)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(sim.stop)
        frontend = await build_frontend(stack, FrontendSettings(**{**SETTINGS, **(settings or {})}), xo_settings,
                                        redis=redis)
        xo = XoClient.from_settings(xo_settings)
        stack.push_async_callback(xo.close)
        yield Controller(sim, frontend, xo)
