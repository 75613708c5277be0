"""Job message schemas (JSON, pydantic, ``schema_version``) and every exchange, queue and routing name.

The frontend (producer) and the migrator (consumer) import the same models from here; neither defines its own.
No I/O here: the topology is declared by ``shared/broker.py``.

Two kinds of job travel on the one jobs queue, told apart by ``kind``: ``migrate`` (MigrationRequested: bring a disk
to a node) and ``clone`` (CloneRequested: a new volume filled from another). A message without ``kind`` is a
migration (every message written before clones existed). Compatibility across a rolling upgrade, with
``schema_version`` still 1: a CloneRequested lacks fields a MigrationRequested requires (``vdi_id_seen``, ``tag``,
``vm_id``, ``host_id``, ``pool_id``), so a worker of an older version fails to read it and dead-letters it
(``x-first-death-reason: rejected``) instead of taking it for a migration; an unknown ``kind`` is dead-lettered
the same way by this version.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError

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
HEADER_KIND = "kind"  # migrate or clone
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


class _JobRequest(_Message):
    """What every job request carries. ``job_id`` is the idempotency key (the AMQP message_id too); the job record
    is keyed by ``disk_name``. ``attempt`` counts the publishes of this job (1 = the requester's; each hand-back by
    a worker, retry or reaper adds one): a claim of a higher attempt takes over from the holder of a lower one
    (shared/jobs.py)."""

    job_id: str = Field(min_length=1)
    disk_name: str = Field(min_length=1)
    volume_id: str
    requested_at: datetime
    correlation_id: str
    attempt: int = Field(default=1, ge=1)

    def with_attempt(self, attempt: int) -> Self:
        """The same request as publish number ``attempt`` of its job (hand-backs count up from the job record's
        attempt, which may be ahead of the stored request's)."""
        return self.model_copy(update={"attempt": attempt})

    @property
    def target(self) -> str:
        """Where the job goes, for the job record and the ``target_host`` header."""
        raise NotImplementedError


class MigrationRequested(_JobRequest):
    """Move disk ``disk_name`` to an SR of ``tag`` usable from ``host_id`` (in ``pool_id``) for VM ``vm_id``;
    ``vdi_id_seen`` is the VDI the requester saw."""

    kind: Literal["migrate"] = "migrate"
    vdi_id_seen: str
    tag: str = Field(min_length=1)
    vm_id: str
    host_id: str = Field(min_length=1)
    pool_id: str = Field(min_length=1)

    @property
    def target(self) -> str:
        return self.host_id


class CloneRequested(_JobRequest):
    """Create disk ``disk_name`` (volume ``volume_id``) of ``size_bytes`` on SR ``sr_id``, filled with the content of
    volume ``source_volume_id`` (whose VDI the requester saw as ``source_vdi_seen``, named ``source_disk_name`` for a
    volume known by name, else ""); ``description`` is the new disk's ``csi:info`` (its StorageClass)."""

    kind: Literal["clone"]
    source_volume_id: str = Field(min_length=1)
    source_vdi_seen: str = Field(min_length=1)
    source_disk_name: str = ""
    sr_id: str = Field(min_length=1)
    size_bytes: int = Field(ge=0)
    description: str

    @property
    def target(self) -> str:
        return f"SR {self.sr_id}"


def _kind_of(value: Any) -> str:
    kind = value.get("kind", "migrate") if isinstance(value, dict) else getattr(value, "kind", "migrate")
    return str(kind)


# A request of either kind (``kind`` absent: a migration); every reader of requests and job records uses it.
JobRequest = Annotated[
    Annotated[MigrationRequested, Tag("migrate")] | Annotated[CloneRequested, Tag("clone")],
    Discriminator(_kind_of, custom_error_type="unknown_kind",
                  custom_error_message="kind must be 'migrate' (or absent) or 'clone'"),
]
_REQUEST = TypeAdapter[MigrationRequested | CloneRequested](JobRequest)
_MODEL_OF_KIND = {"migrate": "MigrationRequested", "clone": "CloneRequested"}


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
    """The outcome of job ``job_id`` (either kind): on success the disk's VDI ``vdi_id`` now lives on ``sr_id``."""

    job_id: str
    disk_name: str
    outcome: Literal["succeeded", "failed"]
    vdi_id: str | None = None
    sr_id: str | None = None
    error: FailureReason | None = None
    duration_s: float = 0.0


def _problems(exc: ValidationError, *, skip: int = 0) -> str:
    """The first five validation errors, each at its location less its first ``skip`` parts."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'][skip:]) or '(body)'}: {err['msg']}"
                     for err in exc.errors()[:5])


def _parse(model: type[M], body: bytes | str) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise MessageError(f"not a {model.__name__} v{SCHEMA_VERSION} message: {_problems(exc)}") from exc


def parse_requested(body: bytes | str) -> MigrationRequested | CloneRequested:
    """Parse a request body of either kind; MessageError for malformed JSON, missing fields, an unknown ``kind`` or
    another schema_version."""
    try:
        return _REQUEST.validate_json(body)
    except ValidationError as exc:
        tags = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        model = _MODEL_OF_KIND.get(tags.pop()) if len(tags) == 1 else None
        if model is None:
            raise MessageError(f"not a job request v{SCHEMA_VERSION} message: {_problems(exc)}") from exc
        raise MessageError(f"not a {model} v{SCHEMA_VERSION} message: {_problems(exc, skip=1)}") from exc


def parse_finished(body: bytes | str) -> MigrationFinished:
    """Parse an event body; MessageError as for ``parse_requested``."""
    return _parse(MigrationFinished, body)
