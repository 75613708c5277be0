"""The migration gate's own rules, with fakes for the broker and Redis sides (those are covered for real in
tests/integration/test_migration_gate.py): a cancelled publish stays cancelled, even when cleaning up fails, and an
interrupted enqueue leaves no unpublished job behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from services.csi_frontend.attach import NodePlace
from services.csi_frontend.disks import Disk
from services.csi_frontend.migration_gate import QueueMigrationGate
from shared import vdi_metadata
from shared.errors import BackendUnavailable, OperationPending
from shared.jobs import JobRecord
from shared.messages import MigrationFinished, MigrationRequested, utc_now
from shared.volume_id import by_name
from shared.xo.models import Vdi, Vm


class NoEvents:
    @contextlib.asynccontextmanager
    async def waiting(self, disk_name: str) -> AsyncIterator[asyncio.Queue[MigrationFinished]]:
        yield asyncio.Queue()


class StuckPublisher:
    """A publish that waits for a confirm that never comes (until cancelled)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def request(self, request: MigrationRequested) -> None:
        self.entered.set()
        await asyncio.Event().wait()


class RedisGoneAfterCreate:
    """The job record is created, then Redis goes away: abandoning it fails."""

    def __init__(self) -> None:
        self.abandoned: list[str] = []

    async def create_or_join(self, request: MigrationRequested) -> tuple[JobRecord, bool]:
        record = JobRecord(job_id=request.job_id, disk_name=request.disk_name, target_host=request.host_id,
                           state="queued", created_at=utc_now(), request=request)
        return record, True

    async def abandon(self, disk_name: str, job_id: str) -> None:
        self.abandoned.append(job_id)
        raise BackendUnavailable("Redis is unreachable while updating the job of disk csi-vol1")


def _disk() -> Disk:
    description = 'csi:info: {"migrating":{},"srsWithTag":"k8s-migrating"}'
    vdi = Vdi.model_validate({"id": "vdi-1", "type": "VDI", "name_label": "csi-vol1", "name_description": description,
                              "$SR": "sr-a1"})
    return Disk(by_name("vol1"), vdi, vdi_metadata.parse(description))


async def test_a_publish_cancelled_while_the_request_is_sent_stays_cancelled_when_abandoning_fails() -> None:
    publisher, jobs = StuckPublisher(), RedisGoneAfterCreate()
    gate = QueueMigrationGate(NoEvents(), publisher, jobs, disks=None, inventory=None)  # type: ignore[arg-type]
    place = NodePlace(Vm.model_validate({"id": "vm-a2", "type": "VM"}), "host-a2", "pool-a")
    call = asyncio.create_task(gate.migrate_for(_disk(), place, deadline_s=60))
    await asyncio.wait_for(publisher.entered.wait(), 5)

    call.cancel()
    await asyncio.wait({call}, timeout=5)

    assert call.cancelled()  # not BackendUnavailable from the cleanup: the caller asked to stop, and it did
    assert len(jobs.abandoned) == 1


class CreatedThenSlow(RedisGoneAfterCreate):
    """Redis stores the new record, but its answer comes too late for the caller's deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, str] = {}

    async def create_or_join(self, request: MigrationRequested) -> tuple[JobRecord, bool]:
        self.records[request.disk_name] = request.job_id
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def abandon(self, disk_name: str, job_id: str) -> None:
        self.abandoned.append(job_id)
        if self.records.get(disk_name) == job_id:
            del self.records[disk_name]


async def test_a_deadline_that_passes_while_the_job_is_created_leaves_no_record_behind() -> None:
    # A record created but never published would be joined by every later publish, and no worker would ever
    # run it: it must go, so that the attacher's retry creates and publishes the job anew.
    jobs = CreatedThenSlow()
    gate = QueueMigrationGate(NoEvents(), StuckPublisher(), jobs, disks=None, inventory=None,  # type: ignore[arg-type]
                              margin_s=0)
    place = NodePlace(Vm.model_validate({"id": "vm-a2", "type": "VM"}), "host-a2", "pool-a")
    with pytest.raises(OperationPending, match="still running"):
        await gate.migrate_for(_disk(), place, deadline_s=0.05)
    assert len(jobs.abandoned) == 1 and jobs.records == {}
