"""shared/messages.py: JSON round trips, schema_version, clear errors for unreadable bodies, and the two job kinds
(migrate, clone) staying compatible with workers of the version before clones."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import messages
from shared.messages import CloneRequested, FailureReason, MessageError, MigrationFinished, MigrationRequested


def _request() -> MigrationRequested:
    return MigrationRequested(
        job_id="job-1", disk_name="csi-pvc-1", volume_id="name:pvc-1", vdi_id_seen="vdi-1", tag="k8s-migrating",
        vm_id="vm-b", host_id="host-b", pool_id="pool-a", requested_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        correlation_id="corr-1",
    )


def test_request_round_trip_keeps_every_field_and_version() -> None:
    request = _request()
    body = request.to_body()
    assert json.loads(body)["schema_version"] == 1
    assert messages.parse_requested(body) == request


@pytest.mark.parametrize(
    "event",
    [
        MigrationFinished(job_id="j", disk_name="csi-a", outcome="succeeded", vdi_id="v2", sr_id="sr-b",
                          duration_s=1.5),
        MigrationFinished(job_id="j", disk_name="csi-a", outcome="failed",
                          error=FailureReason(code="capacity_exhausted", message="no room", retryable=False)),
    ],
)
def test_finished_round_trip(event: MigrationFinished) -> None:
    assert messages.parse_finished(event.to_body()) == event


def test_unknown_schema_version_is_rejected_with_a_clear_error() -> None:
    body = json.loads(_request().to_body())
    body["schema_version"] = 2
    with pytest.raises(MessageError, match=r"not a MigrationRequested v1 message: schema_version"):
        messages.parse_requested(json.dumps(body))


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"schema_version": 1}', b"\xff\xfe"])
def test_malformed_bodies_raise_message_error(body: bytes) -> None:
    with pytest.raises(MessageError, match="not a (MigrationRequested|job request) v1 message"):
        messages.parse_requested(body)


def test_missing_field_is_named() -> None:
    body = json.loads(_request().to_body())
    del body["host_id"]
    with pytest.raises(MessageError, match="host_id"):
        messages.parse_requested(json.dumps(body))


def test_bad_outcome_is_rejected() -> None:
    with pytest.raises(MessageError, match="outcome"):
        messages.parse_finished(b'{"schema_version":1,"job_id":"j","disk_name":"d","outcome":"maybe"}')


def test_queue_arguments_make_a_quorum_queue_that_dead_letters() -> None:
    args = messages.jobs_queue_arguments()
    assert args == {"x-queue-type": "quorum", "x-delivery-limit": messages.DELIVERY_LIMIT,
                    "x-dead-letter-exchange": messages.DEAD_LETTER_EXCHANGE}
    assert messages.events_routing_key("csi-pvc-1") == "csi-pvc-1"


# --- the clone kind -------------------------------------------------------------------------------------


def _clone() -> CloneRequested:
    return CloneRequested(
        kind="clone", job_id="job-2", disk_name="csi-pvc-2", volume_id="name:pvc-2", source_volume_id="name:pvc-1",
        source_vdi_seen="vdi-1", source_disk_name="csi-pvc-1", sr_id="sr-b", size_bytes=2 * 1024**3,
        description='csi:info: {"migrating":{},"srsWithTag":"k8s-migrating"}',
        requested_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), correlation_id="corr-2",
    )


class _RequestOfVersionBeforeClones(BaseModel):
    """MigrationRequested exactly as the workers before clones read it (schema_version 1, no ``kind``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    schema_version: int = 1
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


def test_clone_request_round_trips_as_a_clone_with_the_same_schema_version() -> None:
    clone = _clone()
    body = clone.to_body()
    assert json.loads(body)["schema_version"] == 1
    assert json.loads(body)["kind"] == "clone"
    parsed = messages.parse_requested(body)
    assert isinstance(parsed, CloneRequested)
    assert parsed == clone
    assert parsed.with_attempt(3) == clone.model_copy(update={"attempt": 3})
    assert parsed.target == "SR sr-b"


def test_a_message_of_the_version_before_clones_still_reads_as_a_migration() -> None:
    old = _RequestOfVersionBeforeClones(**_request().model_dump(exclude={"kind"}))
    assert "kind" not in json.loads(old.model_dump_json())
    parsed = messages.parse_requested(old.model_dump_json())
    assert isinstance(parsed, MigrationRequested)
    assert parsed == _request()


def test_a_worker_of_the_version_before_clones_cannot_read_a_clone_so_it_dead_letters_it() -> None:
    """Its consumer rejects (without requeue) a body it cannot parse: the broker dead-letters it. It must never take
    a clone for a migration."""
    with pytest.raises(ValidationError) as refused:
        _RequestOfVersionBeforeClones.model_validate_json(_clone().to_body())
    assert {str(err["loc"][0]) for err in refused.value.errors()} == {"vdi_id_seen", "tag", "vm_id", "host_id",
                                                                       "pool_id"}


def test_unknown_kind_is_rejected_naming_the_kinds() -> None:
    body = json.loads(_clone().to_body())
    body["kind"] = "snapshot"
    with pytest.raises(MessageError, match="kind must be 'migrate' \\(or absent\\) or 'clone'"):
        messages.parse_requested(json.dumps(body))


def test_clone_missing_field_is_named_with_its_model() -> None:
    body = json.loads(_clone().to_body())
    del body["sr_id"]
    with pytest.raises(MessageError, match="not a CloneRequested v1 message: sr_id"):
        messages.parse_requested(json.dumps(body))
