"""XO simulator protocol: JSON-RPC framing, sign-in, XO error codes, parameter rules."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.support.sim import SR_LOCAL_A1, RpcClient, RpcError, client, running

pytestmark = pytest.mark.integration

USER_KEYS = {"id", "email", "permission", "groups", "preferences", "authProviders"}


async def test_sign_in_with_token_password_and_aliases_returns_the_public_user() -> None:
    async with running() as sim:
        for method, params in [
            ("session.signIn", {"token": "sim-token"}),
            ("session.signIn", {"email": "admin@example.org", "password": "admin"}),
            ("session.signIn", {"username": "admin@example.org", "password": "admin"}),
            ("session.signInWithToken", {"token": "sim-token"}),
            ("session.signInWithPassword", {"email": "admin@example.org", "password": "admin"}),
        ]:
            async with client(sim, signed_in=False) as rpc:
                user = await rpc.call(method, params)
                assert set(user) == USER_KEYS
                assert (user["email"], user["permission"], user["groups"]) == ("admin@example.org", "admin", [])
                assert await rpc.call("session.getUser") == user


@pytest.mark.parametrize("params", [{"token": "nope"}, {"email": "admin@example.org", "password": "bad"}, {}])
async def test_bad_credentials_give_code_3_without_data(params: dict) -> None:
    async with running() as sim, client(sim, signed_in=False) as rpc:
        with pytest.raises(RpcError) as info:
            await rpc.call("session.signIn", params)
        assert info.value.error == {"code": 3, "message": "invalid credentials"}


async def test_empty_password_is_hidden_from_an_anonymous_caller() -> None:
    async with running() as sim, client(sim, signed_in=False) as rpc:
        with pytest.raises(RpcError) as info:
            await rpc.call("session.signIn", {"email": "admin@example.org", "password": ""})
        assert info.value.error == {"code": -32000, "message": "unknown error from the peer"}


async def test_calls_before_sign_in_give_code_2() -> None:
    async with running() as sim, client(sim, signed_in=False) as rpc:
        with pytest.raises(RpcError) as info:
            await rpc.call("xo.getAllObjects")
        assert info.value.error == {"code": 2, "message": "not enough permissions", "data": {"object": {}}}
        assert rpc.notifications == []  # anonymous sockets get no events


async def test_unknown_method_gives_32601_with_the_name_as_data() -> None:
    async with running() as sim, client(sim) as rpc:
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.frobnicate", {})
        assert info.value.error == {"code": -32601, "message": "method not found: vdi.frobnicate",
                                    "data": "vdi.frobnicate"}


async def test_unknown_parameter_gives_code_10_and_question_mark_keys_are_dropped() -> None:
    async with running() as sim, client(sim) as rpc:
        with pytest.raises(RpcError) as info:
            await rpc.call("disk.create", {"name": "x", "size": 1, "sr": SR_LOCAL_A1, "colour": "red"})
        assert info.value.code == 10
        assert info.value.data["errors"][0]["params"] == {"additionalProperty": "colour"}
        vdi = await rpc.call("disk.create", {"name": "x", "size": 1, "sr": SR_LOCAL_A1, "colour?": "red"})
        assert vdi in sim.state


@pytest.mark.parametrize(("params", "path"), [
    ({"name": "", "size": 1, "sr": SR_LOCAL_A1}, "/name"),
    ({"name": "x", "size": True, "sr": SR_LOCAL_A1}, "/size"),
    ({"name": "x", "size": "lots", "sr": SR_LOCAL_A1}, "/size"),
    ({"name": "x", "sr": SR_LOCAL_A1}, ""),
])
async def test_bad_parameter_values_give_code_10(params: dict, path: str) -> None:
    async with running() as sim, client(sim) as rpc:
        with pytest.raises(RpcError) as info:
            await rpc.call("disk.create", params)
        assert info.value.code == 10
        assert info.value.data["errors"][0]["instancePath"] == path


async def test_unknown_or_mistyped_id_gives_code_1() -> None:
    async with running() as sim, client(sim) as rpc:
        missing = "00000000-0000-0000-0000-000000000000"
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.migrate", {"id": missing, "sr_id": SR_LOCAL_A1})
        assert info.value.error == {"code": 1, "message": f"no such VDI,VDI-snapshot {missing}",
                                    "data": {"id": missing, "type": ["VDI", "VDI-snapshot"]}}
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.delete", {"id": missing})  # resolves a VDI or a VDI-snapshot, as XO does
        assert info.value.data == {"id": missing, "type": ["VDI", "VDI-snapshot"]}
        with pytest.raises(RpcError) as info:
            await rpc.call("xo.getAllObjects", {"limit": "2"})  # a number, not a string
        assert info.value.data["errors"][0]["message"] == "must be number"
        with pytest.raises(RpcError) as info:
            await rpc.call("vdi.delete", {"id": SR_LOCAL_A1})  # an SR is not a VDI
        assert info.value.code == 1


async def test_namespace_key_stands_for_id_and_void_methods_return_true() -> None:
    async with running() as sim, client(sim) as rpc:
        vdi = await rpc.call("disk.create", {"name": "x", "size": "1MiB", "sr": SR_LOCAL_A1})
        assert await rpc.call("vdi.set", {"vdi": vdi, "name_label": "y"}) is True
        assert sim.state.get(vdi)["name_label"] == "y"


async def test_framing_errors_batches_and_json_rpc_1_messages() -> None:
    async with running() as sim, client(sim) as rpc:
        assert (await rpc.send_text("{nope"))["error"]["code"] == -32700
        assert (await rpc.send_text(json.dumps({"jsonrpc": "2.0", "id": 9, "method": 42})))["error"]["code"] == -32600
        assert (await rpc.send_text("[]"))["error"]["code"] == -32600
        batch = await rpc.send_text(json.dumps([
            {"jsonrpc": "2.0", "id": "a", "method": "system.getServerVersion", "params": {}},
            {"jsonrpc": "2.0", "id": "b", "method": "nope.nope"},
            {"jsonrpc": "2.0", "method": "system.getServerVersion"},  # notification: no reply
        ]))
        assert isinstance(batch, list) and [r["id"] for r in batch] == ["a", "b"]
        assert isinstance(batch[0]["result"], str) and batch[1]["error"]["code"] == -32601
        old_style = await rpc.request({"id": 77, "method": "system.getServerVersion", "params": {}})
        assert old_style["id"] == 77 and "result" in old_style


async def test_plain_http_on_api_is_not_json_rpc() -> None:
    async with running() as sim, aiohttp.ClientSession() as http:
        async with http.post(f"{sim.http_url}/api/", json={"method": "x"}) as response:
            assert response.status == 405
        async with http.get(f"{sim.http_url}/api/") as response:
            assert response.status == 400


async def test_ndjson_returns_a_one_shot_url() -> None:
    async with running() as sim, client(sim) as rpc, aiohttp.ClientSession() as http:
        result = await rpc.call("xo.getAllObjects", {"filter": {"type": "host"}, "ndjson": True})
        url = f"{sim.http_url}{result['$getFrom']}"
        async with http.get(url) as response:
            lines = (await response.text()).splitlines()
        assert sorted(json.loads(line)["name_label"] for line in lines) == ["host-a1", "host-a2"]
        async with http.get(url) as response:
            assert response.status == 404


async def test_open_socket_close_without_calls_is_clean() -> None:
    async with running() as sim:
        rpc = await RpcClient.open(sim.url)
        await rpc.close()
        assert rpc.closed.is_set()
