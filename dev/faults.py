"""The soak's fault schedule: one fault every ``interval_s`` (±50 %), cycling through the kinds in a seeded
shuffled order so that every kind is injected once per cycle."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx

from dev.stack import Stack
from dev.wait import eventually

KINDS = ("kill_migrator", "kill_controller", "kill_node", "rabbitmq_restart", "redis_restart", "xo_errors",
         "xo_latency", "xo_drop_socket", "pool_disconnect")
_XO_ERRORS = (
    {"method": "vdi.migrate", "xapi": "TOO_MANY_STORAGE_MIGRATES", "count": 2},
    {"method": "vdi.migrate", "xapi": "OTHER_OPERATION_IN_PROGRESS", "xapi_params": ["VDI", "OpaqueRef:x"],
     "count": 1},
    {"method": "vm.attachDisk", "xapi": "OTHER_OPERATION_IN_PROGRESS", "xapi_params": ["VM", "OpaqueRef:y"],
     "count": 2},
    {"method": "xo.getAllObjects", "error": {"code": 9, "message": "server unreachable"}, "count": 3},
    {"method": "vbd.delete", "xapi": "OTHER_OPERATION_IN_PROGRESS", "xapi_params": ["VBD", "OpaqueRef:z"],
     "count": 1},
)
_DROP_METHODS = ("vdi.migrate", "vm.attachDisk", "xo.getAllObjects", "vdi.set", "vbd.delete")


class Schedule:
    """Runs faults until ``stop``; counts them in ``counts``."""

    def __init__(self, stack: Stack, admin: httpx.AsyncClient, rng: random.Random, counts: Counter[str], *,
                 interval_s: float, kinds: list[str]) -> None:
        self.stack, self.admin, self.rng, self.counts = stack, admin, rng, counts
        self.interval_s, self.kinds = interval_s, kinds

    async def run(self, stop: asyncio.Event, after_each: Callable[[], Awaitable[None]]) -> None:
        order: list[str] = []
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.interval_s * self.rng.uniform(0.5, 1.5)):
                    await stop.wait()
                return
            except TimeoutError:
                pass
            if not order:
                order = self.rng.sample(self.kinds, len(self.kinds))
            kind = order.pop()
            await getattr(self, kind)()
            self.counts[kind] += 1
            await after_each()

    async def clear(self) -> None:
        (await self.admin.delete("/_sim/faults")).raise_for_status()
        (await self.admin.put("/_sim/latency", json={"spec": ""})).raise_for_status()

    async def kill_migrator(self) -> None:
        names = sorted(n for n in self.stack.processes if n.startswith("migrator"))
        await self.stack.crash_and_restart(self.rng.choice(names))

    async def kill_controller(self) -> None:
        await self.stack.crash_and_restart("controller")

    async def kill_node(self) -> None:
        names = sorted(n for n in self.stack.processes if n.startswith("node-"))
        await self.stack.crash_and_restart(self.rng.choice(names))

    async def rabbitmq_restart(self) -> None:
        assert self.stack.rabbit is not None
        await asyncio.to_thread(self.stack.rabbit.restart)

    async def redis_restart(self) -> None:
        assert self.stack.redis is not None
        await asyncio.to_thread(self.stack.redis.restart, keep_data=True)

    async def xo_errors(self) -> None:
        (await self.admin.post("/_sim/faults", json=self.rng.choice(_XO_ERRORS))).raise_for_status()

    async def xo_latency(self) -> None:
        (await self.admin.put("/_sim/latency", json={"spec": "*=150"})).raise_for_status()
        await asyncio.sleep(self.interval_s / 2)  # the spike's length
        (await self.admin.put("/_sim/latency", json={"spec": ""})).raise_for_status()

    async def xo_drop_socket(self) -> None:
        rule = {"kind": "drop_socket", "method": self.rng.choice(_DROP_METHODS), "count": 1}
        (await self.admin.post("/_sim/faults", json=rule)).raise_for_status()

    async def pool_disconnect(self) -> None:
        """XO loses the soak's pool for half an interval (every object leaves its cache; calls on them answer "no
        such object"), then the pool returns; returns once it has."""
        (pool,) = [p["id"] for p in await self.stack.xo.get_objects({"type": "pool"})]
        rule = {"kind": "pool_disconnect", "pool": pool, "duration_s": self.interval_s / 2}
        (await self.admin.post("/_sim/faults", json=rule)).raise_for_status()

        async def back() -> bool:
            answer = await self.admin.get("/_sim/faults")
            answer.raise_for_status()
            return not answer.json()["disconnected_pools"]

        await eventually(back, self.interval_s * 2, 0.1, description="the pool back in XO")
