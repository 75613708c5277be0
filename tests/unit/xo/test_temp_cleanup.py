"""--temp-cleanup marks leaked temporary disks, then deletes them once the mark is old enough; what XO sends about
disks is read in the XO layer only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.csi_frontend.disks import DiskLocator
from services.csi_frontend.provisioning import Provisioner
from services.csi_frontend.temp_cleanup import sweep
from shared.xo.client import XoClient
from shared.xo.errors import XoError
from shared.xo.inventory import Inventory
from shared.xo.transport import Credentials, RpcSession
from tests.unit.xo.memory_peer import MemoryPeer


async def test_mark_then_delete_only_unattached_temp_disks() -> None:
    vdis: dict[str, dict[str, Any]] = {
        "t1": {"id": "t1", "type": "VDI", "$SR": "s", "name_label": "csi-temp-pvc-1", "name_description": ""},
        "t2": {"id": "t2", "type": "VDI", "$SR": "s", "name_label": "csi-temp-pvc-2", "$VBDs": ["b"]},
        "v1": {"id": "v1", "type": "VDI", "$SR": "s", "name_label": "csi-pvc-3", "name_description": ""},
    }

    async def handler(method: str, params: dict[str, Any]) -> Any:
        if method == "xo.getAllObjects":
            return dict(vdis)
        if method == "vdi.set":
            vdis[params["id"]]["name_description"] = params["name_description"]
            return True
        if method == "vdi.delete":
            del vdis[params["id"]]
            return True
        raise AssertionError(method)

    peer = MemoryPeer(handler)
    client = XoClient(RpcSession(peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert await sweep(client, "csi-", 1800, now) == []
    assert vdis["t1"]["name_description"].startswith("csi:deletion-candidate: ")
    assert await sweep(client, "csi-", 1800, now + timedelta(minutes=10)) == []
    assert await sweep(client, "csi-", 1800, now + timedelta(minutes=31)) == ["t1"]
    assert set(vdis) == {"t2", "v1"}
    await client.close()
    await peer.aclose()


async def test_a_vdi_xo_sends_unreadable_is_an_xo_error_not_a_crash_of_the_cleanup_or_the_listing() -> None:
    # XO lost the disk's SR field: the sweep (a background task) and ListVolumes must fail as XO errors (the
    # sweep logs and tries again next round; the RPC answers INTERNAL), not with a pydantic error escaping the XO
    # layer, which would end the cleanup task and with it the frontend.
    broken = {"b1": {"id": "b1", "type": "VDI", "name_label": "csi-temp-pvc-1", "name_description": ""}}

    async def handler(method: str, params: dict[str, Any]) -> Any:
        if method == "xo.getAllObjects":
            return dict(broken) if params["filter"].get("type") == "VDI" else {}
        raise AssertionError(method)

    peer = MemoryPeer(handler)
    client = XoClient(RpcSession(peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2))
    provisioner = Provisioner(client, Inventory(client), DiskLocator(client, "csi-"), host_topology=False)
    try:
        with pytest.raises(XoError, match="XO sent a Vdi object we cannot read"):
            await sweep(client, "csi-", 1800)
        with pytest.raises(XoError, match="XO sent a Vdi object we cannot read"):
            await provisioner.list_volumes()
    finally:
        await client.close()
        await peer.aclose()
