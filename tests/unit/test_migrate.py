"""The migrator without a network: which of two same-named VDIs is the source (settle_duplicates), a disk XO's view
lost after vdi.migrate, and the health probes' verdicts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from services.migrator.health import HealthServer
from services.migrator.migrate import HandlerDeps, _move, settle_duplicates
from shared.errors import BackendFailure, CapacityExhausted, OperationPending, PlacementImpossible, PreconditionFailed
from shared.messages import MigrationRequested, utc_now
from shared.xo.client import XoClient
from shared.xo.errors import XoPoolDisconnected
from shared.xo.models import Vdi
from shared.xo.transport import Credentials, RpcSession
from tests.unit.xo.memory_peer import MemoryPeer, RpcFault

MARK_TO_B = 'csi:info: {"migrating":{"inProgressToSRUUID":"sr-b"},"srsWithTag":"k8s"}'


def _vdi(vdi_id: str, sr_id: str, **fields: Any) -> Vdi:
    return Vdi.model_validate({"id": vdi_id, "type": "VDI", "$SR": sr_id, "name_label": "csi-a", **fields})


@pytest.mark.parametrize(
    ("vdis", "seen", "keep", "stray"),
    [
        ([_vdi("v1", "sr-a"), _vdi("v2", "sr-b")], "v1", "v1", "v2"),  # the requester saw the source
        ([_vdi("v2", "sr-b"), _vdi("v1", "sr-a")], "v1", "v1", "v2"),
        ([_vdi("v1", "sr-a", name_description=MARK_TO_B), _vdi("v2", "sr-b", name_description=MARK_TO_B)],
         "gone", "v1", "v2"),  # else: the one not on the SR the mark names
    ],
)
def test_the_complete_source_is_kept(vdis: list[Vdi], seen: str, keep: str, stray: str) -> None:
    source, copy = settle_duplicates("csi-a", vdis, seen)
    assert (source.id, copy.id) == (keep, stray)


@pytest.mark.parametrize(
    ("vdis", "seen", "error"),
    [
        ([_vdi("v1", "sr-a", current_operations={"t": "copy"}), _vdi("v2", "sr-b")], "v1", OperationPending),
        ([_vdi("v1", "sr-a"), _vdi("v2", "sr-b"), _vdi("v3", "sr-c")], "v1", PreconditionFailed),
        ([_vdi("v1", "sr-a"), _vdi("v2", "sr-b")], "gone", PreconditionFailed),  # neither seen nor marked
        ([_vdi("v1", "sr-a"), _vdi("v2", "sr-b", **{"$VBDs": ["vbd-1"]})], "v1", PreconditionFailed),  # copy in use
    ],
)
def test_anything_ambiguous_is_left_to_an_operator(vdis: list[Vdi], seen: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        settle_duplicates("csi-a", vdis, seen)


async def _ok() -> None:
    return None


async def _down() -> None:
    raise ConnectionError("refused")


async def test_readiness_needs_every_check() -> None:
    health = HealthServer(loop_age_s=lambda: 0.0, checks={"redis": _ok, "xo": _down}, liveness_timeout_s=5,
                          probe_timeout_s=1)
    ready, report = await health.readiness()
    assert not ready
    assert report == {"redis": "ok", "xo": "ConnectionError: refused"}


@pytest.mark.parametrize(("age_s", "alive"), [(0.5, True), (4.9, True), (5.0, False)])
async def test_liveness_is_the_consume_loop_age(age_s: float, alive: bool) -> None:
    health = HealthServer(loop_age_s=lambda: age_s, checks={}, liveness_timeout_s=5, probe_timeout_s=1)
    assert (await health.liveness()) == (alive, {"consume_loop_age_s": age_s})


class _HeldLock:
    """What _move asks of the disk lock: that it is still held."""

    def ensure_held(self) -> None:
        return None


Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


def _xo(objects: dict[str, dict[str, Any]], servers: list[dict[str, Any]], writes: Handler | None = None) -> Handler:
    """An XO answering reads from ``objects`` and ``server.getAll`` with ``servers``; other calls go to ``writes``."""
    async def handler(method: str, params: dict[str, Any]) -> Any:
        if method == "xo.getAllObjects":
            wanted = params["filter"]
            return {k: v for k, v in objects.items()
                    if all(v.get(f) == x or (isinstance(x, list) and set(x) <= set(v.get(f) or [])) for f, x in
                           wanted.items())}
        if method == "server.getAll":
            return servers
        if writes is None:
            raise AssertionError(method)
        return await writes(method, params)
    return handler


async def _move_raises(xo: Handler, request: MigrationRequested, error: type[Exception]) -> Exception:
    """What ``_move`` of the VDI the request saw raises against ``xo`` (an ``error``)."""
    peer = MemoryPeer(xo)
    client = XoClient(RpcSession(peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2),
                      settle_timeout_s=2)
    deps = HandlerDeps(xo=client, redis=None, key_prefix="t:", lock_ttl_s=1, lock_wait_s=1,  # type: ignore[arg-type]
                       migrate_timeout_s=5)
    try:
        vdi = await client.get_vdi(request.vdi_id_seen)
        assert vdi is not None
        with client.noting_changes(request.disk_name) as changes, pytest.raises(error) as info:
            await _move(deps, request, vdi, _HeldLock(), changes)  # type: ignore[arg-type]
        return info.value
    finally:
        await client.close()
        await peer.aclose()


def _request_for(host_id: str, pool_id: str) -> MigrationRequested:
    return MigrationRequested(job_id="j", disk_name="csi-a", volume_id="name:a", vdi_id_seen="v1", tag="k8s",
                              vm_id="vm", host_id=host_id, pool_id=pool_id, requested_at=utc_now(), correlation_id="c")


@pytest.mark.parametrize(("status", "error"), [("disconnected", XoPoolDisconnected), ("connected", BackendFailure)])
async def test_a_disk_gone_from_xos_view_after_vdi_migrate_is_retryable_while_xo_lost_a_pool(
        status: str, error: type[Exception]) -> None:
    """XO answered vdi.migrate (its cache had the new VDI), then the new VDI is not in its view: while XO has lost a
    pool that proves nothing (XoPoolDisconnected: the job is retried), else it is a failure of XO's."""
    objects: dict[str, dict[str, Any]] = {
        "v1": {"id": "v1", "type": "VDI", "$SR": "sr-a", "name_label": "csi-a", "size": 1,
               "name_description": 'csi:info: {"migrating":{},"srsWithTag":"k8s"}'},
        "sr-a": {"id": "sr-a", "type": "SR", "$pool": "p", "$container": "h-a", "tags": ["k8s"], "size": 10},
        "sr-b": {"id": "sr-b", "type": "SR", "$pool": "p", "$container": "h-b", "tags": ["k8s"], "size": 10},
    }

    async def writes(method: str, params: dict[str, Any]) -> Any:
        if method == "vdi.set":
            if params["id"] not in objects:  # the copy, right after the answer: its pool was lost
                raise RpcFault(1, f"no such object {params['id']}", {"id": params["id"], "type": "VDI"})
            objects[params["id"]]["name_description"] = params["name_description"]
            return None
        if method == "vdi.migrate":
            del objects[params["id"]]  # the copy "v2" is never seen: its pool was lost right after the answer
            return "v2"
        raise AssertionError(method)

    xo = _xo(objects, [{"id": "s", "label": "pool p", "status": status}], writes)
    raised = await _move_raises(xo, _request_for("h-b", "p"), error)
    assert raised.retryable is (status == "disconnected")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "b_srs", "error"),
    [
        ("disconnected", [], XoPoolDisconnected),  # pool B lost for a moment: its SRs are missing from the view
        ("connected", [], PlacementImpossible),  # XO sees every pool: pool B really has no SR of the tag
        ("disconnected", ["sr-b"], XoPoolDisconnected),  # the room pool B's lost SRs may have is unknown
        ("connected", ["sr-b"], CapacityExhausted),
    ],
)
async def test_no_target_sr_is_final_only_once_xo_sees_every_pool(
        status: str, b_srs: list[str], error: type[Exception]) -> None:
    """A move to a node of pool B: no usable SR, or none with room, among the SRs XO shows, is PlacementImpossible or
    CapacityExhausted (the job is dead-lettered) only when XO has lost no pool; else it is retried."""
    objects: dict[str, dict[str, Any]] = {
        "v1": {"id": "v1", "type": "VDI", "$SR": "sr-a", "name_label": "csi-a", "size": 4 * 2**30,
               "name_description": 'csi:info: {"migrating":{},"srsWithTag":"k8s"}'},
        "sr-a": {"id": "sr-a", "type": "SR", "$pool": "pa", "$container": "h-a", "tags": ["k8s"], "size": 2**40},
        "pa": {"id": "pa", "type": "pool"},
        "pb": {"id": "pb", "type": "pool"},
    }
    for sr_id in b_srs:  # too small for the disk
        objects[sr_id] = {"id": sr_id, "type": "SR", "$pool": "pb", "$container": "h-b", "tags": ["k8s"],
                          "size": 2**30}
    servers = [{"id": "s-a", "label": "pool a", "status": "connected", "poolId": "pa"},
               {"id": "s-b", "label": "pool b", "status": status, "poolId": "pb"}]
    raised = await _move_raises(_xo(objects, servers), _request_for("h-b", "pb"), error)
    assert raised.retryable is (status == "disconnected")  # type: ignore[attr-defined]
    if status == "disconnected":
        assert str(raised).startswith("XO is not connected to pool b")
