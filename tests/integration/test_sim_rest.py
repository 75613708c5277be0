"""The simulator's REST API (/rest/v0) in plain mode: XO's authentication, statuses and error bodies, VDI
create/get/delete through the XAPI layer, content routes, busy VDIs, and the product client against it."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from dev.wait import eventually
from services.xo_simulator.server import SimulatorHandle
from services.xo_simulator.topology import derived_id
from shared import vhd
from shared.config import XoSettings
from shared.units import MiB
from shared.vhd_stream import ByteReader, iter_blocks, read_head
from shared.xo.errors import XoAuthError, XoBusy, XoNotFound, XoVdiInUse
from shared.xo.rest import XoRest
from shared.xo.streaming import Progress, stream_copy
from tests.support.sim import SR_LOCAL_A1, SR_LOCAL_A2, TOKEN, VM_A1, cached, client, running, uncached

pytestmark = pytest.mark.integration
XAPI_INFO = "This is a XenServer/XCP-ng error, not an XO error"
THICK_TOPOLOGY = {"tokens": [TOKEN], "pools": [{"name_label": "Pool A", "hosts": [{
    "name_label": "host-a1", "srs": [{"name_label": "Local A1", "size": "100GiB"},
                                     {"name_label": "lvm", "size": "100GiB", "SR_type": "lvm"}]}]}]}
THICK_SR = derived_id("sr", "Pool A", "host-a1", "lvm")
NO_LENGTH = "Trying to import a VDI without a length field. Please report this error to the Xen Orchestra team."


def _http(sim: SimulatorHandle, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{sim.http_url}/rest/v0", **options)


def _basic(pair: str, scheme: str = "Basic") -> dict[str, str]:
    return {"Authorization": f"{scheme} {base64.b64encode(pair.encode()).decode()}"}


async def _create(sim: SimulatorHandle, size: int = 64 * MiB, sr: str = SR_LOCAL_A1, **extra: Any) -> str:
    """POST a VDI and wait until XO's cache shows it: REST ``POST /vdis`` answers before (routes 404 until then)."""
    async with _http(sim, cookies={"authenticationToken": TOKEN}) as http:
        answer = await http.post("/vdis", json={"srId": sr, "virtual_size": size, **extra})
    assert answer.status_code == 201, answer.text
    vdi_id = str(answer.json()["id"])
    await cached(sim, vdi_id)
    return vdi_id


@pytest.mark.parametrize(("options", "status"), [
    ({"cookies": {"authenticationToken": TOKEN}}, 200),
    ({"cookies": {"token": TOKEN}}, 200),
    ({"headers": _basic("admin@example.org:admin")}, 200),
    ({"headers": _basic("admin@example.org:admin", scheme="Anything")}, 200),
    ({}, 401),
    ({"cookies": {"authenticationToken": "not-a-token"}}, 401),
    ({"headers": _basic("admin@example.org:wrong")}, 401),
    ({"headers": {"Authorization": "Basic %%%"}}, 401),
    ({"headers": _basic("no-colon")}, 401),
    ({"cookies": {"authenticationToken": TOKEN}, "headers": _basic("admin@example.org:admin")}, 400),
])
async def test_authentication_as_xo(options: dict[str, Any], status: int) -> None:
    async with running() as sim:
        vdi_id = await _create(sim)
        async with _http(sim, **options) as http:
            answer = await http.get(f"/vdis/{vdi_id}")
        vdi = sim.state.get(vdi_id)
    assert answer.status_code == status
    if status == 401:
        assert answer.headers["WWW-Authenticate"] == 'Basic realm="xo"'
        assert answer.json() == {"error": "invalid credentials"}
    elif status == 400:
        assert answer.json() == {"error": "Having multiple authentication methods is not supported"}
    else:
        assert answer.json() == vdi


async def test_post_creates_the_vdi_through_xapi_with_its_accounting() -> None:
    async with running() as sim:
        usage_before = sim.state.get(SR_LOCAL_A1)["usage"]
        async with _http(sim, cookies={"authenticationToken": TOKEN}) as http:
            answer = await http.post("/vdis", json={
                "srId": SR_LOCAL_A1, "virtual_size": 3 * MiB, "name_label": "csi-tmp",
                "name_description": "csi:info: {}", "tags": ["a", "b"]})
        assert answer.status_code == 201
        vdi_id = answer.json()["id"]
        assert answer.json() == {"id": vdi_id}
        assert answer.headers["Location"] == f"/rest/v0/vdis/{vdi_id}"
        vdi = sim.state.get(vdi_id)
        # 3 MiB asked: XAPI (sm's VHD rounding) makes whole 2 MiB blocks, 4 MiB
        assert (vdi["name_label"], vdi["name_description"], vdi["tags"], vdi["size"], vdi["$SR"]) == (
            "csi-tmp", "csi:info: {}", ["a", "b"], 4 * MiB, SR_LOCAL_A1)
        sr = sim.state.get(SR_LOCAL_A1)
        assert sr["usage"] == usage_before + 4 * MiB and vdi_id in sr["VDIs"]


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"virtual_size": MiB}, 422, "'srId' is required"),
    ({"srId": SR_LOCAL_A1}, 422, "'virtual_size' is required"),
    ({"srId": SR_LOCAL_A1, "virtual_size": "1"}, 422, "invalid 'virtual_size'"),
    ({"srId": SR_LOCAL_A1, "virtual_size": True}, 422, "invalid 'virtual_size'"),
    ({"srId": SR_LOCAL_A1, "virtual_size": -1}, 422, "invalid parameters"),
    ({"srId": SR_LOCAL_A1, "virtual_size": 1, "tags": [1]}, 422, "invalid parameters"),
    ({"srId": "nope", "virtual_size": MiB}, 404, "no such SR nope"),
    ({"srId": THICK_SR, "virtual_size": 1024**4}, 500, "SR_BACKEND_FAILURE_44(, There is insufficient space, )"),
])
async def test_post_refusals(body: dict[str, Any], status: int, error: str) -> None:
    # The thick (lvm) SR refuses what does not fit; thin SRs (ext, nfs) may be overcommitted, as on XCP-ng.
    async with running(THICK_TOPOLOGY) as sim, _http(sim, cookies={"authenticationToken": TOKEN}) as http:
        vdis_before = len(list(sim.state.of_type("VDI")))
        answer = await http.post("/vdis", json=body)
        assert len(list(sim.state.of_type("VDI"))) == vdis_before
    assert answer.status_code == status
    assert answer.json()["error"] == error
    assert ("info" in answer.json()) == (status == 500)


async def test_post_with_a_body_that_is_not_json_is_400() -> None:
    async with running() as sim, _http(sim, cookies={"authenticationToken": TOKEN}) as http:
        answer = await http.post("/vdis", content=b"{nope", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"].startswith("invalid JSON body")


async def test_delete_destroys_and_refuses_an_attached_vdi() -> None:
    async with running() as sim, client(sim) as rpc, _http(sim, cookies={"authenticationToken": TOKEN}) as http:
        free, attached = await _create(sim), await _create(sim)
        usage = sim.state.get(SR_LOCAL_A1)["usage"]
        await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": attached})
        assert (await http.delete(f"/vdis/{free}")).status_code == 204
        await uncached(sim, free)  # REST DELETE answers before XO's cache drops the VDI
        assert (await http.get(f"/vdis/{free}")).status_code == 404
        assert sim.state.get(SR_LOCAL_A1)["usage"] == usage - 64 * MiB
        refused = await http.delete(f"/vdis/{attached}")
        assert refused.status_code == 500
        assert refused.json() == {"error": f"VDI_IN_USE({attached}, destroy)", "info": XAPI_INFO}
        assert attached in sim.state


async def test_unknown_ids_and_formats() -> None:
    async with running() as sim, _http(sim, cookies={"authenticationToken": TOKEN}) as http:
        vdi_id = await _create(sim)
        missing = await http.get("/vdis/nope.vhd")
        assert missing.status_code == 404
        assert missing.json() == {"error": "no such VDI nope", "data": {"id": "nope", "type": "VDI"}}
        assert (await http.put("/vdis/nope.raw", content=b"x")).status_code == 404
        for method in ("GET", "PUT"):
            answer = await http.request(method, f"/vdis/{vdi_id}.qcow2", content=b"x" if method == "PUT" else None)
            assert answer.status_code == 422
            assert answer.json()["error"] == "invalid format 'qcow2'"
        no_route = [await http.delete(f"/vdis/{vdi_id}.vhd"), await http.put(f"/vdis/{vdi_id}", content=b"x")]
        assert [(a.status_code, a.json()["error"]) for a in no_route] == [
            (404, f"Cannot DELETE /rest/v0/vdis/{vdi_id}.vhd"), (404, f"Cannot PUT /rest/v0/vdis/{vdi_id}")]
        assert vdi_id in sim.state


async def test_an_import_without_content_length_is_refused_as_xo_does() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"\0" * 4096

    async with running() as sim, _http(sim, cookies={"authenticationToken": TOKEN}) as http:
        vdi_id = await _create(sim)
        answer = await http.put(f"/vdis/{vdi_id}.raw", content=body())  # chunked: no Content-Length
    assert answer.request.headers["Transfer-Encoding"] == "chunked"
    assert answer.status_code == 500
    assert answer.json() == {"error": NO_LENGTH}


async def test_content_of_an_attached_vdi_is_refused_both_ways() -> None:
    async with running() as sim, client(sim) as rpc, _http(sim, cookies={"authenticationToken": TOKEN}) as http:
        vdi_id = await _create(sim)
        await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": vdi_id})
        ref = sim.state.get(vdi_id)["_xapiRef"]
        exported = await http.get(f"/vdis/{vdi_id}.vhd")
        imported = await http.put(f"/vdis/{vdi_id}.raw", content=b"\0" * 512)
    assert (exported.status_code, exported.json()) == (500, {"error": f"VDI_IN_USE({ref}, export)", "info": XAPI_INFO})
    assert (imported.status_code, imported.json()) == (500, {"error": f"VDI_IN_USE({ref}, import)", "info": XAPI_INFO})


async def test_plain_mode_exports_an_empty_vhd_and_zeros_without_length() -> None:
    async with running() as sim, _http(sim, cookies={"authenticationToken": TOKEN}) as http:
        vdi_id = await _create(sim, size=6 * MiB)
        async with http.stream("GET", f"/vdis/{vdi_id}.vhd") as answer:
            assert answer.status_code == 200
            headers = answer.headers
            reader = ByteReader(answer.aiter_bytes())
            head, _ = await read_head(reader)
            blocks = [block async for block in iter_blocks(head, reader)]
        raw = await http.get(f"/vdis/{vdi_id}.raw")
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"] == f"attachment; filename={vdi_id}.vhd"
    assert (head.footer.current_size, blocks, reader.position) == (6 * MiB, [], vhd.stream_length(6 * MiB, 0))
    assert "content-length" not in raw.headers and raw.content == bytes(6 * MiB)


async def test_a_vdi_is_in_use_while_exported_and_free_once_the_client_lets_go() -> None:
    """An export plugs the VDI into a control domain (read-only): a second export shares it, a delete is VDI_IN_USE
    (XAPI's answer to destroying a plugged VDI) until the client lets go."""
    async with running() as sim, _http(sim, cookies={"authenticationToken": TOKEN}) as http:
        vdi_id = await _create(sim, size=256 * MiB)
        async with http.stream("GET", f"/vdis/{vdi_id}.raw") as export:
            body = export.aiter_bytes()  # keep a reference: a collected iterator closes the response
            await anext(body)
            async with http.stream("GET", f"/vdis/{vdi_id}.vhd") as second:
                status = second.status_code
            delete = await http.delete(f"/vdis/{vdi_id}")
        assert status == 200
        assert (delete.status_code, delete.json()) == (500, {"error": f"VDI_IN_USE({vdi_id}, destroy)",
                                                               "info": XAPI_INFO})

        async def deleted() -> bool:
            return (await http.delete(f"/vdis/{vdi_id}")).status_code == 204

        await eventually(deleted, timeout_s=10)
        assert vdi_id not in sim.state


async def test_the_client_against_the_simulator() -> None:
    async with running() as sim, client(sim) as rpc:
        async with XoRest.from_settings(XoSettings(url=sim.url, token=TOKEN)) as rest:
            vdi_id = await rest.create_vdi(SR_LOCAL_A1, 8 * MiB, "from-rest", "described")  # once XO shows it
            vdi = await rest.get_vdi(vdi_id)
            assert vdi is not None and (vdi.name_label, vdi.name_description, vdi.size, vdi.sr_id) == (
                "from-rest", "described", 8 * MiB, SR_LOCAL_A1)
            assert await rest.get_vdi("nope") is None
            with pytest.raises(XoNotFound, match="no such VDI nope"):
                await rest.delete_vdi("nope")
            await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": vdi_id})
            with pytest.raises(XoVdiInUse, match=r"VDI_IN_USE\(OpaqueRef:.*, import\)"):
                await rest.import_(vdi_id, "raw", 3, _once(b"abc"))
            with pytest.raises(XoVdiInUse):
                await rest.delete_vdi(vdi_id)
        async with XoRest.from_settings(XoSettings(url=sim.url, token="wrong-token")) as rest:
            with pytest.raises(XoAuthError, match=r"\(HTTP 401\): invalid credentials"):
                await rest.get_vdi(vdi_id)


async def test_an_export_of_a_vdi_being_imported_is_busy() -> None:
    async with running() as sim, XoRest.from_settings(XoSettings(url=sim.url, token=TOKEN)) as rest:
        vdi_id = await _create(sim, size=8 * MiB)
        release = asyncio.Event()
        importing = asyncio.create_task(rest.import_(vdi_id, "raw", 8 * MiB, _held(release, 8 * MiB)))
        await eventually(lambda: sim.simulator.stats.active_streams == 1, 10)
        with pytest.raises(XoBusy, match="OTHER_OPERATION_IN_PROGRESS"):
            async with rest.export(vdi_id, "raw"):
                pass
        release.set()
        await importing


async def _held(release: asyncio.Event, size: int) -> AsyncIterator[bytes]:
    """A body of ``size`` zeros whose second half waits for ``release``."""
    yield bytes(size // 2)
    await release.wait()
    yield bytes(size - size // 2)


async def test_progress_reports_start_steps_and_end() -> None:
    async with running() as sim, XoRest.from_settings(XoSettings(url=sim.url, token=TOKEN)) as rest:
        src, dst = await _create(sim, size=32 * MiB), await _create(sim, size=32 * MiB, sr=SR_LOCAL_A2)
        every: list[Progress] = []
        sparse: list[Progress] = []

        async def record_every(progress: Progress) -> None:
            every.append(progress)

        async def record_sparse(progress: Progress) -> None:
            sparse.append(progress)

        result = await stream_copy(rest, src, dst, "raw", progress=record_every, progress_interval_s=0)
        await stream_copy(rest, src, dst, "raw", progress=record_sparse, progress_interval_s=3600)
    assert result.bytes_sent == 32 * MiB
    assert (every[0].done_bytes, every[-1].done_bytes) == (0, 32 * MiB)
    assert all(p.total_bytes == 32 * MiB for p in every) and len(every) > 3
    assert [p.done_bytes for p in every] == sorted(p.done_bytes for p in every)
    assert every[-1].rate_bps > 0
    assert [(p.done_bytes, p.total_bytes) for p in sparse] == [(0, 32 * MiB), (32 * MiB, 32 * MiB)]


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
    await asyncio.sleep(0)
