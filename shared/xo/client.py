"""XoClient: the typed XO calls the driver needs, over one RpcSession.

Every call is bounded: reads by ``read_timeout_s``, writes by the session's timeout (``--xoa-timeout``, 300 s
like m4rCsi), long calls such as vdi.migrate by an explicit one. A write returns once XO's object cache shows
its effect (shared/xo/cache.py), so no caller decides from a read that predates its own write. A lookup that
comes back empty is conclusive only after ``confirm_absent``: XO drops every object of a pool it lost.
Raises only the XoError tree (shared/xo/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from shared.backoff import Backoff
from shared.config import XoSettings
from shared.keyed_locks import KeyedLocks
from shared.logging import get_logger
from shared.xo.cache import (
    FIRST_RECHECK_S,
    CopyOver,
    DiskChanges,
    Expectation,
    MatchState,
    Obj,
    ObjectState,
    Watch,
    changed_objects,
)
from shared.xo.control_domains import ControlDomains, Plugged
from shared.xo.errors import XoAuthError, XoError, XoMethodNotFound, XoNotFound, XoPoolDisconnected, XoUnavailable
from shared.xo.models import Sr, Vbd, Vdi, Vm, XoObject
from shared.xo.transport import Credentials, RpcSession, WebSocketConnector, api_url, tls_context

log = get_logger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=XoObject)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# XO picks a new VBD's device two XAPI round trips before it creates the VBD, so an attach to the same VM by
# another client (another controller replica, an operator) can take it first: XAPI DEVICE_ALREADY_EXISTS, nothing
# made. Attaches of this client to one VM run one at a time; a race with another client is retried.
DEVICE_TAKEN = "DEVICE_ALREADY_EXISTS"
DEVICE_RACE_ATTEMPTS = 3
Relevant = Callable[[str, Obj | None], bool]


class XoClient:
    """Typed XO JSON-RPC methods. Lookups return models; ``None``/``[]`` when nothing matches."""

    def __init__(self, session: RpcSession, *, read_timeout_s: float | None = None,
                 settle_timeout_s: float = 30.0) -> None:
        self._session = session
        self._read_timeout_s = read_timeout_s
        self._settle_timeout_s = settle_timeout_s
        self._serialised = KeyedLocks()  # _write calls with the same one_at_a_time key (attach_disk: the VM)
        # whose VBDs are XO at work (control_domains.py)
        self.control_domains = ControlDomains(self.get_objects, self.check_view_complete)

    @classmethod
    def from_settings(cls, settings: XoSettings) -> XoClient:
        """Build a client (no I/O yet: the socket opens on the first call)."""
        settings.require_credentials()
        url = api_url(settings.url)
        connector = WebSocketConnector(
            url, ssl_context=tls_context(settings.ca_file, settings.insecure), max_message_bytes=MAX_MESSAGE_BYTES
        )
        credentials = Credentials(
            token=settings.token.get_secret_value() if settings.token else None,
            username=settings.username,
            password=settings.password.get_secret_value() if settings.password else None,
        )
        session = RpcSession(
            connector, credentials, timeout_s=settings.timeout_s, connect_timeout_s=settings.connect_timeout_s
        )
        return cls(session, read_timeout_s=min(settings.read_timeout_s, settings.timeout_s),
                   settle_timeout_s=settings.settle_timeout_s)

    @property
    def session(self) -> RpcSession:
        return self._session

    async def close(self) -> None:
        await self._session.close()

    # -- reads ---------------------------------------------------------------------------------

    async def get_objects(self, filter: dict[str, Any], *, limit: int | None = None) -> list[dict[str, Any]]:
        """``xo.getAllObjects`` with an object filter (exact match; arrays mean contains-all)."""
        params: dict[str, Any] = {"filter": filter}
        if limit is not None:
            params["limit"] = limit
        result = await self._session.call("xo.getAllObjects", params, idempotent=True,
                                          timeout_s=self._read_timeout_s)
        if not isinstance(result, dict):
            raise XoError("XO xo.getAllObjects returned something other than an object map", method="xo.getAllObjects")
        return [obj for obj in result.values() if isinstance(obj, dict)]

    async def ping(self) -> None:
        """One cheap signed-in call; raises XoUnavailable/XoAuthError when XO cannot serve us."""
        await self.get_objects({"type": "pool"}, limit=1)

    async def find_vdis(self, *, name_label: str | None = None, sr_id: str | None = None) -> list[Vdi]:
        """VDIs (type ``VDI``, snapshots excluded) with this exact name and/or on this SR (every VDI without either).
        XoError when XO sends one we cannot read."""
        return await self._typed(Vdi, _query("VDI", {"name_label": name_label, "$SR": sr_id}))

    async def get_vdi(self, vdi_id: str) -> Vdi | None:
        return await self._one(Vdi, {"type": "VDI", "id": vdi_id})

    async def find_srs(self, *, tag: str | None = None) -> list[Sr]:
        """SRs carrying ``tag`` (all SRs when None)."""
        return await self._typed(Sr, _query("SR", {"tags": None if tag is None else [tag]}))

    async def get_sr(self, sr_id: str) -> Sr | None:
        return await self._one(Sr, {"type": "SR", "id": sr_id})

    async def get_vm(self, vm_id: str) -> Vm | None:
        return await self._one(Vm, {"type": "VM", "id": vm_id})

    async def find_vbds(self, *, vm_id: str | None = None, vdi_id: str | None = None) -> list[Vbd]:
        """VBDs of a VM and/or a VDI."""
        return await self._typed(Vbd, _query("VBD", {"VM": vm_id, "VDI": vdi_id}))

    async def plugged(self, vdi_id: str) -> Plugged:
        """The VDI's plugged VBDs, those of VMs apart from those of control domains (XO exporting or copying it):
        one read, and a second only when a VBD's VM was never seen before (ControlDomains.hosts_of)."""
        return await self.control_domains.split(await self.find_vbds(vdi_id=vdi_id))

    # -- account and completeness -------------------------------------------------------------

    async def current_user(self) -> dict[str, Any]:
        """The signed-in user's public fields (``session.getUser``): id, email, permission."""
        user = await self._session.call("session.getUser", {}, idempotent=True, timeout_s=self._read_timeout_s)
        if not isinstance(user, dict):
            raise XoError("XO session.getUser returned no user", method="session.getUser")
        return user

    async def require_admin(self, component: str) -> None:
        """Refuse to work for a non-admin account: from now on every sign-in is checked (XoAuthError naming the
        account and the fix), starting with one now. When XO cannot be reached yet this logs and returns: the
        check runs at the first connection, and a service starts without waiting for XO."""
        await self._session.require_admin(component)
        try:
            await self.ping()
        except XoAuthError:
            raise
        except XoUnavailable as exc:
            log.warning("xo_unreachable_at_start", component=component, error=exc.message)

    async def check_view_complete(self, what: str) -> None:
        """XoPoolDisconnected unless XO is connected to every pool (XO server) it manages and holds their objects.

        While XO has lost a pool, every object of that pool is missing from its cache, so ``what`` (a lookup
        that came back empty) cannot be told absent from unreachable. ``connected`` is not enough: xo-server marks
        a pool connected once XAPI's session is open, and its objects enter the cache with xen-api's initial fetch
        (every type in one batch, seconds on a large pool) after that, at XO's start and at each full reconnect.
        The pool object enters in that batch, so each connected pool must also show as an object. A second
        server entry of a pool already connected through another ("this pool is already connected") hides
        nothing; a disabled one (``enabled: false``) does, until an operator enables or removes it.
        """
        try:
            servers = await self._session.call("server.getAll", {}, idempotent=True, timeout_s=self._read_timeout_s)
        except XoMethodNotFound:
            log.warning("xo_server_status_unknown", reason="server.getAll is not available")
            return
        servers = [s for s in servers if isinstance(s, dict)] if isinstance(servers, list) else []
        connected = {str(s["poolId"]) for s in servers if s.get("status") == "connected" and s.get("poolId")}
        lost = [s for s in servers if s.get("status") != "connected" and not _served_elsewhere(s, connected)]
        if lost:
            raise XoPoolDisconnected(
                f"XO is not connected to {'; '.join(_server_state(s) for s in lost)}: {what} may be there but "
                "invisible until XO reconnects; retry later",
                method="server.getAll",
            )
        shown = {obj.get("id") for obj in await self.get_objects({"type": "pool"})} if connected else set()
        if loading := connected - shown:
            raise XoPoolDisconnected(
                f"XO is still loading the objects of pool {', '.join(sorted(loading))} (connected, not yet in its "
                f"cache): {what} may be there but invisible until it has; retry later",
                method="xo.getAllObjects",
            )

    async def lookup_confirmed(self, what: str, lookup: Callable[[], Awaitable[T]]) -> T:
        """``lookup()``'s answer; when it is empty (None, no objects), ``confirm_absent``'s: an empty answer is
        returned only once XO is known to see every pool (absent is not deleted)."""
        found = await lookup()
        return found if found else await self.confirm_absent(what, lookup)

    async def confirm_absent(self, what: str, lookup: Callable[[], Awaitable[T]]) -> T:
        """A lookup came back empty: check that XO sees every pool, then look once more (a pool that came back
        meanwhile brings its objects back) and return that answer. XoPoolDisconnected while a pool is lost."""
        await self.check_view_complete(what)
        return await lookup()

    # -- writes (each returns once XO's cache shows its effect) -------------------------------------

    async def create_disk(self, name: str, size_bytes: int, sr_id: str) -> str:
        """``disk.create``; returns the new VDI UUID (XO answers once its cache has it). Not idempotent: callers
        look up by name first."""
        result = await self._session.call("disk.create", {"name": name, "size": size_bytes, "sr": sr_id})
        return _expect_str(result, "disk.create")

    async def set_vdi(
        self,
        vdi_id: str,
        *,
        name_label: str | None = None,
        name_description: str | None = None,
        size_bytes: int | None = None,
    ) -> Obj | None:
        """``vdi.set``: rename, describe or grow (size only grows; XAPI may round it up); returns the VDI as the
        cache shows it with the new values (a grown disk's size as XAPI rounded it)."""
        params: dict[str, Any] = {"id": vdi_id}
        wanted: dict[str, Any] = {}
        if name_label is not None:
            params["name_label"] = wanted["name_label"] = name_label
        if name_description is not None:
            params["name_description"] = wanted["name_description"] = name_description
        if size_bytes is not None:
            params["size"] = size_bytes

        def shows(obj: Obj | None) -> bool:
            return obj is not None and all(obj.get(k) == v for k, v in wanted.items()) and (
                size_bytes is None or int(obj.get("size") or 0) >= size_bytes)

        return await self._write("vdi.set", params, ObjectState(vdi_id, shows), idempotent=True)

    async def delete_vdi(self, vdi_id: str) -> None:
        """``vdi.delete``; returns once the VDI left the cache. Already deleted counts as success, but only once
        XO is known to see every pool (XoPoolDisconnected otherwise). Attached -> XoVdiInUse."""
        await self._delete("vdi.delete", vdi_id, f"VDI {vdi_id}")

    async def migrate_vdi(self, vdi: Vdi, sr_id: str, *, timeout_s: float) -> str:
        """``vdi.migrate`` of ``vdi`` to ``sr_id``; returns the VDI UUID afterwards (it changes on a copy).

        XO answers once its cache shows the new VDI, but on the copy path (a detached disk) it destroys the source
        after that barrier: this returns only once the source has left the cache too, so a lookup by name right
        after finds one VDI. XO before 5.104.1 returns ``true``: the copy is then found by name on the target SR.
        """
        async with self._watching(ObjectState(vdi.id, lambda obj: obj is None)) as source_gone:
            new_id = await self._call_migrate(vdi, sr_id, timeout_s)
            if new_id != vdi.id:
                await self._source_left(vdi, new_id, source_gone)
        return new_id

    async def migrate_vdi_described(self, vdi: Vdi, sr_id: str, description: str, *, timeout_s: float,
                                    answered: Callable[[], Awaitable[None]] | None = None) -> Vdi:
        """``migrate_vdi``, then ``vdi.set {name_description}`` on the VDI XO returns as soon as it answers (a copy
        carries the source's description, e.g. a migration mark to clear). Returns that VDI as XO's cache shows it
        once it has the description and the source has left the cache: the object the settle saw, no read after.
        The two waits for XO's cache overlap (one cache lag, not two). XoNotFound when the VDI XO returned is gone.
        ``answered`` is awaited once, as soon as the copy is over: XO's cache showed the source's ``copy``
        operation end (``CopyOver``; XO still moves the VBDs and destroys the source before it answers), or XO
        answered ``vdi.migrate``, whichever comes first; before those waits, and before this raises.
        """
        once: asyncio.Future[None] | None = None

        def release() -> asyncio.Future[None]:
            nonlocal once
            if once is None:
                assert answered is not None
                once = asyncio.ensure_future(answered())
            return once

        async def when_copied(copy: CopyOver) -> None:
            await copy.over.wait()
            await asyncio.shield(release())

        copy = CopyOver(vdi.id)
        unsubscribe = self._session.subscribe(copy) if answered is not None else lambda: None
        early = asyncio.ensure_future(when_copied(copy)) if answered is not None else None
        try:
            async with self._watching(ObjectState(vdi.id, lambda obj: obj is None)) as source_gone:
                new_id = await self._call_migrate(vdi, sr_id, timeout_s)
                described = asyncio.ensure_future(self._write(
                    "vdi.set", {"id": new_id, "name_description": description},
                    ObjectState(new_id, lambda obj: obj is not None and obj.get("name_description") == description),
                    idempotent=True))
                waits: list[Awaitable[Obj | None]] = [described]
                if new_id != vdi.id:
                    waits.append(self._source_left(vdi, new_id, source_gone))
                try:
                    if answered is not None:
                        await release()
                finally:
                    results = await asyncio.gather(*waits, return_exceptions=True)
        finally:
            unsubscribe()
            if early is not None:
                early.cancel()
            if once is not None and not once.done():  # begun by the copy's end, XO's call failed since: let it end
                await asyncio.wait({once})
        obj = results[0]
        if error := next((r for r in results if isinstance(r, BaseException)), None):
            raise error
        assert not isinstance(obj, BaseException)
        return _parse(Vdi, obj or {})

    async def _call_migrate(self, vdi: Vdi, sr_id: str, timeout_s: float) -> str:
        result = await self._session.call("vdi.migrate", {"id": vdi.id, "sr_id": sr_id}, timeout_s=timeout_s)
        new_id = result if isinstance(result, str) and result else None
        if result is True:
            copies = await self.find_vdis(name_label=vdi.name_label, sr_id=sr_id)
            new_id = copies[0].id if len(copies) == 1 else None
        if new_id is None:
            raise XoError(f"XO vdi.migrate returned {type(result).__name__}, not the new VDI UUID",
                          method="vdi.migrate")
        return new_id

    async def _source_left(self, vdi: Vdi, new_id: str, source_gone: Watch) -> None:
        met, _ = await source_gone.settle(self._read, timeout_s=self._settle_timeout_s)
        if not met:
            raise XoUnavailable(f"XO migrated VDI {vdi.id} to {new_id} but its cache still shows the source "
                                f"{self._settle_timeout_s:g}s later; retry", method="vdi.migrate")

    async def attach_disk(self, vm_id: str, vdi_id: str, *, read_only: bool = False,
                          known_vbd_ids: frozenset[str] = frozenset()) -> Vbd:
        """``vm.attachDisk`` on a running VM: creates the VBD and plugs it; returns the VBD once the cache shows
        it plugged with its device. Not idempotent.

        When the plug fails XO keeps the VBD it created: that VBD (one not in ``known_vbd_ids``, the VBDs of the
        VM and VDI before the call) is deleted before the error is raised, so a failed attach leaves nothing.
        Attaches to one VM run one at a time in this client, and a device taken by another client meanwhile
        (DEVICE_ALREADY_EXISTS) is retried up to DEVICE_RACE_ATTEMPTS times, then raised as XoBusy.
        """
        fields = {"type": "VBD", "VM": vm_id, "VDI": vdi_id}
        plugged = MatchState(fields, lambda vbd: bool(vbd.get("attached") and vbd.get("device")))
        # The VBD a failed plug leaves: a new one, not plugged (a plugged one is another call's, which succeeded).
        left = MatchState(fields, lambda vbd: vbd.get("id") not in known_vbd_ids and not vbd.get("attached"))
        params = {"vm": vm_id, "vdi": vdi_id, "mode": "RO" if read_only else "RW"}
        attempt = 1
        while True:
            async with self._watching(left) as created:
                try:
                    obj = await self._write("vm.attachDisk", params, plugged, one_at_a_time=vm_id)
                    return _parse(Vbd, obj or {})
                except XoError as exc:
                    if exc.xapi_code == DEVICE_TAKEN:  # VBD.create failed: nothing was made
                        if attempt < DEVICE_RACE_ATTEMPTS:
                            log.info("attach_device_taken_retrying", vm=vm_id, vdi=vdi_id, attempt=attempt)
                            attempt += 1
                            continue
                    elif not isinstance(exc, XoUnavailable):  # XO answered: the VBD exists or not, and we can look
                        await self._remove_created_vbd(created, exc)
                    raise

    async def _remove_created_vbd(self, created: Watch, cause: XoError) -> None:
        found, obj = await created.settle(self._read, timeout_s=min(self._settle_timeout_s, 5.0))
        if found and obj is not None:
            log.warning("failed_attach_vbd_removed", vbd=obj.get("id"), error=cause.message)
            await self.delete_vbd(str(obj["id"]))

    async def connect_vbd(self, vbd_id: str) -> Vbd:
        """``vbd.connect`` (plug); returns the VBD once the cache shows it plugged with its device."""
        obj = await self._write("vbd.connect", {"id": vbd_id}, ObjectState(
            vbd_id, lambda vbd: vbd is not None and bool(vbd.get("attached") and vbd.get("device"))))
        return _parse(Vbd, obj or {})

    async def delete_vbd(self, vbd_id: str) -> None:
        """``vbd.delete`` (unplug then destroy; the VDI stays); returns once the VBD left the cache. Already gone
        counts as success once XO is known to see every pool."""
        await self._delete("vbd.delete", vbd_id, f"VBD {vbd_id}")

    async def _delete(self, method: str, obj_id: str, what: str) -> None:
        try:
            await self._write(method, {"id": obj_id}, ObjectState(obj_id, lambda obj: obj is None), idempotent=True)
        except XoNotFound:
            await self.check_view_complete(what)  # "no such object" from a pool XO lost is not "deleted"

    async def _write(self, method: str, params: dict[str, Any], expected: Expectation, *,
                     idempotent: bool = False, one_at_a_time: str | None = None) -> Obj | None:
        """Call ``method``, then wait until the cache shows ``expected``; XoUnavailable when it does not within
        ``settle_timeout_s`` (the call succeeded: a retry finds its effect). Calls with the same
        ``one_at_a_time`` key run one at a time in this client (the wait for the cache is not serialised)."""
        async with self._watching(expected) as watch:
            serial = contextlib.nullcontext() if one_at_a_time is None else self._serialised.hold(one_at_a_time)
            async with serial:
                await self._session.call(method, params, idempotent=idempotent)
            met, obj = await watch.settle(self._read, timeout_s=self._settle_timeout_s)
        if not met:
            raise XoUnavailable(f"XO's object cache has not shown the result of {method} "
                                f"{self._settle_timeout_s:g}s after the call; retry", method=method)
        return obj

    @contextlib.contextmanager
    def noting_changes(self, disk_name: str) -> Iterator[DiskChanges]:
        """Within the block, ``changes.changed`` says whether XO may show disk ``disk_name`` (its VDIs by name, and
        the ids passed to ``track``) differently from a read taken at its start: a job that waited (for a slot)
        re-reads only then."""
        session = self._session
        changes = DiskChanges(disk_name, lambda: session.is_connected, lambda: session.connections_opened)
        unsubscribe = session.subscribe(changes)
        try:
            yield changes
        finally:
            unsubscribe()

    @contextlib.asynccontextmanager
    async def _watching(self, expected: Expectation) -> AsyncIterator[Watch]:
        watch = Watch(expected)
        unsubscribe = self._session.subscribe(watch)
        try:
            yield watch
        finally:
            unsubscribe()

    async def _read(self, filter: Mapping[str, Any]) -> list[Obj]:
        return await self.get_objects(dict(filter))

    # -- waiting -------------------------------------------------------------------------------

    async def wait_until(
        self, check: Callable[[], Awaitable[T | None]], *, timeout_s: float, max_interval_s: float = 0.5,
        relevant: Relevant | None = None,
    ) -> T | None:
        """Re-run ``check`` on a capped backoff, and early when a notification item that ``relevant(id, obj)``
        accepts arrives (``obj`` None: the id left the cache), until it returns something other than None;
        returns None when ``timeout_s`` passes first. Unrelated notifications never cause a read."""
        changed = asyncio.Event()

        def on_notification(method: str, params: Any) -> None:
            if relevant is not None and any(relevant(obj_id, obj) for obj_id, obj in changed_objects(method, params)):
                changed.set()

        unsubscribe = self._session.subscribe(on_notification)
        # With notifications to wake it, re-reading early only wastes calls (XO's cache moves every ~200 ms).
        first_s = 0.005 if relevant is None else min(FIRST_RECHECK_S, max_interval_s)
        polls = Backoff(start_s=first_s, cap_s=max_interval_s, jitter=False).delays()
        interval_s = next(polls)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    changed.clear()
                    result = await check()
                    if result is not None:
                        return result
                    try:
                        async with asyncio.timeout(interval_s):
                            await changed.wait()
                    except TimeoutError:
                        interval_s = next(polls)
        except TimeoutError:
            return None
        finally:
            unsubscribe()

    # -- helpers -------------------------------------------------------------------------------

    async def _typed(self, model: type[M], query: dict[str, Any]) -> list[M]:
        return [_parse(model, obj) for obj in await self.get_objects(query)]

    async def _one(self, model: type[M], query: dict[str, Any]) -> M | None:
        found = await self.get_objects(query, limit=1)
        return _parse(model, found[0]) if found else None


def _query(kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """An ``xo.getAllObjects`` filter on objects of ``kind``, with the fields that are not None."""
    return {"type": kind, **{key: value for key, value in fields.items() if value is not None}}


def _parse(model: type[M], obj: dict[str, Any]) -> M:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors()[:3])
        raise XoError(f"XO sent a {model.__name__} object we cannot read (fields: {fields})") from exc


def _expect_str(result: Any, method: str) -> str:
    if isinstance(result, str) and result:
        return result
    raise XoError(f"XO {method} returned {type(result).__name__}, expected a UUID string", method=method)


def _served_elsewhere(server: dict[str, Any], connected: set[str]) -> bool:
    """A duplicate entry of a pool XO reaches through another server (xo-server's PoolAlreadyConnected)."""
    error = server.get("error")
    return isinstance(error, dict) and str(error.get("poolId")) in connected


def _server_state(server: dict[str, Any]) -> str:
    name = str(server.get("label") or server.get("host") or server.get("id"))
    if server.get("enabled") is False:
        return (f"{name} (disabled in XO: enable it, or remove it from XO's servers if that pool is gone for good)")
    return f"{name} ({server.get('status')})"
