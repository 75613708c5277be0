"""XO answers with wrong types become clear XoErrors (BackendFailure -> INTERNAL with a message), never a crash."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import BackendFailure
from shared.xo.client import XoClient
from shared.xo.errors import XoError
from shared.xo.models import Vdi
from shared.xo.transport import Credentials, RpcSession
from tests.unit.xo.memory_peer import MemoryPeer, RpcFault

CASES: list[tuple[str, Any, str]] = [
    ("get_objects as a list", ["not", "a", "map"], "object map"),
    ("get_objects as a string", "oops", "object map"),
    ("get_objects as null", None, "object map"),
    ("a VDI without $SR", {"v": {"id": "v", "type": "VDI", "name_label": "x"}}, "Vdi object we cannot read"),
    ("a VDI with a text size", {"v": {"id": "v", "type": "VDI", "$SR": "s", "size": "big"}},
     "Vdi object we cannot read"),
    ("a VDI whose name is a number", {"v": {"id": "v", "type": "VDI", "$SR": "s", "name_label": 7}},
     "Vdi object we cannot read"),
]


@pytest.mark.parametrize(("label", "answer", "message"), CASES, ids=[c[0] for c in CASES])
async def test_wrong_typed_lookup_answers(label: str, answer: Any, message: str) -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        return answer

    peer = MemoryPeer(handler)
    client = XoClient(RpcSession(peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2))
    with pytest.raises(XoError, match=message) as info:
        await client.find_vdis(name_label="x")
    assert isinstance(info.value, BackendFailure)
    await client.close()
    await peer.aclose()


@pytest.mark.parametrize("answer", [None, 42, "", {"uuid": "x"}, ["x"]])
async def test_create_and_migrate_need_a_uuid_string(answer: Any) -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        if method == "xo.getAllObjects":
            return {}
        return answer

    peer = MemoryPeer(handler)
    client = XoClient(RpcSession(peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2))
    with pytest.raises(XoError, match="disk.create returned"):
        await client.create_disk("csi-x", 1024, "sr")
    with pytest.raises(XoError, match="vdi.migrate returned"):
        await client.migrate_vdi(Vdi.model_validate({"id": "v", "type": "VDI", "$SR": "s"}), "sr", timeout_s=2)
    await client.close()
    await peer.aclose()


async def test_a_malformed_error_member_is_still_an_xo_error() -> None:
    async def handler(method: str, params: dict[str, Any]) -> Any:
        raise RpcFault("not-a-number", None)  # type: ignore[arg-type]

    peer = MemoryPeer(handler)
    client = XoClient(RpcSession(peer, Credentials(token="good-token"), timeout_s=2, connect_timeout_s=2))
    with pytest.raises(XoError):
        await client.ping()
    await client.close()
    await peer.aclose()
