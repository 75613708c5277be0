"""Builds the XO objects of a topology into the truth store (pools, hosts and their control domains, PBDs, SRs, VMs,
their disks, seed VDIs).

Linear in the topology's size (a generated one holds tens of thousands of objects): VDIs are added as records
and each SR's accounting is computed once at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import shapes
from .accounting import THICK_SR_TYPES, is_thin
from .model import ObjectStore
from .topology import DataDiskSpec, HostSpec, PoolSpec, RootDiskSpec, SrSpec, Topology, VmSpec, derived_id
from .xapi import CD_POSITION, RESIDENT_STATES, Xapi


def populate(xapi: Xapi, topology: Topology) -> None:
    """Add every topology object to ``xapi.store`` (one ``enter`` batch); VDIs are added as records.

    A VM's disks are plugged (when it runs) without a loop device in real data mode: the root disk at position 0
    (``xvda``), the others from position 1; they are the guest's, not disks a client attaches. Real data files of
    VDIs are created by the caller. ValueError when an SR cannot hold its VDIs.
    """
    store = xapi.store
    fill = _SrFill(xapi)
    with store.batch():
        for pool_spec in topology.pools:
            _add_pool(xapi, pool_spec)
        for pool_spec, host_spec in topology.hosts():
            for vm_spec in host_spec.vms:
                _add_vm_disks(fill, topology, pool_spec, host_spec, vm_spec)
        for vdi in topology.vdis:
            fill.add(topology.resolve_sr(vdi.sr), vdi_id=vdi.id, name_label=vdi.name_label, size=vdi.size,
                     name_description=vdi.name_description, tags=vdi.tags)
        fill.account()


class _SrFill:
    """Adds VDI records without per-VDI accounting, then sets each SR's ``VDIs`` and usages once."""

    def __init__(self, xapi: Xapi) -> None:
        self.xapi = xapi
        self.added: dict[str, list[str]] = {}

    def add(self, sr_id: str, *, vdi_id: str, name_label: str, size: int, name_description: str = "",
            tags: Sequence[str] = ()) -> str:
        sr = self.xapi.record(sr_id, "SR")
        vdi = shapes.vdi(vdi_id, sr["$pool"], sr_id=sr_id, name_label=name_label, name_description=name_description,
                         size=size, usage=self.xapi.accounting.initial_usage(sr, size), tags=tags)
        self.xapi.store.add(vdi)
        self.added.setdefault(sr_id, []).append(vdi_id)
        return vdi_id

    def account(self) -> None:
        for sr_id, vdi_ids in self.added.items():
            sr = self.xapi.store.get(sr_id)
            self.xapi.accounting.refresh_sr(sr_id, [*sr["VDIs"], *vdi_ids])
            sr = self.xapi.store.get(sr_id)
            used = sr["physical_usage"] if is_thin(sr) else sr["usage"]
            if used > sr["size"]:
                raise ValueError(f"SR {sr['name_label']!r} ({sr_id}) cannot hold its VDIs: they need {used} bytes, "
                                 f"it has {sr['size']}")


def _add_pool(xapi: Xapi, spec: PoolSpec) -> None:
    store = xapi.store
    master = spec.hosts[0].id if spec.hosts else None
    default_sr = spec.shared_srs[0].id if spec.shared_srs else None
    store.add(shapes.pool(spec.id, spec.name_label, spec.name_description, master, default_sr))
    for index, host_spec in enumerate(spec.hosts, start=1):
        address = host_spec.address or f"10.0.{len(store) % 250}.{index}"
        dom0_id = derived_id("vm-controller", spec.name_label, host_spec.name_label)
        store.add(shapes.host(host_spec.id, spec.id, host_spec.name_label, address) | {"controlDomain": dom0_id})
        store.add(shapes.control_domain(dom0_id, spec.id, host_id=host_spec.id, host_name=host_spec.name_label))
    host_ids = [host.id for host in spec.hosts]
    for sr_spec in spec.shared_srs:
        _add_sr(xapi, spec.id, sr_spec, host_ids, container=spec.id)
    for host_spec in spec.hosts:
        for sr_spec in host_spec.srs:
            _add_sr(xapi, spec.id, sr_spec, [host_spec.id], container=host_spec.id)
        for vm_spec in host_spec.vms:
            _add_vm(store, spec.id, host_spec.id, vm_spec)


def _add_vm(store: ObjectStore, pool_id: str, host_id: str, spec: VmSpec) -> None:
    is_resident = spec.power_state in RESIDENT_STATES
    store.add(shapes.vm(
        spec.id, pool_id, name_label=spec.name_label, name_description=spec.name_description,
        power_state=spec.power_state, container=host_id if is_resident else pool_id,
        cpus=spec.cpus, memory_bytes=spec.memory, tags=spec.tags,
    ))
    if is_resident:
        host = store.get(host_id)
        store.update(host_id, {"residentVms": [*host["residentVms"], spec.id]})


def _add_sr(xapi: Xapi, pool_id: str, spec: SrSpec, host_ids: list[str], container: str) -> None:
    store = xapi.store
    is_shared = container == pool_id
    sr_type = spec.SR_type or ("nfs" if is_shared else "ext")
    pbd_ids = [derived_id("pbd", spec.id, host_id) for host_id in host_ids]
    store.add(shapes.sr(
        spec.id, pool_id, name_label=spec.name_label, name_description=spec.name_description, size=spec.size,
        shared=is_shared, sr_type=sr_type, tags=spec.tags, container=container, pbds=pbd_ids,
        is_thin=sr_type not in THICK_SR_TYPES,
    ))
    if spec.resize_online:
        xapi.online_resize_srs.add(spec.id)
    for pbd_id, host_id in zip(pbd_ids, host_ids, strict=True):
        store.add(shapes.pbd(pbd_id, pool_id, host_id, spec.id))
        host = store.find(host_id)
        if host is not None:
            store.update(host_id, {"$PBDs": [*host["$PBDs"], pbd_id]})


def _add_vm_disks(fill: _SrFill, topology: Topology, pool: PoolSpec, host: HostSpec, vm: VmSpec) -> None:
    disks: list[tuple[str, RootDiskSpec, str]] = []  # (position, spec, VDI id)
    if vm.root_disk is not None:
        disks.append(("0", vm.root_disk, derived_id("vdi", pool.name_label, host.name_label, vm.name_label, "root")))
    positions = (str(n) for n in range(1, 255) if str(n) != CD_POSITION)
    disks += [(next(positions), data, derived_id("vdi", pool.name_label, host.name_label, vm.name_label, "disk",
                                                 str(rank))) for rank, data in enumerate(vm.disks)]
    for position, disk, vdi_id in disks:
        fill.add(topology.disk_sr(pool, host, vm, disk), vdi_id=vdi_id,
                 name_label=disk.name_label or f"{vm.name_label} root", size=disk.size,
                 name_description=disk.name_description if isinstance(disk, DataDiskSpec) else "")
        vbd = fill.xapi.add_vbd_record(vm.id, vdi_id, position=position, bootable=position == "0", read_only=False,
                                       vbd_id=derived_id("vbd", vm.id, position))
        if vm.power_state == "Running":
            fill.xapi.store.update(vbd["id"], {"attached": True, "device": shapes.device_name(int(position))})
