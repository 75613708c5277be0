"""The per-disk in-flight migration job record in Redis: create-or-join, worker progress, the outcome.

One JSON record per disk name (key from ``shared/locks.py``), always with a TTL. While a job is queued or
running, every requester (retries, concurrent publishes, other frontend replicas) joins it instead of
publishing again; a finished record is kept ``result_ttl_s`` so a late waiter still learns the outcome.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, ValidationError
from redis.exceptions import RedisError

from shared.errors import BackendFailure, BackendUnavailable
from shared.locks import disk_job_key
from shared.messages import MigrationFinished, utc_now

JobState = Literal["queued", "running", "succeeded", "failed"]
ACTIVE_STATES: frozenset[str] = frozenset({"queued", "running"})

# KEYS[1] record key; ARGV[1] new record, ARGV[2] ttl ms. Returns the active record found, or nil once set.
_CREATE_OR_JOIN = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and (record.state == 'queued' or record.state == 'running') then return current end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# KEYS[1] record key; ARGV[1] job id; ARGV[2] new record ('' deletes); ARGV[3] ttl ms. 1 when the job matched.
_REPLACE_IF_JOB = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local ok, record = pcall(cjson.decode, current)
if not ok or record.job_id ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


class JobRecord(BaseModel):
    """What Redis knows about a disk's current (or last) migration job."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str
    disk_name: str
    target_host: str
    state: JobState
    created_at: datetime
    heartbeat_at: datetime | None = None
    worker: str | None = None
    result: MigrationFinished | None = None

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES


class JobStore:
    """Job records under ``prefix``. Every method is one bounded Redis round trip (the client's socket
    timeout); Redis errors become BackendUnavailable. Updates apply only while the record is still this job's."""

    def __init__(self, redis: aioredis.Redis, prefix: str, *, active_ttl_s: float, result_ttl_s: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._active_ttl_ms = int(active_ttl_s * 1000)
        self._result_ttl_ms = int(result_ttl_s * 1000)

    def key(self, disk_name: str) -> str:
        return disk_job_key(self._prefix, disk_name)

    async def create_or_join(self, disk_name: str, job_id: str, target_host: str) -> tuple[JobRecord, bool]:
        """The disk's active job, or a new queued one with ``job_id``; the flag says whether it was created."""
        record = JobRecord(job_id=job_id, disk_name=disk_name, target_host=target_host, state="queued",
                           created_at=utc_now())
        found = await self._call(_CREATE_OR_JOIN, disk_name, record.model_dump_json(), self._active_ttl_ms)
        if found is None:
            return record, True
        if not isinstance(found, bytes | str):
            raise BackendFailure(f"Redis answered {type(found).__name__} for the job of disk {disk_name}")
        return _decode(found), False

    async def get(self, disk_name: str) -> JobRecord | None:
        try:
            raw = await self._redis.get(self.key(disk_name))
        except RedisError as exc:
            raise BackendUnavailable(f"Redis is unreachable while reading the job of disk {disk_name}") from exc
        return _decode(raw) if raw is not None else None

    async def running(self, record: JobRecord, worker: str) -> JobRecord | None:
        """Mark the job running (also the worker heartbeat: call it again to refresh); None if it is gone."""
        updated = record.model_copy(update={"state": "running", "worker": worker, "heartbeat_at": utc_now()})
        return updated if await self._replace(updated, self._active_ttl_ms) else None

    async def finish(self, record: JobRecord, result: MigrationFinished) -> bool:
        """Store the outcome for ``result_ttl_s``; False when the record no longer names this job."""
        updated = record.model_copy(update={"state": result.outcome, "result": result, "heartbeat_at": utc_now()})
        return await self._replace(updated, self._result_ttl_ms)

    async def abandon(self, disk_name: str, job_id: str) -> None:
        """Delete the record if it is still ``job_id`` (its request could not be published)."""
        await self._call(_REPLACE_IF_JOB, disk_name, job_id, "", 0)

    async def _replace(self, record: JobRecord, ttl_ms: int) -> bool:
        return bool(await self._call(_REPLACE_IF_JOB, record.disk_name, record.job_id, record.model_dump_json(),
                                     ttl_ms))

    async def _call(self, script: str, disk_name: str, *args: str | int) -> object:
        try:
            return await self._redis.eval(script, 1, self.key(disk_name), *args)
        except RedisError as exc:
            raise BackendUnavailable(f"Redis is unreachable while updating the job of disk {disk_name}") from exc


def _decode(raw: bytes | str) -> JobRecord:
    try:
        return JobRecord.model_validate_json(raw)
    except ValidationError as exc:
        raise BackendFailure("the job record in Redis is unreadable; delete the key to reset it") from exc
