"""VDI migration as XO's ``Xapi#moveVdi`` does it: a new VDI uuid every time.

Detached VDI: VDI.copy to the target SR (both VDIs visible, same names), then the source's VBDs are
recreated on the copy and the source destroyed. VDI attached to a running VM: live storage migration,
the VBDs follow (same VBD, still plugged). Migrations run in server-owned tasks, so a caller that goes
away does not stop them; stop() cancels them and rolls the target back.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from shared.logging import get_logger

from .errors import XapiError, other_operation_in_progress
from .shapes import XoObject, opaque_ref
from .stats import Stats
from .xapi import Xapi

log = get_logger(__name__)


@dataclass
class _Job:
    source: XoObject
    target_id: str
    target_sr: str
    pool_id: str
    task_ref: str
    is_live: bool
    committed: bool = False
    result: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Migrator:
    """Runs VDI migrations with a per-pool cap on concurrent storage migrations."""

    def __init__(self, xapi: Xapi, stats: Stats, *, rate_bps: int, max_per_pool: int) -> None:
        self.xapi = xapi
        self.store = xapi.store
        self.stats = stats
        self.rate_bps = rate_bps
        self.max_per_pool = max_per_pool
        self._active: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        """Number of migrations in progress."""
        return sum(self._active.values())

    async def migrate(self, vdi_id: str, sr_id: str) -> str:
        """Move a VDI to an SR and return the new VDI uuid (the same uuid when already there).

        Raises OTHER_OPERATION_IN_PROGRESS when the VDI is busy, TOO_MANY_STORAGE_MIGRATES above the
        cap, SR_BACKEND_FAILURE_44 when the target is full, HANDLE_INVALID for an SR of another pool,
        VM_REQUIRES_SR when a running VM using the VDI cannot see the target SR.
        """
        vdi = self.store.get(vdi_id, "VDI")
        sr = self.store.get(sr_id, "SR")
        if vdi["$SR"] == sr_id:
            return vdi_id
        job = self._prepare(vdi, sr)
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(job.result)

    def _prepare(self, vdi: XoObject, sr: XoObject) -> _Job:
        self.xapi.ensure_idle(vdi)
        if self.xapi.has_vbd_in_flight(vdi):
            raise other_operation_in_progress("VDI", vdi["_xapiRef"])
        if sr["$pool"] != vdi["$pool"]:
            raise XapiError("HANDLE_INVALID", ["SR", sr["_xapiRef"]], method="VDI.pool_migrate")
        live_vms = [vm for vbd in self.xapi.vbds_of(vdi) if vbd["attached"]
                    if (vm := self.store.get(vbd["VM"], "VM"))["power_state"] == "Running"]
        for vm in live_vms:
            if not self.xapi.can_see(self.xapi.host_of(vm), sr):
                raise XapiError("VM_REQUIRES_SR", [vm["_xapiRef"], sr["_xapiRef"]], method="VDI.pool_migrate")
        pool_id = vdi["$pool"]
        if self._active[pool_id] >= self.max_per_pool:
            raise XapiError("TOO_MANY_STORAGE_MIGRATES", [str(self._active[pool_id])], method="VDI.pool_migrate")
        task_ref = opaque_ref()
        is_live = bool(live_vms)
        with self.store.batch():
            target = self.xapi.add_vdi_record(
                sr["id"], name_label=vdi["name_label"], name_description=vdi["name_description"],
                size=vdi["size"], tags=vdi["tags"], other_config=vdi["other_config"],
            )
            source = self.store.update(vdi["id"], {"current_operations": {task_ref: "mirror" if is_live else "copy"}})
        self.xapi.lock(target["id"])
        self._active[pool_id] += 1
        log.debug("migration_started", vdi=vdi["id"], target=target["id"], sr_to=sr["id"], live=is_live)
        return _Job(source, target["id"], sr["id"], pool_id, task_ref, is_live)

    async def _run(self, job: _Job) -> None:
        job.result.add_done_callback(_observe)
        try:
            if job.is_live:
                await self._live(job)
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
            await self._roll_back(job)
            job.result.set_exception(exc)
        else:
            job.result.set_result(job.target_id)
            self.stats.migrations[job.source["name_label"]] += 1
            log.debug("migration_finished", vdi=job.source["id"], target=job.target_id, live=job.is_live)
        finally:
            self._active[job.pool_id] -= 1
            self.xapi.unlock(job.target_id)

    def _duration_s(self, size_bytes: int) -> float:
        return size_bytes / self.rate_bps if self.rate_bps > 0 else 0.0

    async def _copy(self, job: _Job) -> None:
        source = job.source
        data = self.xapi.data
        if data is not None:
            await data.copy((source["$SR"], source["id"]), (job.target_sr, job.target_id), self.rate_bps)
        else:
            await asyncio.sleep(self._duration_s(source["size"]))  # simulated copy time
        with self.store.batch():
            for vbd in self.xapi.vbds_of(self.store.get(source["id"])):
                self.xapi.remove_vbd_record(vbd["id"])
                self.xapi.add_vbd_record(vbd["VM"], job.target_id, position=vbd["position"],
                                         bootable=vbd["bootable"], read_only=vbd["read_only"])
            self.xapi.remove_vdi_record(source["id"])
        job.committed = True
        self.stats.copy_migrations += 1
        if data is not None:
            await data.delete(source["$SR"], source["id"])

    async def _live(self, job: _Job) -> None:
        source = job.source
        data = self.xapi.data
        size = data.allocated_bytes(source["$SR"], source["id"]) if data is not None else source["size"]
        await asyncio.sleep(self._duration_s(size))  # simulated mirror time
        # From here on nothing awaits: the file rename and the records change together or not at all.
        if data is not None:
            data.move_now((source["$SR"], source["id"]), (job.target_sr, job.target_id))
        with self.store.batch():
            current = self.store.get(source["id"])
            for vbd_id in current["$VBDs"]:
                self.store.update(vbd_id, {"VDI": job.target_id})
            self.store.update(job.target_id, {"$VBDs": list(current["$VBDs"])})
            self.xapi.remove_vdi_record(source["id"])
        job.committed = True
        self.stats.live_migrations += 1

    async def _roll_back(self, job: _Job) -> None:
        with self.store.batch():
            if job.target_id in self.store:
                self.xapi.remove_vdi_record(job.target_id)
            if job.source["id"] in self.store:
                self.store.update(job.source["id"], {"current_operations": {}})
        if self.xapi.data is not None:
            await self.xapi.data.delete(job.target_sr, job.target_id)

    async def close(self) -> None:
        """Cancel running migrations (they roll back) and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _observe(future: asyncio.Future[str]) -> None:
    # The caller may be gone (socket closed); mark the outcome as retrieved either way.
    if not future.cancelled():
        future.exception()
