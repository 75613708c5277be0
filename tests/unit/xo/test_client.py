"""XoClient and RpcSession over the in-memory transport seam."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.config import XoSettings
from shared.errors import BackendUnavailable
from shared.xo.client import XoClient
from shared.xo.errors import XoAuthError, XoError, XoPoolDisconnected, XoUnavailable
from shared.xo.models import Vdi
from shared.xo.transport import Credentials, RpcSession
from tests.unit.xo.memory_peer import DropSocket, MemoryPeer, RpcFault

VDI = {"id": "v1", "uuid": "v1", "type": "VDI", "$SR": "sr1", "$pool": "p", "name_label": "csi-a", "size": 1024}


def make_client(peer: MemoryPeer, *, token: str = "good-token", timeout_s: float = 2.0) -> XoClient:
    session = RpcSession(peer, Credentials(token=token), timeout_s=timeout_s, connect_timeout_s=2.0)
    return XoClient(session)


async def _answer_empty(method: str, params: dict[str, Any]) -> Any:
    """A handler for tests about the session itself: every call answers an empty object."""
    return {}


@pytest.fixture
async def objects() -> AsyncIterator[dict[str, dict[str, Any]]]:
    yield {"v1": dict(VDI)}


async def test_token_sign_in_then_call(objects: dict[str, Any]) -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        assert method == "xo.getAllObjects"
        return objects

    peer = MemoryPeer(handler)
    client = make_client(peer)
    vdis = await client.find_vdis(name_label="csi-a")
    assert [v.id for v in vdis] == ["v1"] and vdis[0].sr_id == "sr1"
    assert peer.received[0] == {
        "jsonrpc": "2.0", "id": 0, "method": "session.signIn", "params": {"token": "good-token"}
    }
    assert peer.received[1]["params"] == {"filter": {"type": "VDI", "name_label": "csi-a"}}
    await client.close()
    await peer.aclose()


async def test_password_sign_in_sends_email_and_password() -> None:
    peer = MemoryPeer(_answer_empty)
    session = RpcSession(peer, Credentials(username="admin@example.org", password="pw"), timeout_s=1,
                         connect_timeout_s=1)
    await XoClient(session).ping()
    assert peer.received[0]["params"] == {"email": "admin@example.org", "password": "pw"}
    await session.close()
    await peer.aclose()


async def test_bad_token_is_auth_error_without_the_token() -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        raise AssertionError("no call may pass before sign-in")

    peer = MemoryPeer(handler)
    client = make_client(peer, token="s3cr3t-value")
    with pytest.raises(XoAuthError) as info:
        await client.ping()
    assert "s3cr3t-value" not in str(info.value)
    assert "XOA_TOKEN" in str(info.value)
    assert isinstance(info.value, BackendUnavailable)
    await client.close()
    await peer.aclose()


async def test_concurrent_calls_are_multiplexed_and_answered_out_of_order() -> None:
    release = asyncio.Event()

    async def handler(method: str, params: dict[str, Any]) -> Any:
        n = params["filter"]["n"]
        if n == 0:
            await release.wait()  # the first call answers last
        elif n == 49:
            release.set()
        return {str(n): {"id": str(n), "type": "pool"}}

    peer = MemoryPeer(handler)
    client = make_client(peer)
    results = await asyncio.gather(*(client.get_objects({"type": "pool", "n": n}) for n in range(50)))
    assert [r[0]["id"] for r in results] == [str(n) for n in range(50)]
    assert peer.connects == 1
    await client.close()
    await peer.aclose()


async def test_notifications_reach_subscribers_and_not_callers() -> None:
    peer_ref: list[MemoryPeer] = []

    async def handler(method: str, params: dict[str, Any]) -> Any:
        peer_ref[0].notify({"x": {"id": "x", "type": "VBD"}})
        return {}

    peer = MemoryPeer(handler)
    peer_ref.append(peer)
    client = make_client(peer)
    seen: list[tuple[str, Any]] = []
    got = asyncio.Event()
    client.session.subscribe(lambda m, p: (seen.append((m, p)), got.set()))
    assert await client.get_objects({"type": "VBD"}) == []
    await asyncio.wait_for(got.wait(), 2)
    assert seen[0][0] == "all" and seen[0][1]["items"]["x"]["type"] == "VBD"
    await client.close()
    await peer.aclose()


async def test_reconnects_and_signs_in_again_after_the_socket_closes() -> None:
    peer = MemoryPeer(_answer_empty)
    client = make_client(peer)
    await client.ping()
    peer.links[0].drop()  # like XO closing the socket of an expired token
    await client.ping()
    assert peer.connects == 2
    assert [m["method"] for m in peer.received].count("session.signIn") == 2
    await client.close()
    await peer.aclose()


async def test_idempotent_call_is_retried_once_when_the_socket_drops_under_it() -> None:
    calls = {"n": 0}

    async def handler(method: str, params: dict[str, Any]) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise DropSocket()
        return {"v1": VDI}

    peer = MemoryPeer(handler)
    client = make_client(peer)
    assert (await client.get_vdi("v1")) is not None
    assert peer.connects == 2
    await client.close()
    await peer.aclose()


async def test_non_idempotent_call_is_not_retried_when_the_socket_drops() -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        raise DropSocket()

    peer = MemoryPeer(handler)
    client = make_client(peer)
    with pytest.raises(XoUnavailable, match="closed the connection during disk.create"):
        await client.create_disk("csi-x", 1024, "sr1")
    assert [m["method"] for m in peer.received].count("disk.create") == 1
    await client.close()
    await peer.aclose()


async def test_call_timeout_is_unavailable() -> None:
    never = asyncio.Event()

    async def handler(method: str, params: dict[str, Any]) -> Any:
        await never.wait()

    peer = MemoryPeer(handler)
    client = make_client(peer, timeout_s=0.05)
    with pytest.raises(XoUnavailable, match="did not answer xo.getAllObjects within 0.05s"):
        await client.ping()
    await client.close()
    await peer.aclose()


async def test_connect_timeout_is_unavailable() -> None:
    class Hanging:
        async def connect(self) -> Any:
            await asyncio.Event().wait()

    session = RpcSession(Hanging(), Credentials(token="t"), timeout_s=1, connect_timeout_s=0.05)
    with pytest.raises(XoUnavailable, match="timed out"):
        await XoClient(session).ping()


async def test_connect_refused_is_unavailable() -> None:
    class Refusing:
        async def connect(self) -> Any:
            raise ConnectionRefusedError(111, "Connection refused")

    session = RpcSession(Refusing(), Credentials(token="t"), timeout_s=1, connect_timeout_s=1)
    with pytest.raises(XoUnavailable, match="cannot connect to XO"):
        await XoClient(session).ping()


async def test_migrate_returns_new_uuid_or_finds_the_copy_on_old_xo() -> None:
    state = {"answer": "new-uuid"}

    async def handler(method: str, params: dict[str, Any]) -> Any:
        if method == "vdi.migrate":
            return state["answer"]
        if params["filter"].get("id") == "v1":
            return {}  # the source is gone once XO answered
        assert params["filter"] == {"type": "VDI", "name_label": "csi-a", "$SR": "sr2"}
        return {"v2": {**VDI, "id": "v2", "uuid": "v2", "$SR": "sr2"}}

    peer = MemoryPeer(handler)
    client = make_client(peer)
    source = Vdi.model_validate(VDI)
    assert await client.migrate_vdi(source, "sr2", timeout_s=5) == "new-uuid"
    state["answer"] = True  # type: ignore[assignment]
    assert await client.migrate_vdi(source, "sr2", timeout_s=5) == "v2"
    await client.close()
    await peer.aclose()


async def test_the_copy_slot_goes_back_when_xo_shows_the_copy_over_before_it_answers() -> None:
    """XO answers vdi.migrate of a detached disk only after moving the VBDs and destroying the source (more XAPI
    calls); the copy's I/O ended with VDI.copy. ``answered`` (the worker gives back its copy slots) runs once XO's
    cache shows the source's ``copy`` operation over, before XO answers, and once only. Before, only the answer
    ran it: here XO answers only after it ran, so the call would have waited for ever."""
    slots_back = asyncio.Event()
    calls: list[str] = []

    async def handler(method: str, params: dict[str, Any]) -> Any:
        if method == "vdi.migrate":
            peer.notify({"v1": {**VDI, "current_operations": {"t1": "copy"}}})
            peer.notify({"v1": {**VDI, "current_operations": {}}})  # VDI.copy returned
            await asyncio.wait_for(slots_back.wait(), 5)  # XO's VBD swap and VDI.destroy
            peer.notify_exit("v1")
            return "v2"
        if method == "vdi.set":
            return True
        if params["filter"].get("id") == "v1":
            return {}
        return {"v2": {**VDI, "id": "v2", "uuid": "v2", "$SR": "sr2", "name_description": "done"}}

    async def answered() -> None:
        calls.append("slots back")
        slots_back.set()

    peer = MemoryPeer(handler)
    client = make_client(peer)
    moved = await client.migrate_vdi_described(Vdi.model_validate(VDI), "sr2", "done", timeout_s=10,
                                               answered=answered)
    assert (moved.id, moved.name_description, calls) == ("v2", "done", ["slots back"])
    await client.close()
    await peer.aclose()


async def test_delete_of_a_missing_vdi_is_success() -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        if method == "server.getAll":
            return [{"id": "s1", "label": "Pool A", "status": "connected", "enabled": True}]
        raise RpcFault(1, "no such object v9", {"id": "v9", "type": "VDI"})

    peer = MemoryPeer(handler)
    client = make_client(peer)
    await client.delete_vdi("v9")
    await client.delete_vbd("b9")
    await client.close()
    await peer.aclose()


async def test_a_malformed_object_is_an_error_naming_the_field() -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        return {"v1": {"id": "v1", "type": "VDI", "size": "big"}}

    peer = MemoryPeer(handler)
    client = make_client(peer)
    with pytest.raises(XoError, match=r"Vdi object we cannot read \(fields: .*(size|\$SR)"):
        await client.get_vdi("v1")
    await client.close()
    await peer.aclose()


async def test_wait_until_wakes_on_a_notification() -> None:
    state = {"device": None}

    async def handler(method: str, params: dict[str, Any]) -> Any:
        return {"b": {"id": "b", "type": "VBD", "VM": "vm", "VDI": "v1", "device": state["device"]}}

    peer = MemoryPeer(handler)
    client = make_client(peer)

    async def check() -> str | None:
        vbds = await client.find_vbds(vm_id="vm")
        return vbds[0].device

    async def plug_later() -> None:
        await client.ping()
        state["device"] = "xvdb"  # type: ignore[assignment]
        peer.notify({"b": {"id": "b", "type": "VBD"}})

    waiter = asyncio.create_task(client.wait_until(check, timeout_s=30, max_interval_s=30))
    await plug_later()
    assert await waiter == "xvdb"
    assert await client.wait_until(lambda: asyncio.sleep(0, None), timeout_s=0.02) is None
    await client.close()
    await peer.aclose()


def test_secrets_never_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XOA_URL", "https://xo")
    monkeypatch.setenv("XOA_TOKEN", "tok-123456")
    monkeypatch.setenv("XOA_PASSWORD", "pw-654321")
    settings = XoSettings()
    assert "tok-123456" not in repr(settings) and "pw-654321" not in repr(settings)
    assert "tok-123456" not in repr(Credentials(token="tok-123456"))


def test_settings_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XOA_TOKEN", raising=False)
    monkeypatch.setenv("XOA_URL", "https://xo")
    with pytest.raises(ValueError, match="XOA_TOKEN, or XOA_USERNAME and XOA_PASSWORD"):
        XoSettings().require_credentials()


async def test_a_failing_notification_handler_does_not_wedge_the_session() -> None:
    peer_ref: list[MemoryPeer] = []

    async def handler(method: str, params: dict[str, Any]) -> Any:
        peer_ref[0].notify({"x": {"id": "x", "type": "VM"}})
        return {"v1": VDI}

    peer = MemoryPeer(handler)
    peer_ref.append(peer)
    client = make_client(peer, timeout_s=1.0)
    seen: list[str] = []

    def broken(method: str, params: Any) -> None:
        raise RuntimeError("subscriber bug")

    client.session.subscribe(broken)
    client.session.subscribe(lambda method, params: seen.append(method))
    for _ in range(3):
        assert (await client.get_vdi("v1")) is not None
    assert peer.connects == 1
    assert seen == ["all", "all", "all"]
    await client.close()
    await peer.aclose()


async def test_an_unreadable_frame_drops_only_that_link_and_the_next_call_reconnects() -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        return {"v1": VDI}

    peer = MemoryPeer(handler)
    client = make_client(peer, timeout_s=1.0)
    await client.ping()
    peer.links[0].unreadable()
    await eventually_true(lambda: client.session.connections_opened == 1 and client.session._connection is None)
    assert (await client.get_vdi("v1")) is not None
    assert peer.connects == 2
    await client.close()
    await peer.aclose()


async def test_a_late_close_of_an_old_link_does_not_fail_calls_on_the_new_one() -> None:
    release = asyncio.Event()

    async def handler(method: str, params: dict[str, Any]) -> Any:
        if params.get("filter", {}).get("slow"):
            await release.wait()
        return {"v1": VDI}

    peer = MemoryPeer(handler)
    client = make_client(peer, timeout_s=2.0)
    await client.ping()
    old = peer.links[0]
    old.unreadable()  # the reader of link 1 stops; the link itself is not closed yet
    await eventually_true(lambda: client.session._connection is None)
    slow = asyncio.create_task(client.get_objects({"type": "VDI", "slow": True}))
    await eventually_true(lambda: peer.connects == 2 and len(peer.received) >= 4)
    await old.close()  # the old link finally closes: the call on link 2 must not notice
    release.set()
    assert [o["id"] for o in await slow] == ["v1"]
    await client.close()
    await peer.aclose()


async def test_an_expired_token_says_so_and_how_to_make_a_new_one() -> None:
    peer = MemoryPeer(_answer_empty)
    client = make_client(peer, token="expired-token")
    with pytest.raises(XoAuthError, match=r"invalid or has expired.*token\.create expiresIn"):
        await client.ping()
    await client.close()
    await peer.aclose()


async def eventually_true(predicate: Any, timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_a_non_admin_account_is_refused_with_what_to_do() -> None:
    peer = MemoryPeer(_answer_empty)
    peer.user = {"id": "u2", "email": "viewer@example.org", "permission": "none"}
    client = make_client(peer)
    await client.ping()  # reading needs no role
    with pytest.raises(XoAuthError, match=r"viewer@example.org has permission 'none'; the controller needs an XO "
                                          r"admin account"):
        await client.require_admin("controller")
    with pytest.raises(XoAuthError):
        await client.ping()  # every later sign-in is checked too
    peer.user = {"id": "u1", "email": "admin@example.org", "permission": "admin"}
    await client.require_admin("controller")
    await client.close()
    await peer.aclose()


def _servers_peer(servers: list[dict[str, Any]], pools: list[str]) -> MemoryPeer:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        if method == "server.getAll":
            return servers
        if method == "xo.getAllObjects" and params["filter"] == {"type": "pool"}:
            return {pool: {"id": pool, "type": "pool"} for pool in pools}
        raise AssertionError(method)

    return MemoryPeer(handler)


POOL_A_SERVER = {"id": "s1", "label": "Pool A", "status": "connected", "enabled": True, "poolId": "pa"}


async def test_a_second_entry_of_a_pool_connected_through_another_hides_nothing() -> None:
    duplicate = {"id": "s2", "label": "Pool A again", "status": "disconnected", "enabled": True,
                 "error": {"message": "this pool is already connected", "poolId": "pa", "connectedServerId": "s1"}}
    peer = _servers_peer([POOL_A_SERVER, duplicate], ["pa"])
    client = make_client(peer)
    await client.check_view_complete("disk csi-a")
    await client.close()
    await peer.aclose()


@pytest.mark.parametrize(("servers", "pools", "message"), [
    ([POOL_A_SERVER, {"id": "s2", "label": "Pool B", "status": "disconnected", "enabled": False}], ["pa"],
     "XO is not connected to Pool B (disabled in XO: enable it, or remove it from XO's servers if that pool is gone "
     "for good): disk csi-a may be there but invisible until XO reconnects; retry later"),
    ([POOL_A_SERVER], [],
     "XO is still loading the objects of pool pa (connected, not yet in its cache): disk csi-a may be there but "
     "invisible until it has; retry later"),
], ids=["disabled", "loading"])
async def test_a_pool_xo_does_not_show_yet_makes_an_empty_lookup_unprovable(
        servers: list[dict[str, Any]], pools: list[str], message: str) -> None:
    peer = _servers_peer(servers, pools)
    client = make_client(peer)
    with pytest.raises(XoPoolDisconnected) as raised:
        await client.check_view_complete("disk csi-a")
    assert raised.value.message == message
    await client.close()
    await peer.aclose()
