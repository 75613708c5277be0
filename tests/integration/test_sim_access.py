"""Users, permissions, masked errors and tokens: a non-admin reads everything, writes nothing, sees no XAPI detail."""

from __future__ import annotations

import time

import aiohttp
import pytest

from dev.wait import eventually
from shared.units import MiB
from tests.support.sim import (
    SR_LOCAL_A1,
    SR_LOCAL_A2,
    TOKEN,
    VIEWER_TOKEN,
    VM_A1,
    RpcClient,
    RpcError,
    cached,
    client,
    running,
)

pytestmark = pytest.mark.integration
MASKED = {"code": -32000, "message": "unknown error from the peer"}


async def test_a_viewer_signs_in_with_permission_none_and_reads_everything() -> None:
    async with running() as sim, client(sim) as admin:
        for credentials in ({"token": VIEWER_TOKEN}, {"email": "viewer@example.org", "password": "viewer"}):
            async with client(sim, signed_in=False) as viewer:
                user = await viewer.call("session.signIn", credentials)
                assert (user["email"], user["permission"]) == ("viewer@example.org", "none")
                assert await viewer.call("session.getUser") == user
                assert (await viewer.call("xo.getAllObjects")).keys() == (await admin.call("xo.getAllObjects")).keys()
        assert (await admin.call("session.getUser"))["permission"] == "admin"


async def test_a_viewer_gets_code_2_on_every_write_after_code_1_for_unknown_ids() -> None:
    async with running() as sim, client(sim) as admin, client(sim, token=VIEWER_TOKEN) as viewer:
        vdi_id = await admin.call("disk.create", {"name": "d", "size": MiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        await cached(sim, vbd_id)
        denied = [
            ("disk.create", {"name": "x", "size": MiB, "sr": SR_LOCAL_A1}, SR_LOCAL_A1, "SR"),
            ("disk.create", {"name": "x", "size": MiB, "sr": SR_LOCAL_A1, "vm": VM_A1}, VM_A1, "VM"),
            ("vdi.set", {"id": vdi_id, "name_label": "x"}, vdi_id, "VDI"),
            ("vdi.delete", {"id": vdi_id}, vdi_id, "VDI"),
            ("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2}, vdi_id, "VDI"),
            ("vm.attachDisk", {"vm": VM_A1, "vdi": vdi_id}, VM_A1, "VM"),
            ("vbd.connect", {"id": vbd_id}, vbd_id, "VBD"),
            ("vbd.disconnect", {"id": vbd_id}, vbd_id, "VBD"),
            ("vbd.delete", {"id": vbd_id}, vbd_id, "VBD"),
        ]
        for method, params, obj_id, obj_type in denied:
            with pytest.raises(RpcError) as info:
                await viewer.call(method, params)
            assert info.value.error == {"code": 2, "message": "not enough permissions", "data": {
                "permission": "administrate", "object": {"id": obj_id, "type": obj_type}}}, method
        missing = "00000000-0000-0000-0000-000000000000"
        with pytest.raises(RpcError) as info:
            await viewer.call("vdi.delete", {"id": missing})
        assert info.value.code == 1
        assert sim.state.get(vbd_id)["attached"] is True and sim.simulator.stats.calls["vdi.delete"] == 2


async def test_xapi_and_plain_errors_are_masked_for_non_admins_and_xo_codes_pass() -> None:
    faults = [{"method": "xo.getAllObjects", "xapi": "SR_BACKEND_FAILURE_46", "xapi_params": ["", "x", ""],
               "count": 2},
              {"method": "session.getUser", "error": {"code": 17, "message": "VDI in use",
                                                      "data": {"objectId": "x", "operation": "destroy"}}}]
    async with running(faults=faults) as sim, client(sim) as admin, client(sim, token=VIEWER_TOKEN) as viewer:
        with pytest.raises(RpcError) as info:
            await admin.call("xo.getAllObjects")
        assert info.value.xapi_code == "SR_BACKEND_FAILURE_46"
        with pytest.raises(RpcError) as info:
            await viewer.call("xo.getAllObjects")
        assert info.value.error == MASKED
        for rpc in (admin, viewer):
            with pytest.raises(RpcError) as info:
                await rpc.call("session.getUser")
            assert info.value.error["code"] == 17 and info.value.data["operation"] == "destroy"
        with pytest.raises(RpcError) as info:
            await viewer.call("token.create", {"expiresIn": 1000})
        assert info.value.error == MASKED
        with pytest.raises(RpcError) as info:
            await admin.call("token.create", {"expiresIn": 1000})
        assert info.value.error["message"] == "invalid expiresIn duration: 1000"


@pytest.mark.parametrize(("expires_in", "message"), [
    (59_999, "invalid expiresIn duration: 59999"),
    ("59s", "invalid expiresIn duration: 59s"),
    ("1 year", "too high expiresIn duration: 1 year"),
    ("soon", "not a valid duration: undefined"),
])
async def test_token_create_refuses_durations_xo_refuses(expires_in: object, message: str) -> None:
    async with running() as sim, client(sim) as admin:
        with pytest.raises(RpcError) as info:
            await admin.call("token.create", {"expiresIn": expires_in})
        assert info.value.error == {"code": -32000, "message": message, "data": {"name": "Error", "message": message}}


async def test_token_create_makes_a_token_of_the_current_user_and_refreshes_per_client() -> None:
    async with running() as sim, client(sim, token=VIEWER_TOKEN) as viewer:
        token = await viewer.call("token.create", {"description": "csi", "expiresIn": "1h"})
        assert isinstance(token, str) and len(token) == 43
        async with client(sim, token=token) as again:
            assert (await again.call("session.getUser"))["email"] == "viewer@example.org"
        first = await viewer.call("token.create", {"client": {"id": "node-1"}, "expiresIn": 3_600_000})
        assert await viewer.call("token.create", {"client": {"id": "node-1"}}) == first
        assert await viewer.call("token.create", {"client": {"id": "node-2"}}) not in (first, token)


async def test_an_expired_token_is_code_3_and_a_socket_using_it_is_closed_at_its_next_message() -> None:
    topology = {"tokens": ["sim-token", {"token": "short", "expires_in_s": 2}],
                "pools": [{"name_label": "P", "hosts": [{"name_label": "h"}]}]}
    async with running(topology, admin=True) as sim:
        started = time.time()
        short = await RpcClient.open(sim.url)
        assert (await short.sign_in("short"))["permission"] == "admin"
        assert await short.call("system.getServerVersion")
        await eventually(lambda: time.time() > started + 2.05, timeout_s=5)  # the token's own clock
        with pytest.raises(ConnectionError):
            await short.call("system.getServerVersion")  # no answer: the server closes the socket
        assert short.ws.close_code == 1000 and short.raw_replies == []
        assert sim.simulator.stats.expired_sessions == 1
        async with client(sim, signed_in=False) as late:
            with pytest.raises(RpcError) as info:
                await late.call("session.signIn", {"token": "short"})
            assert info.value.error == {"code": 3, "message": "invalid credentials"}
            assert (await late.sign_in(TOKEN))["email"] == "admin@example.org"  # no expiry on plain tokens
        await short.close()
        async with aiohttp.ClientSession() as http, http.get(f"{sim.http_url}/_sim/stats") as response:
            assert (await response.json())["expired_sessions"] == 1
