"""The per-disk job record in Redis (migrations and clones, shared/messages.py): create-or-join, a worker's claim,
heartbeat and hand-back, the reaper's takeover, the outcome. Every state change is one Lua script, so it is atomic
across replicas.

One JSON record per disk name (key from ``shared/keys.py``), always with a TTL. While a job is queued or
running, every requester joins it instead of publishing again; a finished record is kept ``result_ttl_s``.
A ``running`` record belongs to the claim token ``claim`` (new on every claim and takeover): a worker's
writes compare job id + claim, so a worker that lost its job (reaped, handed back) cannot overwrite the new
owner's state. ``heartbeat_ms`` is Redis server time (``TIME``), so staleness never depends on pod clocks.
A finished job also leaves the disk's *last job* (a second key, ``tombstone_ttl_s``): the claim drops a late
request older than it even once the record expired or belongs to another job. The state machine is drawn in
docs/migrations.md.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, ValidationError
from redis.exceptions import RedisError

from shared.errors import BackendFailure, BackendUnavailable
from shared.keys import disk_job_key, disk_job_pattern, disk_last_job_key
from shared.locks import LUA_NOW_MS
from shared.messages import JobRequest, MigrationFinished, utc_now
from shared.progress import StreamProgress

DEFAULT_ACTIVE_TTL_S = 900.0  # a queued/running record (workers refresh it while running)
DEFAULT_RESULT_TTL_S = 120.0  # a finished record, for late waiters
# A disk's last finished job: as long as a late copy of a request may still wait in the queue (the reaper re-publishes
# a record queued over 120 s behind a backlog, a hand-back may be published twice). ~450 bytes of Redis per disk that
# finished a job in that time (docs/migrations.md).
DEFAULT_TOMBSTONE_TTL_S = 7 * 24 * 3600.0
JobState = Literal["queued", "running", "succeeded", "failed"]
ACTIVE_STATES: frozenset[str] = frozenset({"queued", "running"})
ClaimOutcome = Literal["claimed", "duplicate", "finished", "superseded"]

# Shared by every script: Redis server time in ms, and reading/writing a record (unreadable counts as absent).
_PRELUDE = LUA_NOW_MS + """
local function load(key)
  local raw = redis.call('GET', key)
  if not raw then return nil, nil end
  local ok, record = pcall(cjson.decode, raw)
  if not ok or type(record) ~= 'table' then return nil, raw end
  return record, raw
end
local function store(key, record, ttl_ms)
  local encoded = cjson.encode(record)
  redis.call('SET', key, encoded, 'PX', ttl_ms)
  return encoded
end
local function active(record)
  return record.state == 'queued' or record.state == 'running'
end
-- KEYS[2], the disk's last finished job: the finished record's identity without its request or result, and the
-- latest request time (ms) of the jobs finished on the disk so far.
local function remember_finished(record, requested_ms, ttl_ms)
  local last = load(KEYS[2])
  local latest = tonumber(requested_ms)
  if last and (tonumber(last.requested_ms) or 0) > latest then latest = tonumber(last.requested_ms) end
  store(KEYS[2], {job_id = record.job_id, disk_name = record.disk_name, target_host = record.target_host,
                  state = record.state, created_at = record.created_at, attempt = record.attempt,
                  heartbeat_ms = record.heartbeat_ms, requested_ms = latest}, ttl_ms)
end
-- KEYS[1]'s record when it is job ARGV[1] in `state`, its heartbeat still the one seen (seen_ms) and older than
-- after_ms at `now`; else nil.
local function stale(state, seen_ms, after_ms, now)
  local record = load(KEYS[1])
  if not record or record.job_id ~= ARGV[1] or record.state ~= state then return nil end
  local heartbeat = tonumber(record.heartbeat_ms) or 0
  if heartbeat ~= tonumber(seen_ms) or now - heartbeat < tonumber(after_ms) then return nil end
  return record
end
"""

# ARGV: new queued record, ttl ms. Returns {1, stored record} when created, {0, active record} when joined.
_CREATE_OR_JOIN = _PRELUDE + """
local record, raw = load(KEYS[1])
if record and active(record) then return {0, raw} end
local new = cjson.decode(ARGV[1])
new.heartbeat_ms = now_ms()
return {1, store(KEYS[1], new, ARGV[2])}
"""

# ARGV: job id, claim token, worker, message attempt, stale-after ms, ttl ms, record to create when none, the
# request's time (ms). Returns {outcome, record}. See JobStore.claim for the rules.
_CLAIM = _PRELUDE + """
local now = now_ms()
local record, raw = load(KEYS[1])
local attempt = tonumber(ARGV[4])
if record and record.job_id ~= ARGV[1] then
  if active(record) then return {'superseded', raw} end
  record = nil
end
if record then
  if not active(record) then return {'finished', raw} end
  local held = tonumber(record.attempt) or 1
  local fresh = now - (tonumber(record.heartbeat_ms) or 0) < tonumber(ARGV[5])
  if record.state == 'running' and attempt <= held and fresh then return {'duplicate', raw} end
  if held > attempt then attempt = held end
else
  local last, last_raw = load(KEYS[2])
  if last and last.job_id == ARGV[1] then return {'finished', last_raw} end
  if last and (tonumber(last.requested_ms) or 0) >= tonumber(ARGV[8]) then return {'superseded', last_raw} end
  record = cjson.decode(ARGV[7])
end
record.state = 'running'
record.claim = ARGV[2]
record.worker = ARGV[3]
record.attempt = attempt
record.heartbeat_ms = now
return {'claimed', store(KEYS[1], record, ARGV[6])}
"""

# ARGV: job id, claim token, ttl ms, the owner's record, progress (JSON object, or "" for none). 1 when the
# heartbeat was written (the claim still owns the job; a record Redis lost, e.g. restarted without persistence, is
# written back from the owner's copy).
_BEAT = _PRELUDE + """
local record = load(KEYS[1])
if not record then record = cjson.decode(ARGV[4]) end
if record.job_id ~= ARGV[1] or record.state ~= 'running' or record.claim ~= ARGV[2] then return 0 end
record.heartbeat_ms = now_ms()
if ARGV[5] ~= '' then record.progress = cjson.decode(ARGV[5]) end
store(KEYS[1], record, ARGV[3])
return 1
"""

# ARGV: job id, claim token, patch (JSON object of fields to set), ttl ms, the owner's record (written back
# when Redis lost it), the request's time (ms), the last job's ttl ms. The stored record, or nil when the claim no
# longer owns the job. A patch that finishes the job also makes it the disk's last finished job.
_RELEASE = _PRELUDE + """
local record = load(KEYS[1])
if not record then record = cjson.decode(ARGV[5]) end
if record.job_id ~= ARGV[1] or record.state ~= 'running' or record.claim ~= ARGV[2] then return false end
for field, value in pairs(cjson.decode(ARGV[3])) do record[field] = value end
record.heartbeat_ms = now_ms()
local stored = store(KEYS[1], record, ARGV[4])
if not active(record) then remember_finished(record, ARGV[6], ARGV[7]) end
return stored
"""

# ARGV: job id, heartbeat ms seen, new claim token, worker, stale-after ms, ttl ms. The stored record when
# this caller took the stale job over, nil when it is not stale any more or another reaper won.
_TAKE_OVER = _PRELUDE + """
local now = now_ms()
local record = stale('running', ARGV[2], ARGV[5], now)
if not record then return false end
record.claim = ARGV[3]
record.worker = ARGV[4]
record.heartbeat_ms = now
return store(KEYS[1], record, ARGV[6])
"""

# ARGV: job id, heartbeat ms seen, stale-after ms, ttl ms. The stored record (heartbeat now) when the job is still
# queued, untouched since the heartbeat seen and older than stale-after: this caller re-publishes it. Else nil.
_TOUCH_QUEUED = _PRELUDE + """
local now = now_ms()
local record = stale('queued', ARGV[2], ARGV[3], now)
if not record then return false end
record.heartbeat_ms = now
return store(KEYS[1], record, ARGV[4])
"""

# ARGV: job id. Deletes the record while it is still that job and still queued (nobody claimed it).
_ABANDON = _PRELUDE + """
local record = load(KEYS[1])
if record and record.job_id == ARGV[1] and record.state == 'queued' then redis.call('DEL', KEYS[1]) end
return 0
"""


class JobRecord(BaseModel):
    """What Redis knows about a disk's current (or last) job: a migration, or a clone filling a new disk.

    ``attempt`` is the highest attempt published for it; ``claim`` and ``worker`` name the owner while
    running; ``heartbeat_ms`` is the Redis time of the last state change or heartbeat; ``request`` is the
    full request, so that the job can be published again without its original message; ``progress`` is how far
    the job's content stream was at its last heartbeat (cross-pool moves and clones only).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str
    disk_name: str
    target_host: str
    state: JobState
    created_at: datetime
    attempt: int = 1
    heartbeat_ms: int | None = None
    worker: str | None = None
    claim: str | None = None
    request: JobRequest | None = None
    result: MigrationFinished | None = None
    progress: StreamProgress | None = None

    @property
    def kind(self) -> str:
        """``migrate`` or ``clone`` (a record without its request: ``migrate``)."""
        return self.request.kind if self.request is not None else "migrate"

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def heartbeat_at(self) -> datetime | None:
        return datetime.fromtimestamp(self.heartbeat_ms / 1000, UTC) if self.heartbeat_ms is not None else None

    def age_s(self, now_ms: int) -> float | None:
        """Seconds since the last heartbeat (or state change), by Redis time ``now_ms``."""
        return max(now_ms - self.heartbeat_ms, 0) / 1000 if self.heartbeat_ms is not None else None


@dataclass(frozen=True)
class Claim:
    """What a delivery found: ``claimed`` (``record`` is now running under this claim), ``duplicate``
    (another live claim holds the job), ``finished`` (the job is done), ``superseded`` (another job of the
    disk is active, or one requested no earlier has finished). Only ``claimed`` means: run it. When the
    disk's last finished job decided, ``record`` is that job without its request or result."""

    outcome: ClaimOutcome
    record: JobRecord


class JobStore:
    """Job records under ``prefix``. Every method is one bounded Redis round trip (the client's socket
    timeout); Redis errors become BackendUnavailable, an unreadable record BackendFailure. Writes by a worker
    apply only while its claim still owns the record (the return value says whether it did)."""

    def __init__(self, redis: aioredis.Redis, prefix: str, *, active_ttl_s: float, result_ttl_s: float,
                 tombstone_ttl_s: float = DEFAULT_TOMBSTONE_TTL_S) -> None:
        self._redis = redis
        self._prefix = prefix
        self._active_ttl_ms = int(active_ttl_s * 1000)
        self._result_ttl_ms = int(result_ttl_s * 1000)
        self._tombstone_ttl_ms = int(tombstone_ttl_s * 1000)

    def key(self, disk_name: str) -> str:
        return disk_job_key(self._prefix, disk_name)

    async def create_or_join(self, request: JobRequest) -> tuple[JobRecord, bool]:
        """The disk's active job, or a new queued one for ``request``; the flag says whether it was created."""
        record = JobRecord(job_id=request.job_id, disk_name=request.disk_name, target_host=request.target,
                           state="queued", created_at=utc_now(), attempt=request.attempt, request=request)
        created, raw = _pair(await self._call(_CREATE_OR_JOIN, request.disk_name, record.model_dump_json(),
                                              self._active_ttl_ms))
        return _decode(raw), created == 1

    async def get(self, disk_name: str) -> JobRecord | None:
        try:
            raw = await self._redis.get(self.key(disk_name))
        except RedisError as exc:
            raise BackendUnavailable(f"Redis is unreachable while reading the job of disk {disk_name} "
                                     f"({type(exc).__name__})") from exc
        return _decode(raw) if raw is not None else None

    async def claim(self, request: JobRequest, worker: str, *, stale_after_s: float) -> Claim:
        """Claim the job of a delivered ``request`` for ``worker``, atomically.

        Claimed when the record is queued, or running with a heartbeat older than ``stale_after_s`` (its
        worker died), or running at a lower attempt than the message (its holder is handing it back), or
        absent (expired, or lost by Redis: it is recreated from the request) or another job's finished record,
        unless the disk's last finished job is this one (``finished``) or was requested no earlier than this
        request (``superseded``): a late copy of an old request (a reaper's re-publish, a hand-back published
        twice) would move the disk back to where an older attach wanted it. Otherwise nothing changes:
        ``duplicate``, ``finished`` or ``superseded``. Request times come from the requesters' clocks: two
        requests of one disk closer together than the pods' clock skew may be misordered, and the later one is
        then dropped only when its own record was lost (its attach retries with a new request).
        """
        fallback = JobRecord(job_id=request.job_id, disk_name=request.disk_name, target_host=request.target,
                             state="queued", created_at=utc_now(), attempt=request.attempt, request=request)
        outcome, raw = _pair(await self._call(
            _CLAIM, request.disk_name, request.job_id, uuid.uuid4().hex, worker, request.attempt,
            int(stale_after_s * 1000), self._active_ttl_ms, fallback.model_dump_json(), _ms(request.requested_at),
        ))
        return Claim(outcome=_claim_outcome(outcome), record=_decode(raw))

    async def beat(self, record: JobRecord, progress: StreamProgress | None = None) -> bool:
        """Refresh the heartbeat of a running job (and its ``progress``, when given); False once ``record.claim``
        no longer owns it. A record Redis lost (restart without persistence, expiry) is written back from
        ``record``: the job goes on."""
        return bool(await self._call(_BEAT, record.disk_name, record.job_id, record.claim or "",
                                     self._active_ttl_ms, record.model_dump_json(),
                                     progress.model_dump_json() if progress is not None else ""))

    async def requeue(self, record: JobRecord, attempt: int) -> JobRecord | None:
        """Hand a running job back to the queue (state queued, ``attempt``); None when the claim lost it
        (e.g. the re-published message was claimed already)."""
        patch = {"state": "queued", "attempt": attempt, "claim": None, "worker": None}
        return await self._release(record, patch, self._active_ttl_ms)

    async def finish(self, record: JobRecord, result: MigrationFinished) -> bool:
        """Store the outcome for ``result_ttl_s``, and the job as the disk's last finished one for
        ``tombstone_ttl_s`` (see ``claim``); False when the claim no longer owns the job."""
        patch = {"state": result.outcome, "result": result.model_dump(mode="json"), "claim": None}
        return await self._release(record, patch, self._result_ttl_ms) is not None

    async def take_over(self, record: JobRecord, worker: str, *, stale_after_s: float) -> JobRecord | None:
        """Take a running job whose heartbeat is still ``record.heartbeat_ms`` and older than
        ``stale_after_s`` (its worker is gone): it gets a new claim owned by ``worker``. None when the job
        moved on or another reaper won."""
        raw = await self._call(_TAKE_OVER, record.disk_name, record.job_id, record.heartbeat_ms or 0,
                               uuid.uuid4().hex, worker, int(stale_after_s * 1000), self._active_ttl_ms)
        return _decode(_text(raw)) if raw is not None else None

    async def touch_queued(self, record: JobRecord, *, stale_after_s: float) -> JobRecord | None:
        """Claim the right to publish a ``queued`` job again: when it is still queued with heartbeat
        ``record.heartbeat_ms`` older than ``stale_after_s``, its heartbeat becomes now (so the next try waits
        ``stale_after_s`` again) and the record is returned; None when it moved on or another reaper won."""
        raw = await self._call(_TOUCH_QUEUED, record.disk_name, record.job_id, record.heartbeat_ms or 0,
                               int(stale_after_s * 1000), self._active_ttl_ms)
        return _decode(_text(raw)) if raw is not None else None

    async def abandon(self, disk_name: str, job_id: str) -> None:
        """Delete the record if it is still ``job_id`` and still queued (its request could not be published)."""
        await self._call(_ABANDON, disk_name, job_id)

    async def records(self, *, batch: int = 200) -> list[JobRecord]:
        """Every readable job record under the prefix (SCAN, never KEYS); unreadable ones are skipped."""
        found: list[JobRecord] = []
        try:
            keys = [key async for key in self._redis.scan_iter(match=disk_job_pattern(self._prefix), count=batch)]
            for start in range(0, len(keys), batch):
                for raw in await self._redis.mget(keys[start:start + batch]):
                    if raw is not None:
                        try:
                            found.append(JobRecord.model_validate_json(raw))
                        except ValidationError:
                            continue  # someone else's key under our pattern, or garbage: not a job to act on
        except RedisError as exc:
            raise BackendUnavailable("Redis is unreachable while listing job records") from exc
        return sorted(found, key=lambda r: r.disk_name)

    async def now_ms(self) -> int:
        """Redis server time in ms (the clock of ``heartbeat_ms``)."""
        try:
            seconds, micros = await self._redis.time()
        except RedisError as exc:
            raise BackendUnavailable("Redis is unreachable while reading its time") from exc
        return int(seconds) * 1000 + int(micros) // 1000

    async def _release(self, record: JobRecord, patch: Mapping[str, object], ttl_ms: int) -> JobRecord | None:
        requested_at = record.request.requested_at if record.request is not None else record.created_at
        raw = await self._call(_RELEASE, record.disk_name, record.job_id, record.claim or "", json.dumps(patch),
                               ttl_ms, record.model_dump_json(), _ms(requested_at), self._tombstone_ttl_ms)
        return _decode(_text(raw)) if raw is not None else None

    async def _call(self, script: str, disk_name: str, *args: str | int) -> object:
        """Run ``script`` with KEYS = the disk's job record, its last finished job."""
        try:
            return await self._redis.eval(script, 2, self.key(disk_name),
                                          disk_last_job_key(self._prefix, disk_name), *args)
        except RedisError as exc:
            raise BackendUnavailable(f"Redis is unreachable while updating the job of disk {disk_name} "
                                     f"({type(exc).__name__})") from exc


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _text(raw: object) -> bytes | str:
    if not isinstance(raw, bytes | str):
        raise BackendFailure(f"Redis answered {type(raw).__name__} where a job record was expected")
    return raw


def _pair(answer: object) -> tuple[object, bytes | str]:
    if not isinstance(answer, list) or len(answer) != 2:
        raise BackendFailure(f"Redis answered {answer!r:.80} where [flag, record] was expected")
    first = answer[0].decode() if isinstance(answer[0], bytes) else answer[0]
    return first, _text(answer[1])


def _claim_outcome(value: object) -> ClaimOutcome:
    if value == "claimed" or value == "duplicate" or value == "finished" or value == "superseded":
        return value
    raise BackendFailure(f"the claim script answered {value!r}")


def _decode(raw: bytes | str) -> JobRecord:
    try:
        return JobRecord.model_validate_json(raw)
    except ValidationError as exc:
        raise BackendFailure("the job record in Redis is unreadable; delete the key to reset it") from exc
