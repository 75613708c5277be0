"""ControlDomains (shared/xo/control_domains.py): which VBDs are XAPI's control domain at work, at the cost of one
read of every control domain for a VM id never seen before, and none otherwise."""

from __future__ import annotations

from typing import Any

import pytest

from shared.xo.control_domains import ControlDomains
from shared.xo.errors import XoPoolDisconnected
from shared.xo.models import Vbd

DOM0 = {"id": "dom0-h1", "type": "VM-controller", "$container": "h1"}


class Reader:
    """xo.getAllObjects over a list of control domains, counting the reads."""

    def __init__(self, *domains: dict[str, Any]) -> None:
        self.domains = list(domains)
        self.filters: list[dict[str, Any]] = []

    async def __call__(self, filter: dict[str, Any]) -> list[dict[str, Any]]:
        self.filters.append(filter)
        return list(self.domains)


class Pools:
    """XoClient.check_view_complete: XoPoolDisconnected while ``lost``; counts the checks."""

    def __init__(self) -> None:
        self.lost = False
        self.checks: list[str] = []

    async def __call__(self, what: str) -> None:
        self.checks.append(what)
        if self.lost:
            raise XoPoolDisconnected(f"XO is not connected to pool p1: {what} may be there but invisible")


def _vbd(vbd_id: str, vm_id: str, *, attached: bool = True, read_only: bool = True) -> Vbd:
    return Vbd.model_validate({"id": vbd_id, "type": "VBD", "VM": vm_id, "VDI": "v", "attached": attached,
                               "read_only": read_only})


async def test_a_vm_id_is_read_once_whether_or_not_it_is_a_control_domain() -> None:
    read, pools = Reader(DOM0), Pools()
    domains = ControlDomains(read, pools)
    assert await domains.hosts_of(["dom0-h1", "node-1"]) == {"dom0-h1": "h1"}
    assert await domains.hosts_of(["node-1"]) == {} and await domains.hosts_of(["dom0-h1"]) == {"dom0-h1": "h1"}
    assert read.filters == [{"type": "VM-controller"}]
    read.domains.append({"id": "dom0-h2", "type": "VM-controller", "$container": "h2"})  # a host joined
    assert await domains.hosts_of(["dom0-h2", "node-1"]) == {"dom0-h2": "h2"}
    assert len(read.filters) == 2
    assert pools.checks == ["the control domain VM node-1 (a VBD's VM)"]  # once: dom0-h2 was found, node-1 known


async def test_a_vm_id_missing_while_xo_lost_a_pool_is_not_taken_for_a_vm() -> None:
    """A control domain of a pool XO lost is missing from the read: its id is not remembered as a VM's (which an
    unpublish without a node would take for a node's and remove mid-export), and the lookup is retried."""
    read, pools = Reader(), Pools()
    domains = ControlDomains(read, pools)
    pools.lost = True
    with pytest.raises(XoPoolDisconnected):
        await domains.hosts_of(["dom0-h1"])
    pools.lost = False
    read.domains.append(DOM0)  # XO reconnected: the pool's objects are back
    assert await domains.hosts_of(["dom0-h1"]) == {"dom0-h1": "h1"}
    assert len(read.filters) == 2


async def test_split_reads_nothing_when_nothing_is_plugged_and_tells_xos_vbds_apart() -> None:
    read = Reader(DOM0)
    domains = ControlDomains(read, Pools())
    unplugged = await domains.split([_vbd("b1", "node-1", attached=False)])
    assert (unplugged.by_vms, unplugged.by_xo, read.filters) == ([], [], [])
    plugged = await domains.split([_vbd("b1", "node-1"), _vbd("b2", "dom0-h1", read_only=False)])
    assert [v.id for v in plugged.by_vms] == ["b1"] and [(v.id, h) for v, h in plugged.by_xo] == [("b2", "h1")]
    assert plugged.xo_writes
    assert plugged.xo_at_work("volume x") == ("XO is importing into or copying onto volume x (VBD b2 of the control "
                                              "domain of host h1 has it plugged); retry once that is over")
