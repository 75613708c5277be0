"""Writes wait until XO's object cache shows them; absent objects are not deleted while XO has lost a pool.

The fake XO here applies each write to its cache ``lag_s`` after answering (as xo-server does) and then sends the
``all`` notification, with unrelated noise notifications in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.xo.client import XoClient
from shared.xo.errors import XoPoolDisconnected, XoVdiInUse
from shared.xo.transport import Credentials, RpcSession
from tests.unit.xo.memory_peer import MemoryPeer, RpcFault

VDI = {"id": "v1", "type": "VDI", "$SR": "sr1", "$pool": "p", "name_label": "csi-temp-a", "name_description": "",
       "size": 1024, "$VBDs": []}


class LaggingXo:
    """Objects as XO's cache shows them, updated ``lag_s`` after each write; counts reads."""

    def __init__(self, lag_s: float = 0.05) -> None:
        self.cache: dict[str, dict[str, Any]] = {"v1": dict(VDI)}
        self.lag_s = lag_s
        self.reads = 0
        self.servers = [{"id": "s1", "label": "Pool A", "status": "connected", "enabled": True}]
        self.plug_error: RpcFault | None = None
        self.peer = MemoryPeer(self.handle)
        self._later: set[asyncio.Task[None]] = set()

    def later(self, change: dict[str, Any], *, gone: str | None = None) -> None:
        async def apply() -> None:
            await asyncio.sleep(self.lag_s)  # XO's cache lag (the fake's own clock, not a test synchronisation)
            if gone is not None:
                self.cache.pop(gone, None)
                self.peer.notify_exit(gone)
            for obj_id, obj in change.items():
                self.cache[obj_id] = obj
            if change:
                self.peer.notify(change)
        task = asyncio.get_running_loop().create_task(apply())
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def handle(self, method: str, params: dict[str, Any]) -> Any:
        self.peer.notify({"t1": {"id": "t1", "type": "task", "progress": 0.5}})  # noise
        if method == "xo.getAllObjects":
            self.reads += 1
            wanted = params["filter"]
            return {k: v for k, v in self.cache.items() if all(v.get(f) == x for f, x in wanted.items())}
        if method == "server.getAll":
            return self.servers
        if method == "vdi.set":
            new = {**self.cache[params["id"]], **{k: v for k, v in params.items() if k != "id"}}
            self.later({params["id"]: new})
            return True
        if method == "vdi.delete":
            if params["id"] not in self.cache:
                raise RpcFault(1, f"no such VDI {params['id']}", {"id": params["id"], "type": "VDI"})
            self.later({}, gone=params["id"])
            return True
        if method == "vm.attachDisk":
            vbd = {"id": "b1", "type": "VBD", "VM": params["vm"], "VDI": params["vdi"], "attached": False,
                   "device": None}
            if self.plug_error is not None:
                self.later({"b1": vbd})
                raise self.plug_error
            self.later({"b1": {**vbd, "attached": True, "device": "xvdb"}})
            return True
        if method == "vdi.migrate":  # XO's copy path: the copy is in the cache, the source leaves it later
            copy = {**self.cache[params["id"]], "id": "v2", "$SR": params["sr_id"]}
            self.cache["v2"] = copy
            self.later({}, gone=params["id"])
            return "v2"
        if method == "vbd.delete":
            self.later({}, gone=params["id"])
            return True
        raise AssertionError(f"unexpected {method}")

    async def aclose(self) -> None:
        for task in list(self._later):
            task.cancel()
        await asyncio.gather(*self._later, return_exceptions=True)
        await self.peer.aclose()


@pytest.fixture
async def xo() -> AsyncIterator[LaggingXo]:
    fake = LaggingXo()
    yield fake
    await fake.aclose()


def client_of(xo: LaggingXo, settle_timeout_s: float = 5.0) -> XoClient:
    session = RpcSession(xo.peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2)
    return XoClient(session, settle_timeout_s=settle_timeout_s)


async def test_a_rename_returns_only_once_a_lookup_by_the_new_name_finds_it(xo: LaggingXo) -> None:
    client = client_of(xo)
    await client.set_vdi("v1", name_label="csi-a", name_description="csi:info: {}")
    found = await client.find_vdis(name_label="csi-a")
    assert [v.id for v in found] == ["v1"] and found[0].name_description == "csi:info: {}"
    assert xo.reads == 1  # the notification proved the write: no read per notification, no polling
    await client.close()


async def test_a_delete_returns_only_once_the_vdi_left_the_cache(xo: LaggingXo) -> None:
    client = client_of(xo)
    await client.delete_vdi("v1")
    assert await client.get_vdi("v1") is None
    await client.close()


async def test_a_delete_answered_no_such_object_is_not_success_while_xo_has_lost_a_pool(xo: LaggingXo) -> None:
    client = client_of(xo)
    xo.cache.clear()  # the pool's objects left XO's cache: "no such object"
    xo.servers[0]["status"] = "connecting"
    with pytest.raises(XoPoolDisconnected, match="Pool A"):
        await client.delete_vdi("v1")
    xo.servers[0]["status"] = "connected"
    await client.delete_vdi("v1")  # truly gone now: success
    await client.close()


async def test_confirm_absent_looks_again_after_checking_every_pool_is_connected(xo: LaggingXo) -> None:
    client = client_of(xo)
    xo.servers.append({"id": "s2", "label": "Pool B", "status": "disconnected", "enabled": True})
    with pytest.raises(XoPoolDisconnected, match=r"Pool B \(disconnected\)"):
        await client.confirm_absent("disk csi-x", lambda: client.find_vdis(name_label="csi-x"))
    xo.servers.pop()
    assert await client.confirm_absent("disk csi-x", lambda: client.find_vdis(name_label="csi-x")) == []
    await client.close()


async def test_attach_returns_the_plugged_vbd_once_the_cache_shows_it(xo: LaggingXo) -> None:
    client = client_of(xo)
    vbd = await client.attach_disk("vm1", "v1")
    assert (vbd.id, vbd.attached, vbd.device) == ("b1", True, "xvdb")
    await client.close()


async def test_a_failed_plug_leaves_no_vbd_behind(xo: LaggingXo) -> None:
    client = client_of(xo)
    xo.plug_error = RpcFault(17, "VDI in use", {"objectId": "v1", "operation": "plug"})
    with pytest.raises(XoVdiInUse):
        await client.attach_disk("vm1", "v1")
    assert "b1" not in xo.cache
    assert [r["method"] for r in xo.peer.received if r["method"] == "vbd.delete"] == ["vbd.delete"]
    await client.close()


async def test_wait_until_reads_only_when_a_relevant_notification_arrives(xo: LaggingXo) -> None:
    client = client_of(xo)
    await client.ping()
    before = xo.reads
    for n in range(200):  # a storm of unrelated notifications
        xo.peer.notify({f"m{n}": {"id": f"m{n}", "type": "message"}})
    xo.later({"v1": {**VDI, "name_label": "csi-b"}})

    async def renamed() -> str | None:
        vdi = await client.get_vdi("v1")
        return vdi.name_label if vdi is not None and vdi.name_label == "csi-b" else None

    result = await client.wait_until(renamed, timeout_s=5, max_interval_s=5,
                                     relevant=lambda obj_id, obj: obj_id == "v1")
    assert result == "csi-b"
    assert xo.reads - before == 2  # the first check, then one on the relevant notification; none for the noise
    await client.close()


async def test_a_migration_returns_once_the_source_left_the_cache(xo: LaggingXo) -> None:
    client = client_of(xo)
    source = await client.get_vdi("v1")
    assert source is not None
    assert await client.migrate_vdi(source, "sr2", timeout_s=5) == "v2"
    assert [v.id for v in await client.find_vdis(name_label="csi-temp-a")] == ["v2"]
    await client.close()


async def test_a_described_migration_returns_the_copy_described_once_the_source_left_without_reading(
        xo: LaggingXo) -> None:
    # The copy carries the source's description (a migration mark): it is described anew as soon as XO answers,
    # and what the notification showed is the answer, once the source has left the cache too; no read after.
    xo.cache["v1"]["name_description"] = "marked"
    client = client_of(xo)
    source = await client.get_vdi("v1")
    assert source is not None
    reads = xo.reads

    moved = await client.migrate_vdi_described(source, "sr2", "cleared", timeout_s=5)

    assert (moved.id, moved.sr_id, moved.name_description) == ("v2", "sr2", "cleared")
    assert "v1" not in xo.cache
    assert xo.reads == reads
    assert [r["method"] for r in xo.peer.received if r["method"] != "session.signIn"][-2:] == ["vdi.migrate",
                                                                                              "vdi.set"]
    await client.close()
