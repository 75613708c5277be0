"""MigratorSettings: every setting of xo-csi-migrator (env prefix ``MIGRATOR_``; AMQP_URL, REDIS_URL and
XOA_* come from the shared blocks in shared/config.py)."""

from __future__ import annotations

import os
import socket

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import messages


def _default_worker_name() -> str:
    return f"xo-csi-migrator@{socket.gethostname()}:{os.getpid()}"


class MigratorSettings(BaseSettings):
    """Settings of the migration worker."""

    model_config = SettingsConfigDict(env_prefix="MIGRATOR_", extra="ignore")

    concurrency: int = Field(default=1, ge=1, description="migrations run at once (= QoS prefetch)")
    worker_name: str = Field(default_factory=_default_worker_name, description="connection and job owner name")
    migrate_timeout_s: float = Field(default=6 * 3600.0, gt=0, description="bound on one vdi.migrate call")
    lock_ttl_s: float = Field(default=30.0, gt=0, description="disk lock TTL; a heartbeat resets it every third")
    lock_wait_s: float = Field(default=5.0, ge=0, description="how long to wait for a disk lock before requeueing")
    job_active_ttl_s: float = Field(default=900.0, gt=0, description="TTL of a queued/running job record")
    job_result_ttl_s: float = Field(default=120.0, gt=0, description="how long a finished job's result is kept")
    job_heartbeat_s: float = Field(default=10.0, gt=0, description="how often a running job's record is refreshed")
    delivery_limit: int = Field(default=messages.DELIVERY_LIMIT, ge=1, description="x-delivery-limit of the queue")
    retry_backoff_max_s: float = Field(default=30.0, ge=0, description="cap of the jittered delay before a requeue")
    grace_s: float = Field(default=25.0, ge=0, description="SIGTERM: how long in-flight migrations may finish")
