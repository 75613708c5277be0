"""MigratorSettings: every setting of xo-csi-migrator (env prefix ``MIGRATOR_``; AMQP_URL, REDIS_URL and
XOA_* come from the shared blocks in shared/config.py)."""

from __future__ import annotations

import os
import socket

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import jobs, messages


def _default_worker_name() -> str:
    return f"xo-csi-migrator@{socket.gethostname()}:{os.getpid()}"


class MigratorSettings(BaseSettings):
    """Settings of the migration worker."""

    model_config = SettingsConfigDict(env_prefix="MIGRATOR_", extra="ignore")

    concurrency: int = Field(default=1, ge=1, description="migrations copying at once (slots: the QoS prefetch stays "
                             "1, see consumer.py; a slot goes back once XO finished the copy)")
    prepare_ahead: int = Field(default=1, ge=0, description="jobs taken beyond --concurrency while every copy slot is "
                               "busy and no other worker has a free one (claimed, disk locked, read from XO, "
                               "marked), each then waiting for this worker's next free copy slot; 0 = off")
    prepared_wait_s: float = Field(default=30.0, gt=0, description="how long a job waits for a copy slot of this "
                                   "worker before it takes its mark back and goes back to the queue unstarted (same "
                                   "attempt)")
    worker_name: str = Field(default_factory=_default_worker_name, description="connection and job owner name")
    migrate_timeout_s: float = Field(default=6 * 3600.0, gt=0, description="bound on one vdi.migrate call")
    stream_idle_timeout_s: float = Field(default=300.0, gt=0, description="a content stream (cross-pool move, clone) "
                                         "fails, retryable, when no byte moved for this long (xen-api's 5 min)")
    lock_ttl_s: float = Field(default=30.0, gt=0, description="disk lock TTL and per-SR slot lease; a "
                              "heartbeat resets them every third")
    lock_wait_s: float = Field(default=5.0, ge=0, description="how long to wait for a disk lock before requeueing")
    per_sr_limit: int = Field(default=0, ge=0, description="most migrations at once whose source or target is a "
                              "given SR, across all replicas; 0 = no limit")
    sr_slot_wait_s: float = Field(default=60.0, ge=0, description="per-SR limit: how long a migration waits for a "
                                  "slot before its job is handed back to the queue")
    job_active_ttl_s: float = Field(default=jobs.DEFAULT_ACTIVE_TTL_S, gt=0,
                                    description="TTL of a queued/running job record")
    job_result_ttl_s: float = Field(default=jobs.DEFAULT_RESULT_TTL_S, gt=0,
                                    description="how long a finished job's result is kept")
    job_heartbeat_s: float = Field(default=10.0, gt=0, description="how often a running job's record is refreshed")
    stale_after_s: float = Field(default=0.0, ge=0, description="a running job whose heartbeat is older is "
                                 "reaped; 0 = 3 x job_heartbeat_s + 5 s")
    reaper_interval_s: float = Field(default=15.0, gt=0, description="how often this worker looks for stale jobs")
    queued_stale_after_s: float = Field(default=120.0, gt=0, description="a job record still queued after this "
                                        "long is published again (its frontend may have crashed before publishing)")
    max_attempts: int = Field(default=8, ge=1, description="publishes of one job (retries, hand-backs, reaps) "
                              "before it fails and is dead-lettered")
    delivery_limit: int = Field(default=messages.DELIVERY_LIMIT, ge=1, description="x-delivery-limit of the queue "
                                "(deliveries that never reach the claim, e.g. Redis down)")
    retry_backoff_max_s: float = Field(default=30.0, ge=0, description="cap of the jittered delay before a retry")
    grace_s: float = Field(default=25.0, ge=0, description="SIGTERM: how long in-flight migrations may finish "
                           "before they are handed back to the queue")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics port; 0 = off")
    health_port: int = Field(default=0, ge=0, le=65535, description="port of /livez and /readyz; 0 = off")
    health_host: str = Field(default="0.0.0.0", description="address the health server listens on")
    liveness_timeout_s: float = Field(default=60.0, gt=0, description="/livez fails once the consume loop has "
                                      "not ticked for this long")
    probe_timeout_s: float = Field(default=3.0, gt=0, description="bound on each readiness check")

    @model_validator(mode="after")
    def _stale_after_heartbeats(self) -> MigratorSettings:
        if self.stale_after_s == 0:
            self.stale_after_s = 3 * self.job_heartbeat_s + 5.0
        if self.stale_after_s <= self.job_heartbeat_s:
            raise ValueError(f"stale_after_s ({self.stale_after_s}) must exceed job_heartbeat_s "
                             f"({self.job_heartbeat_s}): live jobs would be reaped")
        return self
