"""--temp-cleanup against an in-memory XO peer: the m4rCsi timing (seen 10 min before the mark, deleted 30 min after
it) and how the pass treats a VDI XO sends that cannot be read. The races with CreateVolume run against the real
simulator (tests/integration/test_temp_cleanup.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.csi_frontend.disks import DiskLocator
from services.csi_frontend.provisioning import Provisioner
from services.csi_frontend.temp_cleanup import TempCleanup
from services.csi_frontend.volume_locks import VolumeLocks
from shared.xo.client import XoClient
from shared.xo.errors import XoError
from shared.xo.inventory import Inventory
from shared.xo.transport import Credentials, RpcSession
from tests.unit.xo.memory_peer import MemoryPeer


class Clocks:
    """The monotonic clock and the wall clock the cleanup reads, moved by the test."""

    def __init__(self) -> None:
        self.elapsed_s = 0.0
        self.start = datetime(2026, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.elapsed_s

    def wall(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed_s)


def _peer(vdis: dict[str, dict[str, Any]]) -> MemoryPeer:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        if method == "xo.getAllObjects":
            wanted = params["filter"]
            return {k: v for k, v in vdis.items() if all(v.get(f) == x for f, x in wanted.items())}
        if method == "server.getAll":
            return [{"id": "s1", "status": "connected"}]
        if method == "vdi.set":
            vdis[params["id"]]["name_description"] = params["name_description"]
            return True
        if method == "vdi.delete":
            del vdis[params["id"]]
            return True
        raise AssertionError(method)

    return MemoryPeer(handler)


def _client(peer: MemoryPeer) -> XoClient:
    return XoClient(RpcSession(peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2))


async def test_a_temp_disk_is_marked_after_ten_minutes_seen_and_deleted_thirty_minutes_after_the_mark() -> None:
    vdis: dict[str, dict[str, Any]] = {
        "t1": {"id": "t1", "type": "VDI", "$SR": "s", "name_label": "csi-temp-pvc-1", "name_description": ""},
        "t2": {"id": "t2", "type": "VDI", "$SR": "s", "name_label": "csi-temp-pvc-2", "$VBDs": ["b"]},
        "t3": {"id": "t3", "type": "VDI", "$SR": "s", "name_label": "csi-temp-pvc-3",
               "name_description": "an operator's note: keep"},
        "v1": {"id": "v1", "type": "VDI", "$SR": "s", "name_label": "csi-pvc-4", "name_description": ""},
    }
    peer, clocks = _peer(vdis), Clocks()
    client = _client(peer)
    cleanup = TempCleanup(client, "csi-", VolumeLocks(), clock=clocks.monotonic, wall=clocks.wall)
    try:
        assert await cleanup.sweep() == []  # first sight: only noted
        clocks.elapsed_s = 599
        assert await cleanup.sweep() == []
        assert vdis["t1"]["name_description"] == ""
        clocks.elapsed_s = 601
        assert await cleanup.sweep() == []
        assert vdis["t1"]["name_description"] == 'csi:deletion-candidate: {"unusedSince": "2026-01-01T00:10:01Z"}'
        clocks.elapsed_s = 601 + 1799
        assert await cleanup.sweep() == []
        clocks.elapsed_s = 601 + 1801
        assert await cleanup.sweep() == ["t1"]
        # attached, not its own description, not a temporary disk: untouched
        assert vdis["t2"].get("name_description") is None
        assert vdis["t3"]["name_description"] == "an operator's note: keep"
        assert set(vdis) == {"t2", "t3", "v1"}
    finally:
        await client.close()
        await peer.aclose()


async def test_a_vdi_xo_sends_unreadable_is_skipped_by_the_cleanup_and_an_xo_error_for_the_listing() -> None:
    # XO lost the SR field of one temporary disk: the cleanup logs and skips it and still handles the others (it is
    # a background task: it must not die); ListVolumes answers an XO error (a listing that silently left a volume
    # out would claim it does not exist).
    vdis: dict[str, dict[str, Any]] = {
        "b1": {"id": "b1", "type": "VDI", "name_label": "csi-temp-pvc-1", "name_description": ""},
        "t1": {"id": "t1", "type": "VDI", "$SR": "s", "name_label": "csi-temp-pvc-2", "name_description": ""},
    }
    peer, clocks = _peer(vdis), Clocks()
    client = _client(peer)
    cleanup = TempCleanup(client, "csi-", VolumeLocks(), min_age_s=0, clock=clocks.monotonic, wall=clocks.wall)
    provisioner = Provisioner(client, Inventory(client), DiskLocator(client, "csi-"), host_topology=False)
    try:
        assert [vdi.id for vdi in await cleanup.scan()] == ["t1"]
        await cleanup.sweep()  # seen
        await cleanup.sweep()  # marked
        assert vdis["t1"]["name_description"].startswith("csi:deletion-candidate: ")
        assert vdis["b1"]["name_description"] == ""
        with pytest.raises(XoError, match="XO sent a Vdi object we cannot read"):
            await provisioner.list_volumes()
    finally:
        await client.close()
        await peer.aclose()
