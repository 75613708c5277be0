"""XAPI-like operations on the truth store: VDI and VBD create/resize/destroy/plug/unplug with XAPI's checks.

Everything here reads and writes the truth (what XAPI knows), never XO's cache. Objects are named by
handle (XO id or OpaqueRef, as xo-server passes ``_xapiRef``); a handle XAPI no longer knows gives
HANDLE_INVALID(<class>, <handle>). Errors are raised the way XO passes them on: XapiError, or the XO
translation for VDI_IN_USE (code 17) and VM_BAD_POWER_STATE (code 13). Space is accounting.py's business;
real data side effects go through RealData. Migration (migration.py) builds on the record helpers here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from shared.logging import get_logger

from . import shapes
from .accounting import Accounting
from .errors import (
    PlainError,
    SimError,
    XapiError,
    backend_failure,
    handle_invalid,
    invalid_parameters,
    other_operation_in_progress,
    vdi_in_use,
    vm_bad_power_state,
)
from .model import ObjectStore
from .realdata import RealData
from .shapes import XoObject

log = get_logger(__name__)
RESIDENT_STATES = frozenset({"Running", "Paused", "Suspended"})
MAX_POSITION = 254
CD_POSITION = "3"
_CLASS_TYPES = {"VDI": ("VDI", "VDI-snapshot"), "VBD": ("VBD",), "VM": ("VM",), "SR": ("SR",)}
VHD_BLOCK = 2 * 1024 * 1024  # xcp-ng/sm vhdutil: VHD_BLOCK_SIZE, also its MIN_VHD_SIZE


def vhd_size(size: int) -> int:
    """The virtual size XAPI gives a VDI asked for ``size`` bytes: sm's ``validate_and_round_vhd_size`` rounds it up
    to the next 2 MiB block (at least one), on create and on resize, so a disk can be larger than asked."""
    return max(VHD_BLOCK, -(-size // VHD_BLOCK) * VHD_BLOCK)


class Xapi:
    """Storage operations of every simulated pool (one instance per simulator)."""

    def __init__(self, store: ObjectStore, data: RealData | None = None, plug_delay_ms: float = 0) -> None:
        self.store = store
        self.data = data
        self.accounting = Accounting(store, data)
        self.plug_delay_s = plug_delay_ms / 1000
        self.online_resize_srs: set[str] = set()  # SRs whose SM driver has VDI_RESIZE_ONLINE
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- queries -------------------------------------------------------------------------------------
    def record(self, handle: str, cls: str) -> XoObject:
        """The object XAPI knows under ``handle`` (id or ref), or HANDLE_INVALID(cls, handle)."""
        obj = self.store.find(handle)
        if obj is None or obj["type"] not in _CLASS_TYPES[cls]:
            raise handle_invalid(cls, handle)
        return obj

    def host_of(self, vm: XoObject) -> str | None:
        """The host a VM is resident on, None when halted."""
        return vm["$container"] if vm["power_state"] in RESIDENT_STATES else None

    def can_see(self, host_id: str | None, sr: XoObject) -> bool:
        """Whether ``host_id`` has a PBD to ``sr``: its own local SRs and its pool's shared SRs."""
        host = self.store.find(host_id) if host_id else None
        if host is None:
            return False
        if sr["shared"]:
            return bool(host["$pool"] == sr["$pool"])
        return bool(sr["$container"] == host_id)

    def vbds_of(self, vdi: XoObject) -> list[XoObject]:
        """The VBDs of a VDI."""
        return [vbd for vbd_id in vdi["$VBDs"] if (vbd := self.store.find(vbd_id)) is not None]

    def is_attached(self, vdi: XoObject) -> bool:
        """Whether a VBD of the VDI is plugged or reserved (being plugged/unplugged)."""
        return any(vbd["attached"] or vbd["id"] in self._busy for vbd in self.vbds_of(vdi))

    def is_busy(self, obj_id: str) -> bool:
        """Whether an object is locked (``lock``): a VBD being plugged or unplugged, a VDI being written."""
        return obj_id in self._busy

    def has_vbd_in_flight(self, vdi: XoObject) -> bool:
        """Whether a VBD of the VDI is being plugged or unplugged right now."""
        return any(vbd_id in self._busy for vbd_id in vdi["$VBDs"])

    def ensure_idle(self, vdi: XoObject) -> None:
        """Raise OTHER_OPERATION_IN_PROGRESS(VDI, ref) while an operation runs on the VDI."""
        if vdi["current_operations"] or vdi["id"] in self._busy:
            raise other_operation_in_progress("VDI", vdi["_xapiRef"])

    def lock(self, obj_id: str) -> None:
        """Mark an object as busy (OTHER_OPERATION_IN_PROGRESS for others) until unlock()."""
        self._busy.add(obj_id)

    def unlock(self, obj_id: str) -> None:
        """Undo lock()."""
        self._busy.discard(obj_id)

    # -- records (no checks but space, no data) ------------------------------------------------------
    def add_vdi_record(self, sr_id: str, *, name_label: str, size: int, name_description: str = "",
                       tags: Sequence[str] = (), other_config: dict[str, Any] | None = None,
                       vdi_id: str | None = None, usage: int | None = None) -> XoObject:
        """Add a VDI (new random uuid unless ``vdi_id``) to the store and its SR's accounting, after the space check.

        ``usage`` (what it occupies) defaults to that of a new empty VDI on the SR.
        """
        sr = self.record(sr_id, "SR")
        allocated = self.accounting.initial_usage(sr, size) if usage is None else usage
        self.accounting.ensure_space(sr, size, allocated)
        vdi = shapes.vdi(vdi_id or shapes.new_uuid(), sr["$pool"], sr_id=sr["id"], name_label=name_label,
                         name_description=name_description, size=size, usage=allocated, tags=tags)
        if other_config:
            vdi["other_config"] = dict(other_config)
        with self.store.batch():
            self.store.add(vdi)
            self.accounting.refresh_sr(sr["id"], [*sr["VDIs"], vdi["id"]])
        return vdi

    def remove_vdi_record(self, vdi_id: str) -> XoObject:
        """Remove a VDI from the store and its SR's accounting (its VBDs are left alone)."""
        with self.store.batch():
            vdi = self.store.remove(vdi_id)
            sr = self.store.find(vdi["$SR"])
            if sr is not None:
                self.accounting.refresh_sr(sr["id"], [v for v in sr["VDIs"] if v != vdi_id])
        return vdi

    def add_vbd_record(self, vm_id: str, vdi_id: str, *, position: str, bootable: bool, read_only: bool,
                       vbd_id: str | None = None) -> XoObject:
        """Add a detached VBD and link it from its VM (or control domain, control_domain.py) and VDI."""
        vm = self.store.get(vm_id, "VM", "VM-controller")
        vdi = self.store.get(vdi_id, "VDI")
        vbd = shapes.vbd(vbd_id or shapes.new_uuid(), vm["$pool"], vm_id=vm_id, vdi_id=vdi_id, position=position,
                         bootable=bootable, read_only=read_only)
        with self.store.batch():
            self.store.add(vbd)
            self.store.update(vm_id, {"$VBDs": [*vm["$VBDs"], vbd["id"]]})
            self.store.update(vdi_id, {"$VBDs": [*vdi["$VBDs"], vbd["id"]]})
            self.refresh_container(vm_id)
        return vbd

    def remove_vbd_record(self, vbd_id: str) -> None:
        """Remove a VBD and unlink it from its VM and VDI."""
        with self.store.batch():
            vbd = self.store.remove(vbd_id)
            for owner_id in (vbd["VM"], vbd["VDI"]):
                owner = self.store.find(owner_id)
                if owner is not None:
                    self.store.update(owner_id, {"$VBDs": [i for i in owner["$VBDs"] if i != vbd_id]})
            self.refresh_container(vbd["VM"])

    def refresh_container(self, vm_id: str) -> None:
        """A halted VM's ``$container``: the host of its first disk on a local SR, else its pool (XO-API §4)."""
        vm = self.store.find(vm_id)
        if vm is None or vm["power_state"] in RESIDENT_STATES:
            return
        container = vm["$pool"]
        for vbd_id in vm["$VBDs"]:
            vbd = self.store.find(vbd_id)
            vdi = self.store.find(vbd["VDI"]) if vbd is not None else None
            sr = self.store.find(vdi["$SR"]) if vdi is not None else None
            if sr is not None and not sr["shared"]:
                container = sr["$container"]
                break
        if container != vm["$container"]:
            self.store.update(vm_id, {"$container": container})

    # -- VDI operations ------------------------------------------------------------------------------
    async def create_vdi(self, sr_handle: str, *, name_label: str, size: int, name_description: str = "",
                         tags: Sequence[str] = ()) -> XoObject:
        """VDI.create: a user VDI on the SR, of ``size`` rounded up to a VHD block (``vhd_size``);
        SR_BACKEND_FAILURE_44 when it does not fit (see accounting.py)."""
        sr = self.record(sr_handle, "SR")
        size = vhd_size(size)
        vdi = self.add_vdi_record(sr["id"], name_label=name_label, size=size, name_description=name_description,
                                  tags=tags)
        if self.data is not None:
            try:
                await self.data.create(sr["id"], vdi["id"], size)
            except BaseException:
                self.remove_vdi_record(vdi["id"])
                raise
        return vdi

    def set_vdi_fields(self, vdi_handle: str, changes: dict[str, Any]) -> None:
        """VDI.set_name_label and friends."""
        vdi = self.record(vdi_handle, "VDI")
        self.store.update(vdi["id"], changes)

    async def resize_vdi(self, vdi_handle: str, size: int) -> None:
        """VDI.resize: refused with VDI_IN_USE (code 17) while any VBD is attached or reserved, unless the SR
        supports online resize; SR_BACKEND_FAILURE_79 to shrink; space checked as the SR type does. The new size
        is rounded up to a VHD block (``vhd_size``)."""
        vdi = self.record(vdi_handle, "VDI")
        size = vhd_size(size)
        self.ensure_idle(vdi)
        sr = self.record(vdi["$SR"], "SR")
        if self.is_attached(vdi) and sr["id"] not in self.online_resize_srs:
            raise vdi_in_use(vdi["id"], "resize")
        delta = size - vdi["size"]
        if delta < 0:
            raise backend_failure(79, "VDI Invalid size [opterr=shrinking not allowed]")
        if delta == 0:
            return
        usage = self.accounting.usage_after_resize(vdi, sr, size)
        self.accounting.ensure_space(sr, delta, usage - vdi["usage"])
        with self.store.batch():
            self.store.update(vdi["id"], {"size": size, "usage": usage, "chainPhysicalUsage": usage})
            self.accounting.refresh_sr(sr["id"])
        if self.data is not None:
            self.lock(vdi["id"])
            try:
                await self.data.grow(sr["id"], vdi["id"], size)
            finally:
                self.unlock(vdi["id"])

    async def destroy_vdi(self, vdi_handle: str) -> None:
        """VDI.destroy: VDI_IN_USE (code 17) when attached; detached VBDs go with it."""
        vdi = self.record(vdi_handle, "VDI")
        self.ensure_idle(vdi)
        if self.is_attached(vdi):
            raise vdi_in_use(vdi["id"], "destroy")
        with self.store.batch():
            for vbd in self.vbds_of(vdi):
                self.remove_vbd_record(vbd["id"])
            self.remove_vdi_record(vdi["id"])
        if self.data is not None:
            await self.data.delete(vdi["$SR"], vdi["id"])

    # -- VBD operations ------------------------------------------------------------------------------
    def create_vbd(self, vm_handle: str, vdi_handle: str, *, position: str | None = None, bootable: bool = False,
                   read_only: bool = False) -> XoObject:
        """VBD.create with XO's position choice (first free userdevice from 0, avoiding 3)."""
        vm = self.record(vm_handle, "VM")
        vdi = self.record(vdi_handle, "VDI")
        self.ensure_idle(vdi)
        sr = self.record(vdi["$SR"], "SR")
        if vm["power_state"] == "Running" and not self.can_see(self.host_of(vm), sr):
            raise XapiError("VM_REQUIRES_SR", [vm["_xapiRef"], sr["_xapiRef"]], method="VBD.create")
        chosen = self._position(vm, position)
        return self.add_vbd_record(vm["id"], vdi["id"], position=chosen, bootable=bootable, read_only=read_only)

    def free_position(self, vm_handle: str, *, control_domain: bool = False) -> str:
        """The device XO picks for a new VBD from ``VM.get_allowed_VBD_devices``: the first free one from 0,
        avoiding 3 (the CD position) while another is free; of a control domain (``VM-controller``) or a VM."""
        vm = self.store.get(vm_handle, "VM-controller") if control_domain else self.record(vm_handle, "VM")
        return self._position(vm, None)

    def _position(self, vm: XoObject, requested: str | None) -> str:
        used = {vbd["position"] for vbd_id in vm["$VBDs"] if (vbd := self.store.find(vbd_id))}
        if requested is not None:
            if not requested.isdigit() or int(requested) > MAX_POSITION:
                raise invalid_parameters([{"instancePath": "/position", "message": "must be a userdevice number"}])
            if str(int(requested)) in used:
                raise XapiError("DEVICE_ALREADY_EXISTS", [requested], method="VBD.create")
            return str(int(requested))
        free = (str(n) for n in range(MAX_POSITION + 1) if str(n) not in used and str(n) != CD_POSITION)
        chosen = next(free, CD_POSITION if CD_POSITION not in used else None)
        if chosen is None:  # xo-server's createVbd: VM.get_allowed_VBD_devices came back empty
            raise PlainError("no allowed VBD devices")
        return chosen

    def _check_plug(self, vbd: XoObject) -> tuple[XoObject, XoObject, str]:
        vm = self.record(vbd["VM"], "VM")
        if vm["power_state"] != "Running":
            raise vm_bad_power_state(vm["id"], "Running", vm["power_state"])
        if vbd["attached"]:
            raise XapiError("DEVICE_ALREADY_ATTACHED", [vbd["_xapiRef"]], method="VBD.plug")
        if vbd["id"] in self._busy:
            raise other_operation_in_progress("VBD", vbd["_xapiRef"])
        vdi = self.record(vbd["VDI"], "VDI")
        self.ensure_idle(vdi)
        sr = self.record(vdi["$SR"], "SR")
        if not self.can_see(self.host_of(vm), sr):
            raise XapiError("VM_REQUIRES_SR", [vm["_xapiRef"], sr["_xapiRef"]], method="VBD.plug")
        # A VBD of the VDI plugged or being plugged (or unplugged) elsewhere holds it: XAPI refuses a second
        # attach of a non-sharable VDI, also while the first one is still in flight.
        if any(other["id"] != vbd["id"] and (other["attached"] or other["id"] in self._busy)
               for other in self.vbds_of(vdi)):
            raise vdi_in_use(vdi["id"], "plug")
        return vm, vdi, shapes.device_name(int(vbd["position"]))

    async def plug(self, vbd_handle: str) -> None:
        """VBD.plug now: attach (loop device in real data mode), then set ``attached`` and ``device``."""
        vbd = self.record(vbd_handle, "VBD")
        vm, vdi, device = self._check_plug(vbd)
        self.lock(vbd["id"])
        try:
            await self._attach(vbd["id"], vm, vdi, device)
        finally:
            self.unlock(vbd["id"])

    async def _attach(self, vbd_id: str, vm: XoObject, vdi: XoObject, device: str) -> None:
        if self.data is not None:
            await self.data.plug(vbd_id, vm["id"], device, vdi["$SR"], vdi["id"])
        self.store.update(vbd_id, {"attached": True, "device": device})

    async def connect(self, vbd_handle: str) -> None:
        """Plug now, or with a plug delay check now and plug later (an ``all`` event reports it)."""
        if self.plug_delay_s <= 0:
            await self.plug(vbd_handle)
            return
        vbd = self.record(vbd_handle, "VBD")
        vm, vdi, device = self._check_plug(vbd)
        self.lock(vbd["id"])
        task = asyncio.create_task(self._delayed_attach(vbd["id"], vm, vdi, device))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delayed_attach(self, vbd_id: str, vm: XoObject, vdi: XoObject, device: str) -> None:
        try:
            await asyncio.sleep(self.plug_delay_s)  # simulated hypervisor latency, not synchronisation
            if vbd_id in self.store:
                await self._attach(vbd_id, vm, vdi, device)
        except SimError as exc:
            log.warning("delayed_plug_failed", vbd=vbd_id, error=str(exc))
        finally:
            self.unlock(vbd_id)

    async def unplug(self, vbd_handle: str) -> None:
        """VBD.unplug_force: DEVICE_ALREADY_DETACHED when not plugged; blocked while its VDI migrates."""
        vbd = self.record(vbd_handle, "VBD")
        if vbd["id"] in self._busy:
            raise other_operation_in_progress("VBD", vbd["_xapiRef"])
        if not vbd["attached"]:
            raise XapiError("DEVICE_ALREADY_DETACHED", [vbd["_xapiRef"]], method="VBD.unplug_force")
        vdi = self.store.find(vbd["VDI"])
        if vdi is not None:
            self.ensure_idle(vdi)
        self.lock(vbd["id"])
        try:
            if self.data is not None:
                await self.data.unplug(vbd["id"])
            self.store.update(vbd["id"], {"attached": False, "device": None})
        finally:
            self.unlock(vbd["id"])
        self.accounting.measure(vbd["VDI"])  # what the guest wrote now shows in the VDI's usage

    async def destroy_vbd(self, vbd_handle: str) -> None:
        """VBD.destroy of a detached VBD; the VDI is kept."""
        vbd = self.record(vbd_handle, "VBD")
        if vbd["id"] in self._busy:
            raise other_operation_in_progress("VBD", vbd["_xapiRef"])
        if vbd["attached"]:
            raise XapiError("OPERATION_NOT_ALLOWED", ["VBD is currently attached"], method="VBD.destroy")
        self.remove_vbd_record(vbd["id"])

    async def close(self) -> None:
        """Cancel delayed plugs and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
