"""VDI migration as XO's ``Xapi#moveVdi`` does it: a new VDI uuid every time, then a cache barrier.

VDI attached to a running VM: live storage migration (``VDI.pool_migrate``), the VBDs follow (same VBD,
still plugged); XO retries it on TOO_MANY_STORAGE_MIGRATES (retry.py), so a caller sees that error only
after the cap stayed full through every try. Detached VDI: ``VDI.copy`` to the target SR (no cap), then,
after a barrier, the source's VBDs are recreated on the copy and the source destroyed; those last steps
are not awaited by a barrier, so the cache may still show the source when the call returns. During
either, source and target both show a current operation; a copy also has both plugged into a control domain
(control_domain.py), and a VDI XAPI streams (an export) is not migrated (OTHER_OPERATION_IN_PROGRESS). Migrations
run in server-owned tasks, so a caller that goes away does not stop them; close() cancels them and rolls back what
was not committed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shared.logging import get_logger

from . import control_domain
from .errors import XapiError, handle_invalid, other_operation_in_progress
from .retry import RetryPolicy, has_xapi_code
from .shapes import XoObject, opaque_ref
from .stats import Stats
from .xapi import Xapi

log = get_logger(__name__)
Barrier = Callable[[str], Awaitable[None]]
"""Waits until XO's cache shows every change so far of a pool (CacheMirror.barrier)."""


@dataclass
class _Job:
    source: XoObject
    target_id: str
    target_sr: str
    pool_id: str
    task_ref: str
    is_live: bool
    started: float = field(default_factory=lambda: asyncio.get_running_loop().time())  # XAPI began the task
    committed: bool = False
    result: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


async def _no_barrier(pool_id: str) -> None:
    return None


# The event loop's selector sleeps in whole ms (epoll rounds its timeout up), so a plain sleep ends up to 1 ms late,
# plus the wake-up: spent yielding instead, so that a copy takes size / rate as the benchmarks count it.
_PRECISE_S = 0.002


async def sleep_until(deadline: float) -> None:
    """Simulated work that ends at loop time ``deadline`` (within one step of the loop), not a synchronisation: the
    last ``_PRECISE_S`` yield to the loop (other calls go on) rather than sleep."""
    loop = asyncio.get_running_loop()
    if (coarse_s := deadline - loop.time() - _PRECISE_S) > 0:
        await asyncio.sleep(coarse_s)
    while loop.time() < deadline:
        await asyncio.sleep(0)


class Migrator:
    """Runs VDI migrations with a per-pool cap on concurrent live storage migrations."""

    def __init__(self, xapi: Xapi, stats: Stats, *, rate_bps: int, max_per_pool: int,
                 retry_delay_s: float = 1.0, barrier: Barrier = _no_barrier) -> None:
        self.xapi = xapi
        self.store = xapi.store
        self.stats = stats
        self.rate_bps = rate_bps
        self.max_per_pool = max_per_pool
        self.retry = RetryPolicy(has_xapi_code("TOO_MANY_STORAGE_MIGRATES"), retry_delay_s)
        self._barrier = barrier
        self._live: Counter[str] = Counter()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        """Number of migrations in progress (live and copy)."""
        return self._running

    async def migrate(self, vdi_handle: str, sr_handle: str) -> str:
        """Move a VDI to an SR and return the new VDI uuid (the same uuid when already there).

        Raises OTHER_OPERATION_IN_PROGRESS when the VDI is busy, TOO_MANY_STORAGE_MIGRATES when the live cap
        stays full through XO's retries, SR_BACKEND_FAILURE_44 when the target is full, HANDLE_INVALID for
        a VDI or SR XAPI does not know (another pool's SR included), VM_REQUIRES_SR when a running VM using
        the VDI cannot see the target SR.
        """
        vdi = self.xapi.record(vdi_handle, "VDI")
        sr = self.xapi.record(sr_handle, "SR")
        if vdi["$SR"] == sr["id"]:
            return str(vdi["id"])

        async def start() -> _Job:
            return self._prepare(vdi_handle, sr_handle)

        job = await self.retry.run(start)
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(job.result)

    def _prepare(self, vdi_handle: str, sr_handle: str) -> _Job:
        vdi = self.xapi.record(vdi_handle, "VDI")
        sr = self.xapi.record(sr_handle, "SR")
        self.xapi.ensure_idle(vdi)
        plugged = [vbd for vbd in self.xapi.vbds_of(vdi) if vbd["attached"]]
        if self.xapi.has_vbd_in_flight(vdi) or any(control_domain.is_control_domain_vbd(self.xapi, vbd)
                                                   for vbd in plugged):
            raise other_operation_in_progress("VDI", vdi["_xapiRef"])  # also while XAPI streams it (an export)
        if sr["$pool"] != vdi["$pool"]:
            raise handle_invalid("SR", sr["_xapiRef"])
        live_vms = [vm for vbd in plugged if (vm := self.xapi.record(vbd["VM"], "VM"))["power_state"] == "Running"]
        for vm in live_vms:
            if not self.xapi.can_see(self.xapi.host_of(vm), sr):
                raise XapiError("VM_REQUIRES_SR", [vm["_xapiRef"], sr["_xapiRef"]], method="VDI.pool_migrate")
        pool_id = vdi["$pool"]
        is_live = bool(live_vms)
        if is_live and self._live[pool_id] >= self.max_per_pool:
            raise XapiError("TOO_MANY_STORAGE_MIGRATES", [str(self._live[pool_id])], method="VDI.pool_migrate")
        task_ref = opaque_ref()
        operation = {task_ref: "mirror" if is_live else "copy"}
        with self.store.batch():
            target = self.xapi.add_vdi_record(
                sr["id"], name_label=vdi["name_label"], name_description=vdi["name_description"],
                size=vdi["size"], tags=vdi["tags"], other_config=vdi["other_config"],
                usage=self.xapi.accounting.copy_usage(vdi, sr),
            )
            self.store.update(target["id"], {"current_operations": operation})
            source = self.store.update(vdi["id"], {"current_operations": operation})
        self.xapi.lock(target["id"])
        self._running += 1
        if is_live:
            self._live[pool_id] += 1
        log.debug("migration_started", vdi=vdi["id"], target=target["id"], sr_to=sr["id"], live=is_live)
        return _Job(source, target["id"], sr["id"], pool_id, task_ref, is_live)

    async def _run(self, job: _Job) -> None:
        job.result.add_done_callback(_observe)
        try:
            if job.is_live:
                await self._mirror(job)
            else:
                await self._copy(job)
        except asyncio.CancelledError:
            if job.committed:
                job.result.set_result(job.target_id)
            else:
                await asyncio.shield(self._roll_back(job))
                job.result.set_exception(XapiError("TASK_CANCELLED", [job.task_ref], method="VDI.pool_migrate"))
            raise
        except Exception as exc:  # reported to the caller through job.result
            if not job.committed:
                await self._roll_back(job)
            job.result.set_exception(exc)
        else:
            job.result.set_result(job.target_id)
            self.stats.migrations[job.source["name_label"]] += 1
            log.debug("migration_finished", vdi=job.source["id"], target=job.target_id, live=job.is_live)
        finally:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        self._running -= 1
        if job.is_live:
            self._live[job.pool_id] -= 1
        self.xapi.unlock(job.target_id)

    def _duration_s(self, size_bytes: int) -> float:
        return size_bytes / self.rate_bps if self.rate_bps > 0 else 0.0

    async def _copy(self, job: _Job) -> None:
        source = job.source
        data = self.xapi.data
        # VDI.copy plugs both VDIs into a control domain (the source read-only) for the copy's duration
        with (control_domain.plugged(self.xapi, source["id"], read_only=True) as source_vbd,
              control_domain.plugged(self.xapi, job.target_id, read_only=False) as target_vbd):
            if data is not None:
                await data.copy((source["$SR"], source["id"]), (job.target_sr, job.target_id), self.rate_bps)
            else:
                await sleep_until(job.started + self._duration_s(source["size"]))  # simulated copy time
            with self.store.batch():  # VDI.copy returns: both VDIs idle and unplugged, the copy a VDI like any other
                for vbd_id in (source_vbd, target_vbd):
                    if vbd_id in self.store:
                        self.xapi.remove_vbd_record(vbd_id)
                self.store.update(job.target_id, {"current_operations": {}})
                if source["id"] in self.store:
                    self.store.update(source["id"], {"current_operations": {}})
        job.committed = True
        self.stats.copy_migrations += 1
        self.xapi.unlock(job.target_id)
        self.xapi.accounting.measure(job.target_id)
        await self._barrier(job.pool_id)
        if self._swap(job) and data is not None:
            await data.delete(source["$SR"], source["id"])

    def _swap(self, job: _Job) -> bool:
        """Recreate the source's VBDs on the copy and destroy the source; False when the source is gone."""
        source = self.store.find(job.source["id"])
        if source is None:
            return False  # destroyed meanwhile: XO's VDI destroy takes HANDLE_INVALID as done
        self.xapi.ensure_idle(source)  # it was idle (and usable) between VDI.copy and here
        vbds = self.xapi.vbds_of(source)
        for vbd in vbds:
            if vbd["attached"]:
                raise XapiError("OPERATION_NOT_ALLOWED", ["VBD is currently attached"], method="VBD.destroy")
        with self.store.batch():
            for vbd in vbds:
                self.xapi.remove_vbd_record(vbd["id"])
                self.xapi.add_vbd_record(vbd["VM"], job.target_id, position=vbd["position"],
                                         bootable=vbd["bootable"], read_only=vbd["read_only"])
            self.xapi.remove_vdi_record(source["id"])
        return True

    async def _mirror(self, job: _Job) -> None:
        source = job.source
        data = self.xapi.data
        size = data.allocated_bytes(source["$SR"], source["id"]) if data is not None else source["size"]
        await sleep_until(job.started + self._duration_s(size))  # simulated mirror time
        # From here on nothing awaits until committed: the file rename and the records change together.
        if data is not None:
            data.move_now((source["$SR"], source["id"]), (job.target_sr, job.target_id))
        with self.store.batch():
            current = self.store.get(source["id"])
            for vbd_id in current["$VBDs"]:
                self.store.update(vbd_id, {"VDI": job.target_id})
            self.store.update(job.target_id, {"$VBDs": list(current["$VBDs"]), "current_operations": {}})
            self.xapi.remove_vdi_record(source["id"])
        job.committed = True
        self.stats.live_migrations += 1
        await self._barrier(job.pool_id)

    async def _roll_back(self, job: _Job) -> None:
        with self.store.batch():
            if job.target_id in self.store:
                self.xapi.remove_vdi_record(job.target_id)
            if job.source["id"] in self.store:
                self.store.update(job.source["id"], {"current_operations": {}})
        if self.xapi.data is not None:
            await self.xapi.data.delete(job.target_sr, job.target_id)

    async def close(self) -> None:
        """Cancel running migrations (they roll back unless committed) and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _observe(future: asyncio.Future[str]) -> None:
    # The caller may be gone (socket closed); mark the outcome as retrieved either way.
    if not future.cancelled():
        future.exception()
