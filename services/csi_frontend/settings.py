"""FrontendSettings: every setting of xo-csi-frontend, from CSI_* environment variables and flags.

Names and defaults follow the Go driver m4rCsi where it has one (driver name, --disk-name-prefix,
--host-topology, --temp-cleanup, --xoa-timeout). XO credentials come from XOA_* (shared/config.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import jobs

DEFAULT_DRIVER_NAME = "csi.xen-orchestra.marcsi.ch"


class FrontendSettings(BaseSettings):
    """Settings of the CSI frontend (env prefix ``CSI_``)."""

    model_config = SettingsConfigDict(env_prefix="CSI_", extra="ignore")

    endpoint: str = Field(default="unix:///csi/csi.sock", description="unix:///path or tcp://host:port")
    mode: Literal["controller", "node", "all"] = "all"
    driver_name: str = DEFAULT_DRIVER_NAME
    node_id: str | None = Field(default=None, description="VM UUID of this node (default: read from DMI)")
    dmi_uuid_path: Path = Path("/sys/class/dmi/id/product_uuid")
    node_metadata: Literal["kubernetes", "xo"] = Field(
        default="kubernetes", description="where a node plugin learns its pool and host: its Node's labels set by "
        "the XO cloud controller manager (no XO credentials), or XO (any signed-in account)")
    node_name: str | None = Field(default=None, description="this node's Kubernetes name (CSI_NODE_NAME; the "
                                  "DaemonSet sets it from spec.nodeName); node-metadata=kubernetes only")
    kubeconfig: Path | None = Field(default=None, description="Kubernetes API access outside a pod (default: the "
                                    "pod's ServiceAccount, else $KUBECONFIG)")
    node_labels_wait_s: float = Field(default=60.0, ge=0, description="how long a starting node plugin waits for the "
                                      "CCM to label its Node")
    disk_name_prefix: str = "csi-"
    host_topology: bool = False
    temp_cleanup: bool = False
    temp_cleanup_interval_s: float = Field(default=120.0, gt=0, description="time between two cleanup passes")
    temp_cleanup_min_age_s: float = Field(default=600.0, ge=0,
                                          description="how long a temporary disk must be seen before it is marked")
    temp_cleanup_delete_after_s: float = Field(default=1800.0, ge=0,
                                               description="how long after its mark a temporary disk is deleted")
    stale_mark_after_s: float = Field(default=70.0, ge=0,
                                      description="clear a migration mark no live job backs after this long")
    device_dir: Path = Path("/dev")
    device_wait_s: float = Field(default=10.0, gt=0)
    max_volumes_per_node: int = Field(default=239, ge=1)
    grace_s: float = Field(default=10.0, ge=0)
    job_active_ttl_s: float = Field(default=jobs.DEFAULT_ACTIVE_TTL_S, gt=0,
                                    description="TTL of a queued job record (workers refresh it while running)")
    job_result_ttl_s: float = Field(default=jobs.DEFAULT_RESULT_TTL_S, gt=0,
                                    description="how long a finished job's result is kept")
    publish_margin_s: float = Field(default=2.0, ge=0, description="answer this long before the caller's deadline")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics port, also /readyz and "
                              "/livez; 0 = off")
    probe_timeout_s: float = Field(default=3.0, gt=0, description="bound on each /readyz check (XO, RabbitMQ, Redis)")

    @field_validator("disk_name_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (e.g. csi-)")
        return value

    @property
    def serves_controller(self) -> bool:
        return self.mode in ("controller", "all")

    @property
    def serves_node(self) -> bool:
        return self.mode in ("node", "all")

    @property
    def needs_xo(self) -> bool:
        """The controller always; a node plugin only with node-metadata=xo."""
        return self.serves_controller or self.node_metadata == "xo"

