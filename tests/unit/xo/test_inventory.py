"""Inventory (the SR/VM/host/pool cache) kept current by XO's notifications, over the in-memory transport seam."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from shared.xo.client import XoClient
from shared.xo.inventory import Inventory
from shared.xo.transport import Credentials, RpcSession
from tests.support.wait import eventually
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
    async def forgotten() -> bool:
        return not await inventory.srs(tag="k8s")

    await eventually(forgotten, 2)
    assert len(peer.received) == calls  # forgotten from the notification alone, no reload
    objects.clear()
    assert await inventory.vm("vm1") is None  # a miss reads through to XO, which has none
    await client.close()
    await peer.aclose()


class _Xo:
    """A MemoryPeer answering xo.getAllObjects by type from ``objects``; a VM list can be held back (``gate``)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {"sr1": SR, "vm1": VM}
        self.gate = asyncio.Event()
        self.gate.set()
        self.peer = MemoryPeer(self.handler)
        self.client = XoClient(RpcSession(self.peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2))

    async def handler(self, method: str, params: dict[str, Any]) -> Any:
        kind = params["filter"].get("type")
        if kind == "VM":
            await self.gate.wait()
        return {k: v for k, v in self.objects.items() if v["type"] == kind}

    def reads(self) -> list[str]:
        return [m["params"]["filter"]["type"] for m in self.peer.received if m["method"] == "xo.getAllObjects"]

    async def aclose(self) -> None:
        await self.client.close()
        await self.peer.aclose()


@contextlib.asynccontextmanager
async def _warmed(max_age_s: float) -> AsyncIterator[tuple[_Xo, Inventory]]:
    """An inventory loaded at start (one read of each kind), closed with its XO afterwards."""
    xo = _Xo()
    inventory = Inventory(xo.client, max_age_s=max_age_s)
    await inventory.warm()
    assert xo.reads() == ["SR", "VM"]
    try:
        yield xo, inventory
    finally:
        await inventory.close()
        await xo.aclose()


async def test_an_old_inventory_answers_at_once_and_reloads_in_the_background() -> None:
    async with _warmed(max_age_s=0) as (xo, inventory):  # every read finds it old
        xo.gate.clear()  # XO takes its time to list thousands of VMs
        xo.objects["vm1"] = {**VM, "power_state": "Halted"}
        async with asyncio.timeout(2):
            vm = await inventory.vm("vm1")  # answered from the cache while the reload waits
        assert vm is not None and vm.power_state == "Running"
        await eventually(lambda: xo.reads() == ["SR", "VM", "VM"], 2)
        assert (await inventory.vm("vm1")) is not None  # one reload at a time: no second one queued
        assert xo.reads() == ["SR", "VM", "VM"]
        xo.gate.set()

        async def reloaded() -> bool:
            vm = await inventory.vm("vm1")
            return vm is not None and vm.power_state == "Halted"

        await eventually(reloaded, 2)


async def test_invalidating_one_kind_reloads_only_it_before_its_next_read() -> None:
    async with _warmed(max_age_s=3600) as (xo, inventory):
        xo.objects["sr1"] = {**SR, "usage": 60}
        inventory.invalidate("SR")  # our own disk.create changed the SR's usage
        assert await inventory.vm("vm1") is not None and xo.reads() == ["SR", "VM"]
        assert [sr.usage for sr in await inventory.srs()] == [60]
        assert xo.reads() == ["SR", "VM", "SR"]


async def test_a_usage_change_reloads_the_srs_only_for_a_read_that_needs_their_usage() -> None:
    async with _warmed(max_age_s=3600) as (xo, inventory):
        xo.objects["sr1"] = {**SR, "usage": 60}
        inventory.usage_changed()  # our own disk.create filled the SR; where it is did not change
        where = await inventory.sr("sr1", usage=False)  # an attach: is it usable from the node's host?
        assert where is not None and where.container == "h1" and where.usage == 0
        assert xo.reads() == ["SR", "VM"]  # answered from the cache
        assert [sr.usage for sr in await inventory.srs(tag="k8s")] == [60]  # placement: reloaded first
        sr = await inventory.sr("sr1")
        assert sr is not None and sr.usage == 60
        assert xo.reads() == ["SR", "VM", "SR"]  # once


async def test_after_the_socket_closed_each_kind_is_reloaded_before_its_next_read() -> None:
    async with _warmed(max_age_s=3600) as (xo, inventory):
        xo.peer.links[-1].drop()  # notifications sent meanwhile are lost to us
        await eventually(lambda: not xo.client.session.is_connected, 2)
        xo.objects["vm1"] = {**VM, "$container": "h2"}  # the node VM moved while we were away
        vm = await inventory.vm("vm1")
        assert vm is not None and vm.container == "h2" and xo.peer.connects == 2
        assert [sr.id for sr in await inventory.srs()] == ["sr1"]
        assert xo.reads() == ["SR", "VM", "VM", "SR"]  # once each, on the new socket


async def test_a_kind_never_loaded_keeps_nothing_from_the_notifications() -> None:
    # The migrator reads SRs only: the storm of VM changes (metrics) is neither parsed nor kept.
    xo = _Xo()
    inventory = Inventory(xo.client, max_age_s=3600)
    assert [sr.id for sr in await inventory.srs()] == ["sr1"]
    xo.peer.notify({"vm2": {**VM, "id": "vm2"}, "sr2": {**SR, "id": "sr2"}})

    async def sr2_seen() -> bool:
        return "sr2" in {sr.id for sr in await inventory.srs()}

    await eventually(sr2_seen, 2)
    assert inventory._objects["VM"] == {}
    await inventory.close()
    await xo.client.close()
    await xo.peer.aclose()
