"""``xocsi jobs``: migration jobs as Redis and RabbitMQ hold them (not over gRPC; REDIS_URL / AMQP_URL or
--redis-url / --amqp-url).

``list``: the job records (SCAN). ``dead``: the dead-letter queue, read with basic.get and put back with
nack(requeue=True): nothing is lost, but each listed message's x-delivery-count grows by one and it is hidden
from other readers while the listing runs. ``requeue JOB_ID``: that dead-lettered request back to the jobs
queue (confirmed), its disk's job record reset to queued so that waiters join it. Exit status: 0 success,
1 backend error or nothing to act on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from services.xocsi import render
from shared import broker, messages
from shared.backends import redis_client
from shared.config import RabbitSettings, RedisSettings
from shared.errors import DomainError
from shared.jobs import DEFAULT_ACTIVE_TTL_S, DEFAULT_RESULT_TTL_S, JobRecord, JobStore
from shared.messages import MigrationRequested

MAX_DEAD_MESSAGES = 10_000  # requeue looks at this many dead letters at most


class JobsError(Exception):
    """Nothing to act on, or the request cannot be served; the message says why (exit status 1)."""


@dataclass(frozen=True)
class JobsSettings:
    """Where the jobs are, built once from the flags and the environment (REDIS_URL, AMQP_URL, REDIS_KEY_PREFIX).
    Records the CLI writes (requeue) get the services' default TTLs (shared/jobs.py)."""

    redis: RedisSettings
    rabbit: RabbitSettings
    timeout_s: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> JobsSettings:
        redis: dict[str, Any] = {"redis_url": args.redis_url} if args.redis_url else {}
        if args.redis_key_prefix is not None:
            redis["key_prefix"] = args.redis_key_prefix
        rabbit = {"amqp_url": args.amqp_url} if getattr(args, "amqp_url", None) else {}
        return cls(RedisSettings(**redis), RabbitSettings(**rabbit), args.timeout)


@dataclass(frozen=True)
class _Backends:
    settings: JobsSettings

    @asynccontextmanager
    async def redis(self) -> AsyncIterator[JobStore]:
        settings = self.settings
        async with contextlib.AsyncExitStack() as stack:
            client = redis_client(stack, settings.redis, timeout_s=settings.timeout_s)
            yield JobStore(client, settings.redis.key_prefix, active_ttl_s=DEFAULT_ACTIVE_TTL_S,
                           result_ttl_s=DEFAULT_RESULT_TTL_S)

    @asynccontextmanager
    async def rabbit(self) -> AsyncIterator[tuple[AbstractRobustConnection, AbstractChannel]]:
        connection = await broker.connect(self.settings.rabbit.amqp_urls, name="xocsi-jobs",
                                          timeout_s=self.settings.timeout_s)
        try:
            channel = await connection.channel()
            await broker.declare(channel)
            yield connection, channel
        finally:
            await asyncio.shield(connection.close())


Action = Callable[[_Backends, argparse.Namespace], Awaitable[tuple[object, list[render.View] | str]]]


# --- parser -----------------------------------------------------------------------------------


def register(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``jobs list|dead|requeue`` to the xocsi parser; each leaf carries its action as ``jobs_action``."""
    description = "migration jobs in Redis and RabbitMQ (reads REDIS_URL / AMQP_URL; not over gRPC)"
    group = top.add_parser("jobs", help=description, description=description + "; `xocsi jobs` alone = list")
    group.set_defaults(jobs_action=_list, all=False, redis_url=None, redis_key_prefix=None)
    leaves = group.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")
    list_ = leaves.add_parser("list", help="job records: disk, state, target host, worker, heartbeat age, attempt")
    list_.add_argument("--all", action="store_true", help="include finished jobs (kept for a while after the end)")
    list_.set_defaults(jobs_action=_list)
    dead = leaves.add_parser("dead", help="requests in the dead-letter queue with why (read, then put back)")
    dead.add_argument("--max", type=int, default=100, metavar="N", help="show at most N messages (default: 100)")
    dead.set_defaults(jobs_action=_dead)
    requeue = leaves.add_parser("requeue", help="send a dead-lettered job back to the jobs queue")
    requeue.add_argument("job_id", metavar="JOB_ID", help="the job id (`jobs dead` shows it)")
    requeue.set_defaults(jobs_action=_requeue)
    _options(list_, redis=True, amqp=False)
    _options(dead, redis=False, amqp=True)
    _options(requeue, redis=True, amqp=True)


def _options(parser: argparse.ArgumentParser, *, redis: bool, amqp: bool) -> None:
    group = parser.add_argument_group("backends")
    if redis:
        group.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, or Redis through $REDIS_SENTINELS)")
        group.add_argument("--redis-key-prefix", help="prefix of the project's Redis keys (default: "
                           "$REDIS_KEY_PREFIX, else xocsi:)")
    if amqp:
        group.add_argument("--amqp-url", help="AMQP URL, or a cluster's URLs comma-separated (default: $AMQP_URL)")
    # Also accepted after the subcommand, without overriding values given before it (as for the gRPC commands).
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    parser.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help="bound on each Redis or RabbitMQ step")


async def execute(args: argparse.Namespace, *, out: TextIO, err: TextIO) -> int:
    """Run the parsed ``jobs`` subcommand; returns the exit status."""
    action: Action = args.jobs_action
    try:
        async with asyncio.timeout(args.timeout * 4):  # a few round trips, each bounded by --timeout
            data, views = await action(_Backends(JobsSettings.from_args(args)), args)
    except (DomainError, JobsError) as exc:
        err.write(f"error: {exc}\n")
        return 1
    except TimeoutError:
        err.write(f"error: no answer within {args.timeout * 4:g} s\n")
        return 1
    if args.json:
        out.write(json.dumps(data, indent=2, default=str) + "\n")
    elif isinstance(views, str):
        out.write(views + "\n")
    else:
        render.print_views(views, out)
    return 0


# --- list -------------------------------------------------------------------------------------


async def _list(backends: _Backends, args: argparse.Namespace) -> tuple[object, list[render.View] | str]:
    async with backends.redis() as jobs:
        now_ms = await jobs.now_ms()
        records = [r for r in await jobs.records() if args.all or r.is_active]
    rows = [_job_row(record, now_ms) for record in records]
    if not rows:
        return rows, "no migration jobs" + ("" if args.all else " in flight")
    headers = ("DISK", "STATE", "TARGET HOST", "WORKER", "HEARTBEAT AGE", "ATTEMPT", "JOB")
    table = [(r["disk_name"], r["state"], r["target_host"], r["worker"] or "-",
              "-" if r["heartbeat_age_s"] is None else f"{r['heartbeat_age_s']:.1f}s", str(r["attempt"]),
              r["job_id"]) for r in rows]
    return rows, [render.Table(headers, table)]


def _job_row(record: JobRecord, now_ms: int) -> dict[str, Any]:
    error = record.result.error if record.result is not None else None
    return {
        "disk_name": record.disk_name, "state": record.state, "target_host": record.target_host,
        "worker": record.worker, "heartbeat_age_s": record.age_s(now_ms), "attempt": record.attempt,
        "job_id": record.job_id, "error": error.message if error is not None else None,
    }


# --- dead -------------------------------------------------------------------------------------


async def _dead(backends: _Backends, args: argparse.Namespace) -> tuple[object, list[render.View] | str]:
    async with backends.rabbit() as (_, channel):
        held = await _get_dead(channel, args.max)
        try:
            rows = [_dead_row(message) for message in held]
        finally:
            await _put_back(held)
    if not rows:
        return rows, "the dead-letter queue is empty"
    headers = ("JOB", "DISK", "REASON", "ERROR", "ATTEMPT", "READS")
    table = [(r["job_id"] or "-", r["disk_name"] or "-", r["reason"] or "-", r["error"] or "-",
              str(r["attempt"] or "-"), str(r["delivery_count"])) for r in rows]
    return rows, [render.Table(headers, table)]


def _dead_row(message: AbstractIncomingMessage) -> dict[str, Any]:
    headers = message.headers or {}

    def text(name: str) -> str | None:
        value = headers.get(name)
        return value.decode(errors="replace") if isinstance(value, bytes) else (str(value) if value else None)

    code, error = text(messages.HEADER_ERROR_CODE), text(messages.HEADER_ERROR)
    return {
        "job_id": message.message_id, "disk_name": text(messages.HEADER_DISK_NAME),
        # Ours when the migrator gave up; RabbitMQ's (rejected: unreadable body, delivery_limit) otherwise.
        "reason": text(messages.HEADER_REASON) or text(messages.HEADER_FIRST_DEATH_REASON),
        "error": f"{code}: {error}" if code else error, "attempt": headers.get(messages.HEADER_ATTEMPT),
        "worker": text(messages.HEADER_WORKER), "delivery_count": headers.get(messages.HEADER_DELIVERY_COUNT, 0),
    }


async def _get_dead(channel: AbstractChannel, limit: int) -> list[AbstractIncomingMessage]:
    """Up to ``limit`` dead letters, held unacked (so each is read once) until ``_put_back`` or an ack."""
    queue = await channel.get_queue(messages.DEAD_LETTER_QUEUE, ensure=False)
    held: list[AbstractIncomingMessage] = []
    while len(held) < limit:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            break
        held.append(message)
    return held


async def _put_back(held: list[AbstractIncomingMessage]) -> None:
    for message in held:
        await asyncio.shield(message.nack(requeue=True))


# --- requeue ----------------------------------------------------------------------------------


async def _requeue(backends: _Backends, args: argparse.Namespace) -> tuple[object, list[render.View] | str]:
    async with backends.rabbit() as (connection, channel), backends.redis() as jobs:
        held = await _get_dead(channel, MAX_DEAD_MESSAGES)
        target = next((m for m in held if _job_id(m) == args.job_id), None)
        others = [m for m in held if m is not target]
        try:
            await _put_back(others)
            if target is None:
                raise JobsError(f"no dead-lettered message for job {args.job_id} (see `xocsi jobs dead`)")
            request = _readable(target)
            await _send_back(connection, jobs, request, args.timeout)
        except BaseException:
            if target is not None:
                await asyncio.shield(target.nack(requeue=True))
            raise
        await asyncio.shield(target.ack())
    data = {"job_id": request.job_id, "disk_name": request.disk_name, "queue": messages.JOBS_QUEUE}
    return data, f"job {request.job_id} (disk {request.disk_name}) is queued again on {messages.JOBS_QUEUE}"


def _job_id(message: AbstractIncomingMessage) -> str | None:
    if message.message_id:
        return message.message_id
    try:
        return messages.parse_requested(message.body).job_id
    except messages.MessageError:
        return None


def _readable(message: AbstractIncomingMessage) -> MigrationRequested:
    try:
        return messages.parse_requested(message.body)
    except messages.MessageError as exc:
        raise JobsError(f"{exc}; it stays in {messages.DEAD_LETTER_QUEUE}") from exc


async def _send_back(connection: AbstractRobustConnection, jobs: JobStore, request: MigrationRequested,
                     timeout_s: float) -> None:
    """Reset the record to queued first (a worker's claim needs it), then publish with confirms; undo the
    record when the publish fails. A fresh attempt count: the operator decided the job deserves more tries."""
    request = request.with_attempt(1)
    record, created = await jobs.create_or_join(request)
    if not created:
        raise JobsError(f"disk {request.disk_name} already has an active job {record.job_id} ({record.state}); "
                        "requeueing would race it")
    publisher = broker.Publisher(connection, timeout_s=timeout_s)
    try:
        await publisher.request(request)
    except BaseException:
        with contextlib.suppress(DomainError):  # what stopped the publish is the error to report, not this cleanup
            await asyncio.shield(jobs.abandon(request.disk_name, request.job_id))
        raise
    finally:
        await publisher.close()
