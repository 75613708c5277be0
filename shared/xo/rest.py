"""XoRest: XO's REST API (``/rest/v0``) on httpx, for what JSON-RPC cannot do: a disk's content out and in.

Built from the same XoSettings as the JSON-RPC client. Authentication: the ``authenticationToken`` cookie
(token) or HTTP Basic (username/password), never both (XO answers 400). Every wait is bounded: JSON calls by
``timeout_s``; streams by an inactivity timeout (no byte read or written for ``idle_timeout_s``). Errors are
translated once, here, into the XoError tree (shared/xo/errors.py); no httpx type escapes. The token and the
password never appear in an error or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from pydantic import ValidationError

from shared.backoff import Backoff
from shared.config import XoSettings
from shared.logging import get_logger
from shared.xo.errors import XoError, XoNotFound, XoUnavailable, from_rest_error
from shared.xo.models import Vdi
from shared.xo.transport import tls_context

log = get_logger(__name__)

Format = Literal["vhd", "raw"]
FORMATS: tuple[Format, ...] = ("vhd", "raw")
MAX_ERROR_BODY_BYTES = 64 * 1024
SEND_BYTES = 1024 * 1024


def rest_url(base_url: str) -> str:
    """``https://xo`` -> ``https://xo/rest/v0``; ws(s) URLs map to http(s); a trailing ``/api`` is dropped."""
    parts = urlsplit(base_url if "://" in base_url else f"https://{base_url}")
    scheme = {"https": "https", "http": "http", "wss": "https", "ws": "http"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"XOA_URL {base_url!r} must look like https://xo.example.org")
    path = parts.path.rstrip("/").removesuffix("/api").removesuffix("/rest/v0")
    return urlunsplit((scheme, parts.netloc, f"{path}/rest/v0", "", ""))


class XoRest:
    """XO REST calls on one httpx.AsyncClient. Use ``async with`` or call ``close()``."""

    def __init__(self, http: httpx.AsyncClient, *, timeout_s: float, settle_timeout_s: float = 30.0) -> None:
        self._http = http
        self._timeout_s = timeout_s
        self._settle_timeout_s = settle_timeout_s

    @classmethod
    def from_settings(cls, settings: XoSettings, *, idle_timeout_s: float | None = None,
                      transport: httpx.AsyncBaseTransport | None = None) -> XoRest:
        """Build a client (no I/O yet). ``idle_timeout_s`` (default: the settings' call timeout) bounds the
        silence of a stream; ``transport`` is the test seam (httpx.MockTransport)."""
        settings.require_credentials()
        idle_s = idle_timeout_s or settings.timeout_s
        cookies: dict[str, str] = {}
        auth: httpx.BasicAuth | None = None
        if settings.token is not None:
            cookies["authenticationToken"] = settings.token.get_secret_value()
        else:
            assert settings.username is not None and settings.password is not None  # require_credentials
            auth = httpx.BasicAuth(settings.username, settings.password.get_secret_value())
        http = httpx.AsyncClient(
            base_url=rest_url(settings.url), cookies=cookies, auth=auth, transport=transport,
            verify=tls_context(settings.ca_file, settings.insecure), follow_redirects=False,
            timeout=httpx.Timeout(idle_s, connect=settings.connect_timeout_s, pool=settings.connect_timeout_s),
            headers={"Accept": "application/json"})
        return cls(http, timeout_s=settings.timeout_s, settle_timeout_s=settings.settle_timeout_s)

    def __repr__(self) -> str:
        return f"XoRest(base_url={str(self._http.base_url)!r})"

    async def close(self) -> None:
        """Close every connection. Safe to call twice."""
        await self._http.aclose()

    async def __aenter__(self) -> XoRest:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- objects ---------------------------------------------------------------------------------------------
    async def create_vdi(self, sr_id: str, size_bytes: int, name_label: str, description: str = "") -> str:
        """``POST /vdis``: a new empty VDI on ``sr_id``; returns its id once XO's cache shows it. Not idempotent
        (look up by name first).

        XO answers before its cache shows the VDI, and until then every REST call on it is 404: this polls
        ``GET /vdis/{id}`` on a capped backoff (the recipe's step 3) and raises XoUnavailable when the VDI does not
        show within ``settle_timeout_s`` (it exists: a retry that looks up by name finds it).
        """
        body = {"srId": sr_id, "virtual_size": size_bytes, "name_label": name_label, "name_description": description}
        answer = await self._json("POST", "/vdis", f"VDI creation on SR {sr_id}", body=body, expect=201)
        vdi_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(vdi_id, str) or not vdi_id:
            raise XoError(f"XO answered the VDI creation on SR {sr_id} without an id", method="POST /vdis")
        try:
            async with asyncio.timeout(self._settle_timeout_s):
                for delay_s in Backoff(start_s=0.05, cap_s=1.0, jitter=False).delays():
                    if await self.get_vdi(vdi_id) is not None:
                        return vdi_id
                    await asyncio.sleep(delay_s)  # polling XO's cache (REST has no notifications), not synchronisation
        except TimeoutError as exc:
            raise XoUnavailable(f"XO created VDI {vdi_id} but its cache has not shown it {self._settle_timeout_s:g}s "
                                "later; retry", method="POST /vdis") from exc
        raise AssertionError("unreachable: the delays never end")

    async def get_vdi(self, vdi_id: str) -> Vdi | None:
        """``GET /vdis/{id}``; None when XO answers 404, which means XO's cache does not show it (it may still
        exist: a VDI created a moment ago, or one of a pool XO lost), not that it is gone."""
        what = f"lookup of VDI {vdi_id}"
        try:
            answer = await self._json("GET", f"/vdis/{quote(vdi_id)}", what, expect=200)
        except XoNotFound:
            return None
        try:
            return Vdi.model_validate(answer)
        except ValidationError as exc:
            raise XoError(f"XO answered the {what} with an object we cannot read", method=what) from exc

    async def delete_vdi(self, vdi_id: str) -> None:
        """``DELETE /vdis/{id}`` (VDI.destroy). 404 raises XoNotFound: absent from XO's cache is not deleted,
        so the caller decides (a target created a moment ago may not be visible yet)."""
        await self._json("DELETE", f"/vdis/{quote(vdi_id)}", f"deletion of VDI {vdi_id}", expect=204)

    # -- content ---------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def export(self, vdi_id: str, fmt: Format) -> AsyncIterator[AsyncIterator[bytes]]:
        """``GET /vdis/{id}.{fmt}``: yields the body as an async iterator of chunks, streamed.

        XO sends no Content-Length (a VHD's length comes from shared.vhd_stream.with_exact_length; a raw
        export is the VDI's size). Iterating raises XoUnavailable when the transfer breaks or stays silent for
        the idle timeout. Leaving the block (or cancelling) closes the response and its connection.
        """
        what = f"export of VDI {vdi_id} as {_checked(fmt)}"
        request = self._http.build_request("GET", f"/vdis/{quote(vdi_id)}.{fmt}",
                                           headers={"Accept": "application/octet-stream"})
        with _translated(what):
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise await _error_of(response, what)
            yield _body(response, what)
        finally:
            await response.aclose()

    async def import_(self, vdi_id: str, fmt: Format, length: int, chunks: AsyncIterable[bytes]) -> None:
        """``PUT /vdis/{id}.{fmt}`` with ``Content-Length: length`` and ``chunks`` as the streamed body (never
        chunked: XO refuses an import without a length). ``chunks`` must yield exactly ``length`` bytes.

        Raises the XoError of XO's answer (e.g. VDI_IO_ERROR for a corrupt VHD), XoUnavailable when the transfer
        breaks or stalls; an exception raised by ``chunks`` propagates as it is. XO does not roll back: after a
        failure the VDI holds part of the content.
        """
        what = f"import into VDI {vdi_id} as {_checked(fmt)}"
        headers = {"Content-Length": str(length), "Content-Type": "application/octet-stream"}
        with _translated(what):
            response = await self._http.put(f"/vdis/{quote(vdi_id)}.{fmt}", content=_exactly(chunks, length, what),
                                            headers=headers)
        if response.status_code not in (200, 204):
            raise await _error_of(response, what)

    # -- helpers ---------------------------------------------------------------------------------------------
    async def _json(self, method: str, path: str, what: str, *, expect: int, body: Any = None) -> Any:
        started = time.perf_counter()
        with _translated(what):
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.request(method, path, json=body)
        log.debug("xo_rest_call", method=method, path=path, status=response.status_code,
                  duration_ms=round((time.perf_counter() - started) * 1000, 1))
        if response.status_code != expect:
            raise await _error_of(response, what)
        if expect == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise XoError(f"XO answered the {what} with something other than JSON", method=what) from exc


def _checked(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """The one place httpx failures become XoErrors: transport trouble and timeouts are XoUnavailable."""
    try:
        yield
    except TimeoutError as exc:
        raise XoUnavailable(f"XO did not answer the {what} in time", method=what) from exc
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        if isinstance(exc, httpx.LocalProtocolError):
            raise XoError(f"the {what} broke the HTTP protocol: {_describe(exc)}", method=what) from exc
        raise XoUnavailable(f"XO {what} failed: {_describe(exc)}", method=what) from exc
    except httpx.HTTPError as exc:
        raise XoError(f"XO {what} failed: {_describe(exc)}", method=what) from exc


async def _error_of(response: httpx.Response, what: str) -> XoError:
    with _translated(what):
        raw = b""
        async for chunk in response.aiter_bytes():
            raw += chunk
            if len(raw) >= MAX_ERROR_BODY_BYTES:
                break
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = {"error": raw[:500].decode(errors="replace").strip()}
    return from_rest_error(response.status_code, body, what)


async def _body(response: httpx.Response, what: str) -> AsyncIterator[bytes]:
    with _translated(what):
        async for chunk in response.aiter_bytes():
            yield chunk


async def _exactly(chunks: AsyncIterable[bytes], length: int, what: str) -> AsyncIterator[bytes]:
    """Pass ``chunks`` through in pieces of at least SEND_BYTES (fewer, larger socket writes: each write costs
    far more than copying), failing clearly, before h11 does, when they are not ``length`` bytes."""
    sent = 0
    pending: list[bytes] = []
    pending_bytes = 0
    async for chunk in chunks:
        sent += len(chunk)
        if sent > length:
            raise XoError(f"the body of the {what} is longer than its announced {length} bytes", method=what)
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes >= SEND_BYTES:
            yield pending[0] if len(pending) == 1 else b"".join(pending)
            pending, pending_bytes = [], 0
    if sent < length:
        raise XoUnavailable(f"the body of the {what} ended after {sent} of {length} bytes", method=what)
    if pending:
        yield b"".join(pending)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
