"""After a migrating attach, the controller's and the migrator's /metrics endpoints are scraped and parsed, and
their counters show the migration."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dev.brokers import RedisEndpoint
from shared.units import MiB
from tests.support.e2e import MIGRATING, create, host_segment, publish, stack_on_session_brokers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in values.items() if n == name and wanted <= set(lbls))


@pytest.mark.skipif(os.geteuid() != 0, reason="the stack runs in real data mode, which needs root")
async def test_metrics_show_a_migration(tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint,
                                        redis_prefix: str) -> None:
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, migrators=1,
                                        host_topology=True, metrics=True) as stack:
        controller_port, migrator_port = stack.metrics_ports["controller"], stack.metrics_ports["migrator-1"]
        volume_id = await create(stack, "pvc-metrics", 16 * MiB, MIGRATING, await host_segment(stack, "node-a1"))
        await publish(stack, volume_id, "node-a2")  # the disk was placed on host a1's SR: it migrates
        async with httpx.AsyncClient(timeout=10) as http:
            controller = samples((await http.get(f"http://127.0.0.1:{controller_port}/metrics")).text)
            migrator = samples((await http.get(f"http://127.0.0.1:{migrator_port}/metrics")).text)
    assert total(controller, "xocsi_migration_jobs_enqueued_total") == 1
    assert total(controller, "xocsi_migration_publish_wait_seconds_count", outcome="succeeded") == 1
    assert total(controller, "xocsi_csi_requests_total", method="ControllerPublishVolume", code="OK") >= 1
    assert total(controller, "xocsi_csi_request_duration_seconds_count", method="CreateVolume") >= 1
    assert total(controller, "xocsi_xo_calls_total", method="vm.attachDisk", outcome="ok") == 1
    assert total(migrator, "xocsi_migration_jobs_started_total") == 1
    assert total(migrator, "xocsi_migration_jobs_finished_total", outcome="succeeded") == 1
    assert total(migrator, "xocsi_migration_duration_seconds_count") == 1
    assert total(migrator, "xocsi_migration_bytes_total") == 16 * MiB
    assert total(migrator, "xocsi_xo_calls_total", method="vdi.migrate", outcome="ok") == 1
    assert total(migrator, "xocsi_disk_lock_wait_seconds_count") >= 1
