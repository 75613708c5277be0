"""The reaper: every migrator looks, every ``reaper_interval_s``, for running jobs whose worker stopped
heartbeating (crashed, killed, cut off) and hands them back to the queue as attempt + 1, and for jobs still
``queued`` after ``queued_stale_after_s`` (a frontend that crashed between writing the record and publishing it:
no message will ever carry the job) and publishes their request again.

Each takeover is one Lua script comparing job id + the heartbeat seen, so exactly one reaper acts on a stale
job. The XO re-read in ``migrate.handle`` and the disk lock keep a reaped job from migrating twice; a queued job
whose first message was only slow (a backlog) gets a second delivery, which its claim drops as a duplicate while
the job runs, as finished once it ended, and as superseded once a newer job of the disk ended (shared/jobs.py: the
disk's last finished job outlives the records).
"""

from __future__ import annotations

import asyncio
import random

import structlog

from services.migrator.outcome import Outcomes
from services.migrator.settings import MigratorSettings
from shared import messages
from shared.errors import DomainError
from shared.jobs import JobRecord, JobStore
from shared.logging import get_logger
from shared.messages import FailureReason

log = get_logger(__name__)


def _age_s(record: JobRecord, now_ms: int) -> float:
    """Seconds since the record's last heartbeat; a record without one counts as infinitely old."""
    age_s = record.age_s(now_ms)
    return float("inf") if age_s is None else age_s


class Reaper:
    """Hands back stale running jobs; ``run()`` loops until cancelled, ``sweep()`` is one pass."""

    def __init__(self, jobs: JobStore, outcomes: Outcomes, settings: MigratorSettings) -> None:
        self._jobs = jobs
        self._outcomes = outcomes
        self._settings = settings

    async def run(self) -> None:
        """Sweep every ``reaper_interval_s`` (jittered, so replicas do not scan in lockstep). A failed sweep
        (Redis or RabbitMQ down) is logged and retried at the next interval."""
        while True:
            await asyncio.sleep(self._settings.reaper_interval_s * random.uniform(0.8, 1.2))
            try:
                await self.sweep()
            except DomainError as exc:
                log.warning("reaper_sweep_failed", error=exc.message)

    async def sweep(self) -> int:
        """One pass over the job records; returns how many stale jobs this worker took over."""
        now_ms = await self._jobs.now_ms()
        taken = 0
        for record in await self._jobs.records():
            if record.state == "running" and self._is_stale(record, now_ms):
                taken += await self._reap(record)
            elif record.state == "queued" and _age_s(record, now_ms) >= self._settings.queued_stale_after_s:
                taken += await self._republish(record)
        return taken

    def _is_stale(self, record: JobRecord, now_ms: int) -> bool:
        return _age_s(record, now_ms) >= self._settings.stale_after_s

    async def _republish(self, record: JobRecord) -> int:
        with structlog.contextvars.bound_contextvars(disk_name=record.disk_name, job_id=record.job_id):
            if record.request is None:
                return 0  # an older version's record: nothing to publish; it expires after its TTL
            mine = await self._jobs.touch_queued(record, stale_after_s=self._settings.queued_stale_after_s)
            if mine is None:
                return 0  # claimed meanwhile, or another reaper re-published it
            try:
                await self._outcomes.republish(mine)
            except DomainError as exc:
                log.warning("queued_job_republish_failed", error=exc.message, note="retried after queued_stale_after_s")
                return 0
            queued_s = ((mine.heartbeat_ms or 0) - (record.heartbeat_ms or 0)) / 1000
            log.warning("queued_job_republished", attempt=mine.attempt, untouched_s=round(queued_s, 1))
            return 1

    async def _reap(self, record: JobRecord) -> int:
        with structlog.contextvars.bound_contextvars(disk_name=record.disk_name, job_id=record.job_id):
            return await self._take(record)

    async def _take(self, record: JobRecord) -> int:
        mine = await self._jobs.take_over(record, self._settings.worker_name,
                                          stale_after_s=self._settings.stale_after_s)
        if mine is None:
            return 0  # it beat again meanwhile, or another reaper won
        silent_s = ((mine.heartbeat_ms or 0) - (record.heartbeat_ms or 0)) / 1000
        log.warning("job_reaped", previous_worker=record.worker, attempt=record.attempt,
                    heartbeat_age_s=round(silent_s, 1))
        lost = FailureReason(code=messages.WORKER_LOST, retryable=True,
                             message=f"worker {record.worker} stopped heartbeating the job")
        try:
            await self._outcomes.hand_back(mine, reason="reaped", error=lost)
        except DomainError as exc:
            # Still running under our claim with a heartbeat that goes stale again: the next sweep retries.
            log.warning("reap_deferred", error=exc.message)
        return 1
