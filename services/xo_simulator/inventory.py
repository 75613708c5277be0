"""Builds the XO objects of a topology into an object store (pools, hosts, PBDs, SRs, VMs, seed VDIs)."""

from __future__ import annotations

from . import shapes
from .model import ObjectStore
from .topology import PoolSpec, SrSpec, Topology, derived_id
from .xapi import RESIDENT_STATES, Xapi


def populate(xapi: Xapi, topology: Topology) -> None:
    """Add every topology object to ``xapi.store`` (one ``enter`` batch); seed VDIs are added as records.

    Real data files of seed VDIs are created separately by the caller (see server.py).
    """
    store = xapi.store
    with store.batch():
        for pool_spec in topology.pools:
            _add_pool(store, pool_spec)
        for vdi in topology.vdis:
            xapi.add_vdi_record(topology.resolve_sr(vdi.sr), name_label=vdi.name_label, size=vdi.size,
                                name_description=vdi.name_description, tags=vdi.tags, vdi_id=vdi.id)


def _add_pool(store: ObjectStore, spec: PoolSpec) -> None:
    master = spec.hosts[0].id if spec.hosts else None
    default_sr = spec.shared_srs[0].id if spec.shared_srs else None
    store.add(shapes.pool(spec.id, spec.name_label, spec.name_description, master, default_sr))
    for index, host_spec in enumerate(spec.hosts, start=1):
        address = host_spec.address or f"10.0.{len(store) % 250}.{index}"
        store.add(shapes.host(host_spec.id, spec.id, host_spec.name_label, address))
    host_ids = [host.id for host in spec.hosts]
    for sr_spec in spec.shared_srs:
        _add_sr(store, spec.id, sr_spec, host_ids, container=spec.id)
    for host_spec in spec.hosts:
        for sr_spec in host_spec.srs:
            _add_sr(store, spec.id, sr_spec, [host_spec.id], container=host_spec.id)
        for vm_spec in host_spec.vms:
            is_resident = vm_spec.power_state in RESIDENT_STATES
            store.add(shapes.vm(
                vm_spec.id, spec.id, name_label=vm_spec.name_label, name_description=vm_spec.name_description,
                power_state=vm_spec.power_state, container=host_spec.id if is_resident else spec.id,
                cpus=vm_spec.cpus, memory_bytes=vm_spec.memory, tags=vm_spec.tags,
            ))
            if is_resident:
                host = store.get(host_spec.id)
                store.update(host_spec.id, {"residentVms": [*host["residentVms"], vm_spec.id]})


def _add_sr(store: ObjectStore, pool_id: str, spec: SrSpec, host_ids: list[str], container: str) -> None:
    is_shared = container == pool_id
    pbd_ids = [derived_id("pbd", spec.id, host_id) for host_id in host_ids]
    store.add(shapes.sr(
        spec.id, pool_id, name_label=spec.name_label, name_description=spec.name_description, size=spec.size,
        shared=is_shared, sr_type=spec.SR_type or ("nfs" if is_shared else "ext"), tags=spec.tags,
        container=container, pbds=pbd_ids,
    ))
    for pbd_id, host_id in zip(pbd_ids, host_ids, strict=True):
        store.add(shapes.pbd(pbd_id, pool_id, host_id, spec.id))
        host = store.find(host_id)
        if host is not None:
            store.update(host_id, {"$PBDs": [*host["$PBDs"], pbd_id]})
