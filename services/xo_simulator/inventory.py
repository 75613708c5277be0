"""Builds the XO objects of a topology into the truth store (pools, hosts, PBDs, SRs, VMs, root disks, seed VDIs)."""

from __future__ import annotations

from . import shapes
from .accounting import THICK_SR_TYPES
from .model import ObjectStore
from .topology import HostSpec, PoolSpec, SrSpec, Topology, VmSpec, derived_id
from .xapi import RESIDENT_STATES, Xapi


def populate(xapi: Xapi, topology: Topology) -> None:
    """Add every topology object to ``xapi.store`` (one ``enter`` batch); VDIs are added as records.

    A VM's root disk is plugged at position 0 (``xvda``) without a loop device in real data mode: it is
    the guest's system disk, not one a client attaches. Real data files of VDIs are created by the caller.
    """
    store = xapi.store
    with store.batch():
        for pool_spec in topology.pools:
            _add_pool(xapi, pool_spec)
        for pool_spec, host_spec in topology.hosts():
            for vm_spec in host_spec.vms:
                if vm_spec.root_disk is not None:
                    _add_root_disk(xapi, topology, pool_spec, host_spec, vm_spec)
        for vdi in topology.vdis:
            xapi.add_vdi_record(topology.resolve_sr(vdi.sr), name_label=vdi.name_label, size=vdi.size,
                                name_description=vdi.name_description, tags=vdi.tags, vdi_id=vdi.id)


def _add_pool(xapi: Xapi, spec: PoolSpec) -> None:
    store = xapi.store
    master = spec.hosts[0].id if spec.hosts else None
    default_sr = spec.shared_srs[0].id if spec.shared_srs else None
    store.add(shapes.pool(spec.id, spec.name_label, spec.name_description, master, default_sr))
    for index, host_spec in enumerate(spec.hosts, start=1):
        address = host_spec.address or f"10.0.{len(store) % 250}.{index}"
        store.add(shapes.host(host_spec.id, spec.id, host_spec.name_label, address))
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


def _add_root_disk(xapi: Xapi, topology: Topology, pool: PoolSpec, host: HostSpec, vm: VmSpec) -> None:
    disk = vm.root_disk
    if disk is None:
        return
    vdi = xapi.add_vdi_record(
        topology.root_disk_sr(pool, host, vm), name_label=disk.name_label or f"{vm.name_label} root",
        size=disk.size, vdi_id=derived_id("vdi", pool.name_label, host.name_label, vm.name_label, "root"),
    )
    vbd = xapi.add_vbd_record(vm.id, vdi["id"], position="0", bootable=True, read_only=False,
                              vbd_id=derived_id("vbd", vm.id, "0"))
    if vm.power_state == "Running":
        xapi.store.update(vbd["id"], {"attached": True, "device": shapes.device_name(0)})
