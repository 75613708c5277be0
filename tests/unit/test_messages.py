"""shared/messages.py: JSON round trips, schema_version, and clear errors for unreadable bodies."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from shared import messages
from shared.messages import FailureReason, MessageError, MigrationFinished, MigrationRequested


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
    with pytest.raises(MessageError, match="not a MigrationRequested v1 message"):
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
