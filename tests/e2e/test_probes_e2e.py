"""The controller's liveness never depends on XO (issue 10 item 7): with XO gone, CSI Probe (what the liveness-probe
sidecar turns into the container's liveness) still answers ready and /livez 200, while /readyz on the metrics port
answers 503 naming XO; with everything up, /readyz reports XO, RabbitMQ and Redis ok."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from dev.brokers import RedisEndpoint
from shared.csi import csi_pb2, csi_pb2_grpc
from tests.support.e2e import stack_on_session_brokers
from tests.support.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_xo_down_fails_readiness_never_liveness(tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint,
                                                     redis_prefix: str) -> None:
    async with stack_on_session_brokers(tmp_path, amqp_vhost, redis_server, redis_prefix, nodes=False,
                                        real_data=False, metrics=True) as stack:
        base = f"http://127.0.0.1:{stack.metrics_ports['controller']}"
        async with httpx.AsyncClient(timeout=10) as http:
            ready = await http.get(f"{base}/readyz")
            assert (ready.status_code, ready.json()) == (200, {"ok": True, "xo": "ok", "rabbitmq": "ok",
                                                               "redis": "ok"})

            await stack.processes["xo-sim"].kill()  # XO is gone (a restart of the plugin would not bring it back)

            async def not_ready() -> dict[str, Any]:
                answer = await http.get(f"{base}/readyz")
                assert answer.status_code == 503, answer.text
                return dict(answer.json())
            report = await eventually(not_ready, 30, description="/readyz answers 503")
            assert report["ok"] is False and report["xo"] != "ok"
            assert (report["rabbitmq"], report["redis"]) == ("ok", "ok")
            assert (await http.get(f"{base}/livez")).status_code == 200
        async with grpc.aio.insecure_channel(f"unix://{stack.controller_socket}") as channel:
            probe = await csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=5)
        assert probe.ready.value is True
