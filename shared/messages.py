"""Migration message schemas (JSON, pydantic, ``schema_version``) and every exchange, queue and routing name.

The frontend (producer) and the migrator (consumer) import the same models from here; neither defines its own.
No I/O here: the topology is declared by ``shared/broker.py``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1

JOBS_EXCHANGE = "xocsi.migrations"  # direct
JOBS_QUEUE = "xocsi.migrations"  # durable quorum queue
JOBS_ROUTING_KEY = "migration.requested"
DEAD_LETTER_EXCHANGE = "xocsi.migrations.dlx"  # fanout
DEAD_LETTER_QUEUE = "xocsi.migrations.dead"
EVENTS_EXCHANGE = "xocsi.migration-events"  # topic; routing key = disk name
DELIVERY_LIMIT = 5  # x-delivery-limit: deliveries past this many redeliveries are dead-lettered
CONTENT_TYPE = "application/json"

# Headers set on every request (besides AMQP's own x-delivery-count on redeliveries).
HEADER_DISK_NAME = "disk_name"
HEADER_TARGET_HOST = "target_host"
HEADER_ATTEMPT = "attempt"
HEADER_DELIVERY_COUNT = "x-delivery-count"
# Headers of a request the migrator itself dead-letters (a failed job); the broker's own dead-lettering
# (unreadable body, delivery limit) sets x-death / x-first-death-reason instead.
HEADER_REASON = "x-xocsi-reason"  # a DeadReason
HEADER_ERROR_CODE = "x-xocsi-error-code"  # FailureReason.code, e.g. capacity_exhausted
HEADER_ERROR = "x-xocsi-error"  # the error message
HEADER_WORKER = "x-xocsi-worker"  # the worker that gave up
HEADER_FIRST_DEATH_REASON = "x-first-death-reason"  # set by RabbitMQ: rejected, delivery_limit, expired ...
DeadReason = Literal["failed", "attempts_exhausted"]  # permanent error / retryable error on the last attempt


def jobs_queue_arguments(delivery_limit: int = DELIVERY_LIMIT) -> dict[str, object]:
    """Arguments of the jobs queue; every declarer must pass the same ones (RabbitMQ refuses a mismatch)."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }


def events_routing_key(disk_name: str) -> str:
    """Events are routed by disk name (disk names hold no '*' or '#', so a binding matches exactly)."""
    return disk_name


def new_job_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


class MessageError(ValueError):
    """A body that is not a readable message of this schema version (malformed JSON, missing field,
    unknown ``schema_version``). Never retryable: the consumer dead-letters it."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = 1

    def to_body(self) -> bytes:
        return self.model_dump_json().encode()


class MigrationRequested(_Message):
    """Move disk ``disk_name`` to an SR of ``tag`` usable from ``host_id`` (in ``pool_id``) for VM ``vm_id``.

    ``job_id`` is the idempotency key (the AMQP message_id too); ``vdi_id_seen`` is the VDI the requester saw.
    ``attempt`` counts the publishes of this job (1 = the requester's; each hand-back by a worker, retry or
    reaper adds one): a claim of a higher attempt takes over from the holder of a lower one (shared/jobs.py).
    """

    job_id: str = Field(min_length=1)
    disk_name: str = Field(min_length=1)
    volume_id: str
    vdi_id_seen: str
    tag: str = Field(min_length=1)
    vm_id: str
    host_id: str = Field(min_length=1)
    pool_id: str = Field(min_length=1)
    requested_at: datetime
    correlation_id: str
    attempt: int = Field(default=1, ge=1)

    def with_attempt(self, attempt: int) -> MigrationRequested:
        """The same request as publish number ``attempt`` of its job (hand-backs count up from the job record's
        attempt, which may be ahead of the stored request's)."""
        return self.model_copy(update={"attempt": attempt})


M = TypeVar("M", bound="_Message")


# FailureReason codes of a job that ended without a domain error of its own.
WORKER_STOPPED = "worker_stopped"  # handed back at a worker's SIGTERM (retryable)
WORKER_LOST = "worker_lost"  # reaped: its worker stopped heartbeating (retryable)
JOB_RECORD_INCOMPLETE = "job_record_incomplete"  # a record without its request cannot be published again


class FailureReason(BaseModel):
    """Why a migration failed: a stable code (a domain error's ``code``, see shared/errors.py, or one of the
    codes above), its message, and whether a retry may succeed."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    code: str
    message: str
    retryable: bool


class MigrationFinished(_Message):
    """The outcome of job ``job_id``: on success the disk's VDI ``vdi_id`` now lives on ``sr_id``."""

    job_id: str
    disk_name: str
    outcome: Literal["succeeded", "failed"]
    vdi_id: str | None = None
    sr_id: str | None = None
    error: FailureReason | None = None
    duration_s: float = 0.0


def _parse(model: type[M], body: bytes | str) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise MessageError(
            f"not a {model.__name__} v{SCHEMA_VERSION} message: {problems}"
        ) from exc


def parse_requested(body: bytes | str) -> MigrationRequested:
    """Parse a request body; MessageError for malformed JSON, missing fields or another schema_version."""
    return _parse(MigrationRequested, body)


def parse_finished(body: bytes | str) -> MigrationFinished:
    """Parse an event body; MessageError as for ``parse_requested``."""
    return _parse(MigrationFinished, body)
