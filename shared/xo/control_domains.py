"""Which VMs are control domains (dom0, XO ``type: 'VM-controller'``), and a VDI's plugged VBDs split by who has them.

XAPI plugs a VDI into a host's control domain while it streams it (XO's REST export and import) or copies it to
another SR (VDI.copy, which vdi.migrate of a detached disk runs), then unplugs it. XO shows that VBD like any other,
so a control domain's VBD means "XO is exporting or copying this disk now": never a node, never published, never
ours to delete. Telling one apart costs no call on the common path: a VBD's VM is looked up only when it is not the
caller's own, and every control domain (one per host) is read at once and remembered, as are the VM ids found not to
be one (a VM never turns into a control domain); only a VM id never seen before costs a read. Not found among them
counts only once XO is known to see every pool (``complete``): while XO has lost a pool, its control domains are
missing from that read, and one taken for a VM would be a node whose VBD an unpublish removes mid-export.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from shared.xo.models import Vbd

CONTROL_DOMAIN = "VM-controller"
MAX_REMEMBERED = 100_000  # VM ids known not to be control domains; forgotten (re-read once) beyond
Reader = Callable[[dict[str, Any]], Awaitable[list[dict[str, Any]]]]
Completeness = Callable[[str], Awaitable[None]]
"""XoClient.check_view_complete: XoPoolDisconnected while XO has lost a pool."""


@dataclass(frozen=True)
class Plugged:
    """A VDI's plugged VBDs: ``by_vms`` through which VMs use it, ``by_xo`` through which a control domain has it
    (XO streaming or copying it), each with its host id."""

    by_vms: list[Vbd]
    by_xo: list[tuple[Vbd, str]]

    @property
    def xo_writes(self) -> bool:
        """Whether XO writes the disk now (an import into it, a copy onto it): a read-write control domain VBD."""
        return any(not vbd.read_only for vbd, _ in self.by_xo)

    def xo_at_work(self, subject: str) -> str:
        """Why ``subject`` (e.g. "volume X") cannot be used now, naming XO's VBD and its host; "" when none."""
        if not self.by_xo:
            return ""
        vbd, host = self.by_xo[0]
        doing = "importing into or copying onto" if not vbd.read_only else "exporting or copying"
        return (f"XO is {doing} {subject} (VBD {vbd.id} of the control domain of host {host} has it plugged); retry "
                "once that is over")


class ControlDomains:
    """The control domains XO shows, by VM id, with their host; read through ``read`` (xo.getAllObjects), a VM id
    not among them confirmed through ``complete``."""

    def __init__(self, read: Reader, complete: Completeness) -> None:
        self._read = read
        self._complete = complete
        self._hosts: dict[str, str] = {}  # control domain id -> its host id ($container)
        self._others: set[str] = set()
        self._lock = asyncio.Lock()

    async def hosts_of(self, vm_ids: Iterable[str]) -> dict[str, str]:
        """``{vm id: host id}`` for those of ``vm_ids`` that are control domains; one read when one of them was
        never seen before (and XO's pool status when one of them is no control domain), none otherwise. Raises the
        XoError tree: XoPoolDisconnected while XO has lost a pool and a VM id is not among the control domains it
        shows (nothing is remembered then)."""
        ids = set(vm_ids)
        if self._unknown(ids):
            async with self._lock:
                if unknown := self._unknown(ids):  # else read meanwhile
                    found = await self._read({"type": CONTROL_DOMAIN})
                    self._hosts.update({str(o["id"]): str(o.get("$container") or "") for o in found if "id" in o})
                    if others := unknown - self._hosts.keys():
                        await self._complete(f"the control domain VM {sorted(others)[0]} (a VBD's VM)")
                        if len(self._others) > MAX_REMEMBERED:
                            self._others.clear()
                        self._others |= others
        return {vm_id: self._hosts[vm_id] for vm_id in ids if vm_id in self._hosts}

    async def split(self, vbds: Iterable[Vbd]) -> Plugged:
        """The plugged ones of ``vbds``, split by who has them (no read when none is plugged)."""
        plugged = [vbd for vbd in vbds if vbd.attached]
        hosts = await self.hosts_of({vbd.vm_id for vbd in plugged}) if plugged else {}
        return Plugged([vbd for vbd in plugged if vbd.vm_id not in hosts],
                       [(vbd, hosts[vbd.vm_id]) for vbd in plugged if vbd.vm_id in hosts])

    def _unknown(self, ids: set[str]) -> set[str]:
        return ids - self._hosts.keys() - self._others
