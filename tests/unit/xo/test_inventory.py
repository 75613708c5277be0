"""Inventory (the SR/VM/host/pool cache) kept current by XO's notifications, over the in-memory transport seam."""

from __future__ import annotations

import asyncio
from typing import Any

from shared.xo.client import XoClient
from shared.xo.inventory import Inventory
from shared.xo.transport import Credentials, RpcSession
from tests.unit.xo.memory_peer import MemoryPeer

SR = {"id": "sr1", "type": "SR", "$pool": "p", "name_label": "Local", "tags": ["k8s"], "size": 100, "usage": 0,
      "$container": "h1"}
VM = {"id": "vm1", "type": "VM", "$pool": "p", "power_state": "Running", "$container": "h1"}


async def test_exit_notifications_with_zero_values_remove_cached_objects_at_once() -> None:
    objects = {"sr1": SR, "vm1": VM}

    async def handler(method: str, params: dict[str, Any]) -> Any:
        kind = params["filter"].get("type")
        return {k: v for k, v in objects.items() if v["type"] == kind}

    peer = MemoryPeer(handler)
    client = XoClient(RpcSession(peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2))
    inventory = Inventory(client, max_age_s=3600)
    assert [sr.id for sr in await inventory.srs(tag="k8s")] == ["sr1"]
    calls = len(peer.received)
    peer.notify_exit("sr1", "vm1")  # e.g. XO lost the pool: real XO sends {"sr1": 0, "vm1": 0}
    async with asyncio.timeout(2):
        while await inventory.srs(tag="k8s"):
            await asyncio.sleep(0.001)
    assert len(peer.received) == calls  # forgotten from the notification alone, no reload
    objects.clear()
    assert await inventory.vm("vm1") is None  # a miss reads through to XO, which has none
    await client.close()
    await peer.aclose()
