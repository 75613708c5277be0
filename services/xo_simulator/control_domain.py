"""XAPI's control domain (dom0) plugs: while XAPI streams a VDI out or in (REST export/import) or copies it to another
SR (VDI.copy), it plugs the VDI into a host's control domain through a VBD (Sm_fs_ops.with_block_attached_device),
then unplugs and destroys that VBD, also when the operation fails or is cancelled.

XO shows that VBD like any other (``attached``, ``VM`` = the id of the host's ``VM-controller`` object), after the
cache lag as every truth change. XAPI's checks count it as any plug (xapi.py: resize and destroy answer VDI_IN_USE,
a VM's plug too); only another read-only attach (a second export) may share the VDI with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import shapes
from .shapes import XoObject
from .xapi import Xapi

CONTROL_DOMAIN = "VM-controller"


def host_for(xapi: Xapi, sr: XoObject) -> XoObject:
    """The host whose control domain plugs a VDI of ``sr``: its host for a local SR, the pool master for a shared
    one (XAPI may pick any host of the pool; the master is as good as another)."""
    host_id = sr["$container"]
    if sr["shared"]:
        host_id = xapi.store.get(sr["$pool"], "pool")["master"]
    return xapi.store.get(host_id, "host")


def is_control_domain_vbd(xapi: Xapi, vbd: XoObject) -> bool:
    """Whether ``vbd`` plugs its VDI into a control domain (XAPI at work on it)."""
    vm = xapi.store.find(vbd["VM"])
    return vm is not None and vm["type"] == CONTROL_DOMAIN


def read_only_by_control_domains(xapi: Xapi, vdi: XoObject) -> bool:
    """Whether every plugged (or reserved) VBD of ``vdi`` is a read-only one of a control domain (exports): XAPI
    lets another read-only attach share the VDI with them."""
    return all(vbd["read_only"] and is_control_domain_vbd(xapi, vbd)
               for vbd in xapi.vbds_of(vdi) if vbd["attached"] or xapi.is_busy(vbd["id"]))


@contextmanager
def plugged(xapi: Xapi, vdi_id: str, *, read_only: bool) -> Iterator[str]:
    """Plug VDI ``vdi_id`` into the control domain of a host that sees its SR for the block's duration; yields the
    VBD's id. The VBD is unplugged and destroyed on the way out, whatever happens (unless someone destroyed it
    meanwhile: ``still_plugged`` tells the stream)."""
    vdi = xapi.store.get(vdi_id, "VDI")
    host = host_for(xapi, xapi.store.get(vdi["$SR"], "SR"))
    dom0_id = host["controlDomain"]
    position = xapi.free_position(dom0_id, control_domain=True)
    with xapi.store.batch():
        vbd = xapi.add_vbd_record(dom0_id, vdi_id, position=position, bootable=False, read_only=read_only)
        xapi.store.update(vbd["id"], {"attached": True, "device": shapes.device_name(int(position))})
    try:
        yield vbd["id"]
    finally:
        if vbd["id"] in xapi.store:
            xapi.remove_vbd_record(vbd["id"])


def still_plugged(xapi: Xapi, vbd_id: str) -> bool:
    """Whether the control domain's VBD ``vbd_id`` is still plugged (a client may unplug or destroy it mid-stream
    with vbd.delete, which breaks the stream)."""
    vbd = xapi.store.find(vbd_id)
    return vbd is not None and bool(vbd["attached"])
