"""Background activity of busy pools: VM and host metrics, SR rescans, XAPI tasks and messages coming and going.

Real XO sends an ``all`` notification for every change in every connected pool, so a client waiting for
one object sees a storm of others (XO-API §6). Noise changes the truth like any XAPI event (it reaches
the cache after the lag) and never touches what the driver relies on: power states, containers, VBD
links, SR and VDI sizes and usages, current operations. An event costs O(1) whatever the inventory's size.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable

from shared.logging import get_logger

from . import shapes
from .model import ObjectStore
from .shapes import XoObject

log = get_logger(__name__)
MAX_LIVE_TASKS = 8
MAX_LIVE_MESSAGES = 20
TASK_NAMES = ("Async.VM.get_records", "Async.host.call_plugin", "Async.SR.scan", "Async.VM.snapshot")
MESSAGE_NAMES = ("VM_STARTED", "HOST_CLOCK_SKEW_DETECTED", "ALARM", "VM_SNAPSHOTTED")


class Noise:
    """Emits ``events_per_s`` unrelated changes per second on average (Poisson arrivals); 0 = off."""

    def __init__(self, store: ObjectStore, events_per_s: float, rng: random.Random) -> None:
        if events_per_s < 0:
            raise ValueError("noise events per second must be >= 0")
        self.store = store
        self.events_per_s = events_per_s
        self.emitted = 0
        self._rng = rng
        self._tasks: deque[tuple[str, int]] = deque()  # (task id, steps done)
        self._messages: deque[str] = deque()
        self._runner: asyncio.Task[None] | None = None
        self._ids: dict[str, list[str]] = {}  # type -> ids to pick from, rebuilt when the type's count changed
        self._kinds: list[tuple[Callable[[], bool], float]] = [
            (self._vm_metrics, 0.35), (self._host_metrics, 0.15), (self._sr_rescan, 0.10),
            (self._task_step, 0.20), (self._message_step, 0.20),
        ]

    def start(self) -> None:
        """Start emitting (no-op when the rate is 0 or it already runs)."""
        if self.events_per_s > 0 and self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="xo-sim-noise")

    async def _run(self) -> None:
        while True:
            # Simulated background activity arriving at random, not synchronisation.
            await asyncio.sleep(self._rng.expovariate(self.events_per_s))
            self.emit_one()

    def emit_one(self) -> None:
        """Make one background change (skipped silently when the topology has nothing to change)."""
        functions, weights = zip(*self._kinds, strict=True)
        change = self._rng.choices(functions, weights)[0]
        if change():
            self.emitted += 1

    def forget(self) -> None:
        """Drop the bookkeeping of live tasks and messages (after the store was cleared)."""
        self._tasks.clear()
        self._messages.clear()
        self._ids.clear()

    def _pick(self, *types: str) -> XoObject | None:
        """A random object of one of ``types`` (weighted by count), without copying the store's lists."""
        ids = [self._ids_of(obj_type) for obj_type in types]
        total = sum(map(len, ids))
        if not total:
            return None
        index = self._rng.randrange(total)
        for obj_type, candidates in zip(types, ids, strict=True):
            if index < len(candidates):
                obj = self.store.find(candidates[index])
                if obj is None or obj["type"] != obj_type:  # gone since the list was built
                    self._ids.pop(obj_type, None)
                    return None
                return obj
            index -= len(candidates)
        return None

    def _ids_of(self, obj_type: str) -> list[str]:
        cached = self._ids.get(obj_type)
        live = self.store.of_type(obj_type)
        if cached is None or len(cached) != len(live):
            cached = self._ids[obj_type] = [obj["id"] for obj in live]
        return cached

    async def close(self) -> None:
        """Stop emitting and wait for the emitter to end."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    # -- kinds of change -----------------------------------------------------------------------------
    def _vm_metrics(self) -> bool:
        vm = self._pick("VM")
        if vm is None:
            return False
        memory = {**vm["memory"], "usage": self._rng.randrange(vm["memory"]["size"] // 8, vm["memory"]["size"])}
        changes: dict[str, object] = {"memory": memory}
        if vm["power_state"] == "Running":
            address = f"10.{self._rng.randrange(256)}.{self._rng.randrange(256)}.{self._rng.randrange(1, 255)}"
            changes |= {"mainIpAddress": address, "addresses": {"0/ipv4/0": address}}
        self.store.update(vm["id"], changes)
        return True

    def _host_metrics(self) -> bool:
        host = self._pick("host")
        if host is None:
            return False
        size = host["memory"]["size"]
        self.store.update(host["id"], {"memory": {"size": size, "usage": self._rng.randrange(size // 16, size // 2)}})
        return True

    def _sr_rescan(self) -> bool:
        # An SR record changes in fields XO does not show (a scan): XO rebuilds the object and sends it again.
        sr = self._pick("SR")
        if sr is None:
            return False
        self.store.update(sr["id"], {})
        return True

    def _task_step(self) -> bool:
        while self._tasks and self._tasks[0][0] not in self.store:
            self._tasks.popleft()
        if self._tasks and (len(self._tasks) >= MAX_LIVE_TASKS or self._rng.random() < 0.7):
            task_id, steps = self._tasks.popleft()
            if steps < 2:
                status = "pending" if steps == 0 else "success"
                self.store.update(task_id, {"progress": 0.5 * (steps + 1), "status": status})
                self._tasks.append((task_id, steps + 1))
            else:
                self.store.remove(task_id)
            return True
        pool = self._pick("pool")
        if pool is None:
            return False
        task = shapes.task(shapes.new_uuid(), pool["id"], name_label=self._rng.choice(TASK_NAMES),
                           host_id=pool["master"])
        self.store.add(task)
        self._tasks.append((task["id"], 0))
        return True

    def _message_step(self) -> bool:
        if self._messages and (len(self._messages) >= MAX_LIVE_MESSAGES or self._rng.random() < 0.4):
            message_id = self._messages.popleft()
            if message_id in self.store:
                self.store.remove(message_id)
                return True
        subject = self._pick("VM", "host")
        if subject is None:
            return False
        name = self._rng.choice(MESSAGE_NAMES)
        message = shapes.message(shapes.new_uuid(), subject["$pool"], name=name, body=f"{name} (simulated)",
                                 object_id=subject["id"])
        self.store.add(message)
        self._messages.append(message["id"])
        return True
