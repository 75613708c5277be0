"""XoRest against httpx's transport seam (httpx.MockTransport): URLs, authentication, the exact request on the
wire, error translation into the XoError tree, and secrets kept out of every error and log line."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from shared.config import XoSettings
from shared.logging import get_logger
from shared.xo.errors import (
    XoAuthError,
    XoBusy,
    XoError,
    XoInvalidParameters,
    XoNoSpace,
    XoNotFound,
    XoUnavailable,
    XoVdiInUse,
)
from shared.xo.rest import XoRest
from tests.support.logs import configured_logging

TOKEN = "tok-3f9a1c0b7e5d4a2b9c8d7e6f5a4b3c2d"
PASSWORD = "pw-8e7d6c5b4a39281706f5e4d3c2b1a0"
VDI = "6a1f3b2c-0d4e-4f5a-8b6c-7d8e9f0a1b2c"
SR = "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"

Handler = Callable[[httpx.Request], httpx.Response]


def _rest(handler: Handler, *, token: bool = True) -> XoRest:
    settings = (XoSettings(url="https://xo.example.org", token=TOKEN) if token
                else XoSettings(url="https://xo.example.org", username="admin@example.org", password=PASSWORD))
    return XoRest.from_settings(settings, transport=httpx.MockTransport(handler))


def _recorder(status: int, body: object = None) -> tuple[list[httpx.Request], Handler]:
    """A handler that keeps every request in the list returned with it and answers each with ``status`` and the
    JSON ``body`` (no body when None)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body)

    return seen, handler


def _vdi_json(**extra: object) -> dict[str, object]:
    return {"id": VDI, "uuid": VDI, "type": "VDI", "$pool": "p", "$SR": SR, "size": 1024, **extra}


async def test_a_token_goes_in_the_authentication_cookie_only() -> None:
    seen, handler = _recorder(200, _vdi_json())

    async with _rest(handler) as rest:
        vdi = await rest.get_vdi(VDI)
    assert vdi is not None and vdi.sr_id == SR
    assert str(seen[0].url) == f"https://xo.example.org/rest/v0/vdis/{VDI}"
    assert seen[0].headers["cookie"] == f"authenticationToken={TOKEN}"
    assert "authorization" not in seen[0].headers


async def test_a_password_goes_in_basic_auth_only() -> None:
    seen, handler = _recorder(204)

    async with _rest(handler, token=False) as rest:
        await rest.delete_vdi(VDI)
    assert seen[0].method == "DELETE"
    expected = base64.b64encode(f"admin@example.org:{PASSWORD}".encode()).decode()
    assert seen[0].headers["authorization"] == f"Basic {expected}"
    assert "cookie" not in seen[0].headers


async def test_create_vdi_posts_xo_fields_and_returns_the_id_once_xo_shows_it() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(201, json={"id": VDI}, headers={"Location": f"/rest/v0/vdis/{VDI}"})
        if len(seen) < 4:  # XO's cache shows the new VDI only after a while: 404 meanwhile
            return httpx.Response(404, json={"error": f"no such VDI {VDI}", "data": {"id": VDI, "type": "VDI"}})
        return httpx.Response(200, json={"id": VDI, "type": "VDI", "$SR": SR, "size": 8 * 1024**3})

    async with _rest(handler) as rest:
        assert await rest.create_vdi(SR, 8 * 1024**3, "csi-tmp", "csi:info: {}") == VDI
    assert [(r.method, r.url.path) for r in seen] == [("POST", "/rest/v0/vdis")] + [("GET", f"/rest/v0/vdis/{VDI}")] * 3
    assert json.loads(seen[0].content) == {"srId": SR, "virtual_size": 8 * 1024**3, "name_label": "csi-tmp",
                                           "name_description": "csi:info: {}"}


async def test_get_vdi_is_none_on_404_and_delete_is_not_found() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": f"no such VDI {VDI}", "data": {"id": VDI, "type": "VDI"}})

    async with _rest(handler) as rest:
        assert await rest.get_vdi(VDI) is None
        with pytest.raises(XoNotFound) as caught:
            await rest.delete_vdi(VDI)
    assert str(caught.value) == f"XO deletion of VDI {VDI} failed (HTTP 404): no such VDI {VDI}"
    assert caught.value.data == {"id": VDI, "type": "VDI"}


@pytest.mark.parametrize(("status", "body", "cls", "xapi_code"), [
    (401, {"error": "invalid credentials"}, XoAuthError, None),
    (403, {"error": "not enough permissions"}, XoAuthError, None),
    (422, {"error": "invalid parameters", "data": {"errors": []}}, XoInvalidParameters, None),
    (500, {"error": "SR_BACKEND_FAILURE_44(, There is insufficient space, )", "info": "x"}, XoNoSpace,
     "SR_BACKEND_FAILURE_44"),
    (500, {"error": "VDI_IN_USE(OpaqueRef:1, destroy)"}, XoVdiInUse, "VDI_IN_USE"),
    (500, {"error": "OTHER_OPERATION_IN_PROGRESS(VDI, OpaqueRef:1)"}, XoBusy, "OTHER_OPERATION_IN_PROGRESS"),
    (500, {"error": "Trying to import a VDI without a length field."}, XoError, None),
    (503, {"error": "service unavailable"}, XoUnavailable, None),
    (502, "<html>bad gateway</html>", XoError, None),
])
async def test_statuses_become_xo_errors(status: int, body: object, cls: type[XoError], xapi_code: str | None) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    async with _rest(handler) as rest:
        with pytest.raises(XoError) as caught:
            await rest.create_vdi(SR, 1024, "x")
    assert type(caught.value) is cls
    assert caught.value.xapi_code == xapi_code
    shown = body if isinstance(body, str) else str(body["error"])  # type: ignore[index]
    assert str(caught.value) == f"XO VDI creation on SR {SR} failed (HTTP {status}): {shown}"


@pytest.mark.parametrize(("raised", "message"), [
    (httpx.ConnectError("All connection attempts failed"), "ConnectError: All connection attempts failed"),
    (httpx.ReadTimeout(""), "ReadTimeout"),
    (httpx.RemoteProtocolError("peer closed connection"), "RemoteProtocolError: peer closed connection"),
])
async def test_transport_failures_are_unavailable(raised: httpx.HTTPError, message: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    async with _rest(handler) as rest:
        with pytest.raises(XoUnavailable) as caught:
            await rest.get_vdi(VDI)
    assert str(caught.value) == f"XO lookup of VDI {VDI} failed: {message}"
    assert caught.value.retryable


async def test_import_sends_an_exact_content_length_never_chunked() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        await request.aread()
        return httpx.Response(204)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"defgh"

    async with _rest(handler) as rest:  # type: ignore[arg-type]
        await rest.import_(VDI, "raw", 8, chunks())
    assert (seen[0].method, seen[0].url.path) == ("PUT", f"/rest/v0/vdis/{VDI}.raw")
    assert seen[0].headers["content-length"] == "8"
    assert "transfer-encoding" not in seen[0].headers
    assert seen[0].content == b"abcdefgh"


@pytest.mark.parametrize(("parts", "cls", "message"), [
    ([b"abc", b"defghi"], XoError, "is longer than its announced 8 bytes"),
    ([b"abc"], XoUnavailable, "ended after 3 of 8 bytes"),
])
async def test_import_refuses_a_body_of_another_length(parts: list[bytes], cls: type[XoError], message: str) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        return httpx.Response(204)

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with _rest(handler) as rest:  # type: ignore[arg-type]
        with pytest.raises(cls, match=message):
            await rest.import_(VDI, "vhd", 8, chunks())


async def test_export_streams_and_closing_it_closes_the_response() -> None:
    closed: list[bool] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for part in (b"one", b"two", b"three"):
                yield part

        async def aclose(self) -> None:
            closed.append(True)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/rest/v0/vdis/{VDI}.vhd"
        return httpx.Response(200, stream=Body())

    async with _rest(handler) as rest:
        async with rest.export(VDI, "vhd") as chunks:
            first = await anext(aiter(chunks))
        assert first == b"one" and closed == [True]


async def test_an_export_refused_by_xo_raises_before_any_byte() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": "VDI_IN_USE(OpaqueRef:9, export)", "info": "xapi"})

    async with _rest(handler) as rest:
        with pytest.raises(XoVdiInUse, match=r"export of VDI .* as raw failed \(HTTP 500\): VDI_IN_USE"):
            async with rest.export(VDI, "raw"):
                pytest.fail("no body expected")


async def test_an_unknown_format_is_refused_locally() -> None:
    async with _rest(lambda request: httpx.Response(200)) as rest:
        with pytest.raises(ValueError, match="format 'qcow2' is not one of vhd, raw"):
            async with rest.export(VDI, "qcow2"):  # type: ignore[arg-type]
                pass


async def test_no_secret_in_errors_reprs_or_logs(capsys: pytest.CaptureFixture[str]) -> None:
    failures: list[BaseException] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "invalid credentials"})

    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("All connection attempts failed", request=request)

    with configured_logging("debug", json=True):
        log = get_logger("test")
        for handler in (refuse, broken):
            for token in (True, False):
                rest = _rest(handler, token=token)
                try:
                    await rest.get_vdi(VDI)
                except XoError as exc:
                    failures.append(exc)
                    log.exception("xo_rest_failed", error=str(exc))
                assert TOKEN not in repr(rest) and PASSWORD not in repr(rest)
                await rest.close()
        text = "".join(_chain(exc) for exc in failures) + capsys.readouterr().err
    assert len(failures) == 4 and [type(exc) for exc in failures] == [XoAuthError, XoAuthError, XoUnavailable,
                                                                     XoUnavailable]
    assert text.count('"event": "xo_rest_failed"') == 4  # the lines were written, with tracebacks
    assert TOKEN not in text and PASSWORD not in text
    assert base64.b64encode(f"admin@example.org:{PASSWORD}".encode()).decode() not in text


def _chain(exc: BaseException | None) -> str:
    text = io.StringIO()
    while exc is not None:
        text.write(f"{exc!s} {exc!r} {exc.args!r}\n")
        exc = exc.__cause__ or exc.__context__
    return text.getvalue()

