"""The /metrics endpoint serves parseable Prometheus text, and XO calls are counted."""

from __future__ import annotations

import socket
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shared import metrics
from shared.xo.client import XoClient
from shared.xo.transport import Credentials, RpcSession
from tests.unit.xo.memory_peer import MemoryPeer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_xo_calls_are_counted_and_served() -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        return {}

    peer = MemoryPeer(handler)
    client = XoClient(RpcSession(peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2))
    port = _free_port()
    async with metrics.serving(port, host="127.0.0.1"), httpx.AsyncClient() as http:
        before = _sample((await http.get(f"http://127.0.0.1:{port}/metrics")).text, "xocsi_xo_calls_total",
                         {"method": "xo.getAllObjects", "outcome": "ok"})
        await client.ping()
        await client.ping()
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    after = _sample(response.text, "xocsi_xo_calls_total", {"method": "xo.getAllObjects", "outcome": "ok"})
    assert after - before == 2
    assert _sample(response.text, "xocsi_xo_call_duration_seconds_count", {"method": "xo.getAllObjects"}) >= 2
    await client.close()
    await peer.aclose()


async def test_port_zero_serves_nothing() -> None:
    async with metrics.serving(0) as port:
        assert port == 0
