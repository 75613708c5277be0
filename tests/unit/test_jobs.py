"""Job records and job requests without Redis: attempts on the wire, record helpers, the worker's settings."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from services.migrator.outcome import failure_of
from services.migrator.settings import MigratorSettings
from shared import messages
from shared.errors import CapacityExhausted, OperationPending
from shared.jobs import JobRecord
from shared.keys import disk_job_key, disk_job_pattern
from shared.messages import MigrationRequested


def _request(**fields: object) -> MigrationRequested:
    values: dict[str, object] = {
        "job_id": "job-1", "disk_name": "csi-a", "volume_id": "name:a", "vdi_id_seen": "vdi-1", "tag": "k8s",
        "vm_id": "vm-2", "host_id": "host-2", "pool_id": "pool-a", "correlation_id": "c",
        "requested_at": datetime(2026, 1, 2, tzinfo=UTC),
    }
    return MigrationRequested.model_validate({**values, **fields})


def test_a_request_without_attempt_is_the_first_attempt() -> None:
    body = json.loads(_request().to_body())
    del body["attempt"]
    assert messages.parse_requested(json.dumps(body)).attempt == 1


def test_with_attempt_keeps_everything_else() -> None:
    again = _request(attempt=2).with_attempt(5)
    assert again.attempt == 5
    assert again.model_dump(exclude={"attempt"}) == _request().model_dump(exclude={"attempt"})
    assert messages.parse_requested(again.to_body()) == again


def test_attempt_zero_is_refused() -> None:
    with pytest.raises(ValidationError):
        _request(attempt=0)


def test_a_record_round_trips_with_its_request_and_tells_its_heartbeat_age() -> None:
    record = JobRecord(job_id="job-1", disk_name="csi-a", target_host="host-2", state="running",
                       created_at=datetime(2026, 1, 2, tzinfo=UTC), attempt=2, heartbeat_ms=1_000_000,
                       worker="w1", claim="c1", request=_request())
    assert JobRecord.model_validate_json(record.model_dump_json()) == record
    assert record.is_active
    assert record.age_s(1_002_500) == 2.5
    assert record.age_s(999_000) == 0, "a Redis clock step back never gives a negative age"
    assert record.heartbeat_at == datetime.fromtimestamp(1000, UTC)
    assert record.model_copy(update={"heartbeat_ms": None}).age_s(1) is None


def test_the_scan_pattern_matches_job_keys_and_escapes_the_prefix() -> None:
    assert disk_job_key("xocsi:", "csi-a") == "xocsi:job:disk:csi-a"
    assert disk_job_pattern("xocsi:") == "xocsi:job:disk:*"
    assert disk_job_pattern("t[1]*:") == "t\\[1\\]\\*:job:disk:*"


def test_failure_of_a_domain_error_keeps_code_message_and_retryability() -> None:
    assert failure_of(OperationPending("busy")).model_dump() == {
        "code": "operation_pending", "message": "busy", "retryable": True}
    assert failure_of(CapacityExhausted("full")).retryable is False


def test_stale_after_defaults_to_three_heartbeats_and_a_margin() -> None:
    assert MigratorSettings(job_heartbeat_s=10).stale_after_s == 35
    assert MigratorSettings(job_heartbeat_s=1, stale_after_s=2).stale_after_s == 2


def test_a_stale_after_shorter_than_a_heartbeat_is_refused() -> None:
    with pytest.raises(ValidationError, match="live jobs would be reaped"):
        MigratorSettings(job_heartbeat_s=10, stale_after_s=5)
