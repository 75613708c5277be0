"""XAPI-like operations on the store: VDI and VBD create/resize/destroy/plug/unplug with XAPI's checks.

Errors are raised the way XO passes them to an admin: XapiError, or the XO translation for VDI_IN_USE
(code 17) and VM_BAD_POWER_STATE (code 13). Real data side effects go through RealData when configured.
Migration (migration.py) builds on the record-level helpers here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from shared.logging import get_logger

from . import shapes
from .errors import (
    SimError,
    XapiError,
    backend_failure,
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


class Xapi:
    """Storage operations of every simulated pool (one instance per simulator)."""

    def __init__(self, store: ObjectStore, data: RealData | None = None, plug_delay_ms: float = 0) -> None:
        self.store = store
        self.data = data
        self.plug_delay_s = plug_delay_ms / 1000
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- queries -------------------------------------------------------------------------------------
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
        """Whether a VBD of the VDI is plugged or being plugged/unplugged."""
        return any(vbd["attached"] or vbd["id"] in self._busy for vbd in self.vbds_of(vdi))

    def has_vbd_in_flight(self, vdi: XoObject) -> bool:
        """Whether a VBD of the VDI is being plugged or unplugged right now."""
        return any(vbd_id in self._busy for vbd_id in vdi["$VBDs"])

    def ensure_idle(self, vdi: XoObject) -> None:
        """Raise OTHER_OPERATION_IN_PROGRESS(VDI, ref) while an operation runs on the VDI."""
        if vdi["current_operations"] or vdi["id"] in self._busy:
            raise other_operation_in_progress("VDI", vdi["_xapiRef"])

    def ensure_space(self, sr: XoObject, extra_bytes: int) -> None:
        """Raise SR_BACKEND_FAILURE_44 if the SR cannot hold ``extra_bytes`` more."""
        if sr["usage"] + extra_bytes > sr["size"]:
            raise backend_failure(44, "There is insufficient space")

    def lock(self, obj_id: str) -> None:
        """Mark an object as busy (OTHER_OPERATION_IN_PROGRESS for others) until unlock()."""
        self._busy.add(obj_id)

    def unlock(self, obj_id: str) -> None:
        """Undo lock()."""
        self._busy.discard(obj_id)

    # -- records (no checks, no data) ----------------------------------------------------------------
    def add_vdi_record(self, sr_id: str, *, name_label: str, size: int, name_description: str = "",
                       tags: Sequence[str] = (), other_config: dict[str, Any] | None = None,
                       vdi_id: str | None = None) -> XoObject:
        """Add a VDI (new random uuid unless ``vdi_id``) to the store and its SR's accounting, after the space check."""
        sr = self.store.get(sr_id, "SR")
        self.ensure_space(sr, size)
        vdi = shapes.vdi(vdi_id or shapes.new_uuid(), sr["$pool"], sr_id=sr_id, name_label=name_label,
                         name_description=name_description, size=size, tags=tags)
        if other_config:
            vdi["other_config"] = dict(other_config)
        with self.store.batch():
            self.store.add(vdi)
            self._account(sr, size, add=vdi["id"])
        return vdi

    def remove_vdi_record(self, vdi_id: str) -> XoObject:
        """Remove a VDI from the store and its SR's accounting (its VBDs are left alone)."""
        with self.store.batch():
            vdi = self.store.remove(vdi_id)
            sr = self.store.find(vdi["$SR"])
            if sr is not None:
                self._account(sr, -vdi["size"], remove=vdi_id)
        return vdi

    def _account(self, sr: XoObject, delta_bytes: int, add: str | None = None, remove: str | None = None) -> None:
        vdis = [v for v in sr["VDIs"] if v != remove] + ([add] if add else [])
        usage = max(0, sr["usage"] + delta_bytes)
        self.store.update(sr["id"], {"VDIs": vdis, "usage": usage, "physical_usage": usage})

    def add_vbd_record(self, vm_id: str, vdi_id: str, *, position: str, bootable: bool, read_only: bool) -> XoObject:
        """Add a detached VBD and link it from its VM and VDI."""
        vm = self.store.get(vm_id, "VM")
        vdi = self.store.get(vdi_id, "VDI")
        vbd = shapes.vbd(shapes.new_uuid(), vm["$pool"], vm_id=vm_id, vdi_id=vdi_id, position=position,
                         bootable=bootable, read_only=read_only)
        with self.store.batch():
            self.store.add(vbd)
            self.store.update(vm_id, {"$VBDs": [*vm["$VBDs"], vbd["id"]]})
            self.store.update(vdi_id, {"$VBDs": [*vdi["$VBDs"], vbd["id"]]})
        return vbd

    def remove_vbd_record(self, vbd_id: str) -> None:
        """Remove a VBD and unlink it from its VM and VDI."""
        with self.store.batch():
            vbd = self.store.remove(vbd_id)
            for owner_id, field in ((vbd["VM"], "$VBDs"), (vbd["VDI"], "$VBDs")):
                owner = self.store.find(owner_id)
                if owner is not None:
                    self.store.update(owner_id, {field: [i for i in owner[field] if i != vbd_id]})

    # -- VDI operations ------------------------------------------------------------------------------
    async def create_vdi(self, sr_id: str, *, name_label: str, size: int, name_description: str = "",
                         tags: Sequence[str] = ()) -> XoObject:
        """VDI.create: a user VDI on the SR; SR_BACKEND_FAILURE_44 when it does not fit."""
        vdi = self.add_vdi_record(sr_id, name_label=name_label, size=size, name_description=name_description,
                                  tags=tags)
        if self.data is not None:
            try:
                await self.data.create(sr_id, vdi["id"], size)
            except BaseException:
                self.remove_vdi_record(vdi["id"])
                raise
        return vdi

    async def resize_vdi(self, vdi_id: str, size: int) -> None:
        """VDI.resize (online resize allowed): grow only; the caller rejects shrinking."""
        vdi = self.store.get(vdi_id, "VDI")
        self.ensure_idle(vdi)
        delta = size - vdi["size"]
        if delta <= 0:
            return
        sr = self.store.get(vdi["$SR"], "SR")
        self.ensure_space(sr, delta)
        with self.store.batch():
            self.store.update(vdi_id, {"size": size, "usage": size, "chainPhysicalUsage": size})
            self._account(sr, delta)
        if self.data is not None:
            self.lock(vdi_id)
            try:
                await self.data.grow(sr["id"], vdi_id, size)
            finally:
                self.unlock(vdi_id)

    async def destroy_vdi(self, vdi_id: str) -> None:
        """VDI.destroy: VDI_IN_USE (code 17) when attached; detached VBDs go with it."""
        vdi = self.store.get(vdi_id, "VDI", "VDI-snapshot")
        self.ensure_idle(vdi)
        if self.is_attached(vdi):
            raise vdi_in_use(vdi_id, "destroy")
        with self.store.batch():
            for vbd in self.vbds_of(vdi):
                self.remove_vbd_record(vbd["id"])
            self.remove_vdi_record(vdi_id)
        if self.data is not None:
            await self.data.delete(vdi["$SR"], vdi_id)

    # -- VBD operations ------------------------------------------------------------------------------
    def create_vbd(self, vm_id: str, vdi_id: str, *, position: str | None = None, bootable: bool = False,
                   read_only: bool = False) -> XoObject:
        """VBD.create with XO's position choice (first free userdevice, avoiding 3)."""
        vm = self.store.get(vm_id, "VM")
        vdi = self.store.get(vdi_id, "VDI")
        if vm["$pool"] != vdi["$pool"]:
            raise invalid_parameters(
                [{"instancePath": "/vdi", "message": "must be in the same pool as the VM"}],
                "VM and VDI must be in the same pool",
            )
        self.ensure_idle(vdi)
        sr = self.store.get(vdi["$SR"], "SR")
        if vm["power_state"] == "Running" and not self.can_see(self.host_of(vm), sr):
            raise XapiError("VM_REQUIRES_SR", [vm["_xapiRef"], sr["_xapiRef"]], method="VBD.create")
        chosen = self._position(vm, position)
        return self.add_vbd_record(vm_id, vdi_id, position=chosen, bootable=bootable, read_only=read_only)

    def _position(self, vm: XoObject, requested: str | None) -> str:
        used = {"0"} | {vbd["position"] for vbd_id in vm["$VBDs"] if (vbd := self.store.find(vbd_id))}
        if requested is not None:
            if not requested.isdigit() or int(requested) > MAX_POSITION:
                raise invalid_parameters([{"instancePath": "/position", "message": "must be a userdevice number"}])
            if str(int(requested)) in used:
                raise XapiError("DEVICE_ALREADY_EXISTS", [requested], method="VBD.create")
            return str(int(requested))
        free = (str(n) for n in range(1, MAX_POSITION + 1) if str(n) not in used and str(n) != CD_POSITION)
        chosen = next(free, CD_POSITION if CD_POSITION not in used else None)
        if chosen is None:
            raise XapiError("INTERNAL_ERROR", ["no free userdevice"], method="VBD.create")
        return chosen

    def _check_plug(self, vbd: XoObject) -> tuple[XoObject, XoObject, str]:
        vm = self.store.get(vbd["VM"], "VM")
        if vm["power_state"] != "Running":
            raise vm_bad_power_state(vm["id"], "Running", vm["power_state"])
        if vbd["attached"]:
            raise XapiError("DEVICE_ALREADY_ATTACHED", [vbd["_xapiRef"]], method="VBD.plug")
        if vbd["id"] in self._busy:
            raise other_operation_in_progress("VBD", vbd["_xapiRef"])
        vdi = self.store.get(vbd["VDI"], "VDI")
        self.ensure_idle(vdi)
        sr = self.store.get(vdi["$SR"], "SR")
        if not self.can_see(self.host_of(vm), sr):
            raise XapiError("VM_REQUIRES_SR", [vm["_xapiRef"], sr["_xapiRef"]], method="VBD.plug")
        if any(other["id"] != vbd["id"] for other in self.vbds_of(vdi) if other["attached"]):
            raise vdi_in_use(vdi["id"], "plug")
        return vm, vdi, shapes.device_name(int(vbd["position"]))

    async def plug(self, vbd_id: str) -> None:
        """VBD.plug now: attach (loop device in real data mode), then set ``attached`` and ``device``."""
        vbd = self.store.get(vbd_id, "VBD")
        vm, vdi, device = self._check_plug(vbd)
        self.lock(vbd_id)
        try:
            await self._attach(vbd_id, vm, vdi, device)
        finally:
            self.unlock(vbd_id)

    async def _attach(self, vbd_id: str, vm: XoObject, vdi: XoObject, device: str) -> None:
        if self.data is not None:
            await self.data.plug(vbd_id, vm["id"], device, vdi["$SR"], vdi["id"])
        self.store.update(vbd_id, {"attached": True, "device": device})

    async def connect(self, vbd_id: str) -> None:
        """Plug now, or with a plug delay check now and plug later (an ``all`` event reports it)."""
        if self.plug_delay_s <= 0:
            await self.plug(vbd_id)
            return
        vbd = self.store.get(vbd_id, "VBD")
        vm, vdi, device = self._check_plug(vbd)
        self.lock(vbd_id)
        task = asyncio.create_task(self._delayed_attach(vbd_id, vm, vdi, device))
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

    async def unplug(self, vbd_id: str) -> None:
        """VBD.unplug_force: DEVICE_ALREADY_DETACHED when not plugged; blocked while its VDI migrates."""
        vbd = self.store.get(vbd_id, "VBD")
        if vbd["id"] in self._busy:
            raise other_operation_in_progress("VBD", vbd["_xapiRef"])
        if not vbd["attached"]:
            raise XapiError("DEVICE_ALREADY_DETACHED", [vbd["_xapiRef"]], method="VBD.unplug_force")
        vdi = self.store.find(vbd["VDI"])
        if vdi is not None:
            self.ensure_idle(vdi)
        self.lock(vbd_id)
        try:
            if self.data is not None:
                await self.data.unplug(vbd_id)
            self.store.update(vbd_id, {"attached": False, "device": None})
        finally:
            self.unlock(vbd_id)

    async def destroy_vbd(self, vbd_id: str) -> None:
        """VBD.destroy of a detached VBD; the VDI is kept."""
        vbd = self.store.get(vbd_id, "VBD")
        if vbd_id in self._busy:
            raise other_operation_in_progress("VBD", vbd["_xapiRef"])
        if vbd["attached"]:
            raise XapiError("OPERATION_NOT_ALLOWED", ["VBD is currently attached"], method="VBD.destroy")
        self.remove_vbd_record(vbd_id)

    async def close(self) -> None:
        """Cancel delayed plugs and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
