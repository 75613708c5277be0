"""XO simulator objects: shapes of pools, hosts, SRs, VMs, and xo.getAllObjects filters."""

from __future__ import annotations

import pytest

from services.xo_simulator.topology import derived_id
from shared.units import GiB
from tests.support.sim import (
    HOST_A1,
    POOL_A,
    ROOT_A1,
    SR_LOCAL_A1,
    SR_LOCAL_A2,
    SR_NFS_A,
    VM_A1,
    cached,
    client,
    running,
)

pytestmark = pytest.mark.integration
COMMON = {"id", "uuid", "type", "$pool", "$poolId", "_xapiRef"}


async def test_objects_are_keyed_by_id_with_common_fields() -> None:
    async with running() as sim, client(sim) as rpc:
        objects = await rpc.call("xo.getAllObjects")
        assert isinstance(objects, dict) and objects
        for obj_id, obj in objects.items():
            assert COMMON <= set(obj)
            assert obj["id"] == obj["uuid"] == obj_id
            assert obj["_xapiRef"].startswith("OpaqueRef:")
            assert obj["$pool"] == obj["$poolId"] == POOL_A


async def test_srs_by_tag_and_their_containers() -> None:
    async with running() as sim, client(sim) as rpc:
        local = await rpc.objects(type="SR", tags=["k8s-migrating"])
        assert set(local) == {SR_LOCAL_A1, SR_LOCAL_A2}
        sr = local[SR_LOCAL_A1]
        assert (sr["$container"], sr["shared"], sr["SR_type"], sr["content_type"]) == (HOST_A1, False, "ext", "user")
        for key in ("name_description", "size", "physical_usage", "usage", "VDIs", "$PBDs", "current_operations",
                    "other_config", "sm_config", "inMaintenanceMode", "allocationStrategy", "tags"):
            assert key in sr
        shared = (await rpc.objects(type="SR", tags=["k8s-shared"]))[SR_NFS_A]
        assert (shared["$container"], shared["shared"], shared["SR_type"]) == (POOL_A, True, "nfs")
        assert len(shared["$PBDs"]) == 2
        pbds = await rpc.objects(type="PBD", SR=SR_NFS_A)
        assert set(pbds) == set(shared["$PBDs"])


async def test_pool_host_and_vm_shapes() -> None:
    async with running() as sim, client(sim) as rpc:
        pool = (await rpc.objects(type="pool"))[POOL_A]
        assert (pool["master"], pool["default_SR"], pool["$pool"]) == (HOST_A1, SR_NFS_A, POOL_A)
        host = (await rpc.objects(type="host", name_label="host-a1"))[HOST_A1]
        assert (host["enabled"], host["power_state"], host["residentVms"]) == (True, "Running", [VM_A1])
        assert host["address"] == "10.0.0.11" and len(host["$PBDs"]) == 2
        vm = (await rpc.objects(type="VM", name_label="node-a1"))[VM_A1]
        root_vbd = sim.state.get(ROOT_A1)["$VBDs"][0]
        assert (vm["power_state"], vm["$container"], vm["$VBDs"], vm["VIFs"]) == ("Running", HOST_A1, [root_vbd], [])
        assert set(vm["CPUs"]) == {"max", "number"} and "resident_on" not in vm
        root = (await rpc.objects(type="VBD", VM=VM_A1))[root_vbd]  # the explicit system disk at position 0
        assert (root["position"], root["device"], root["attached"], root["bootable"], root["VDI"]) == (
            "0", "xvda", True, True, ROOT_A1)
        root_vdi = (await rpc.objects(id=ROOT_A1))[ROOT_A1]
        assert (root_vdi["name_label"], root_vdi["size"], root_vdi["$SR"]) == ("node-a1 root", 10 * GiB, SR_LOCAL_A1)


async def test_halted_vm_container_is_its_local_disks_host_else_the_pool() -> None:
    topology = {"tokens": ["sim-token"], "pools": [{
        "name_label": "P", "shared_srs": [{"name_label": "NFS", "size": "1TiB"}],
        "hosts": [{"name_label": "h", "srs": [{"name_label": "L", "size": "100GiB"}], "vms": [
            {"name_label": "off", "power_state": "Halted"},
            {"name_label": "off-local", "power_state": "Halted", "root_disk": {"size": "1GiB"}}]}]}]}
    host, pool = derived_id("host", "P", "h"), derived_id("pool", "P")
    vm_off, vm_local = derived_id("vm", "P", "h", "off"), derived_id("vm", "P", "h", "off-local")
    async with running(topology) as sim, client(sim) as rpc:
        assert (sim.state.get(vm_off)["$container"], sim.state.get(vm_local)["$container"]) == (pool, host)
        shared = await rpc.call("disk.create", {"name": "s", "size": GiB, "sr": derived_id("sr", "P", "NFS"),
                                                "vm": vm_off})
        assert sim.state.get(vm_off)["$container"] == pool  # a shared SR keeps it in the pool
        local = await rpc.call("disk.create", {"name": "l", "size": GiB, "sr": derived_id("sr", "P", "h", "L")})
        await rpc.call("vm.attachDisk", {"vm": vm_off, "vdi": local})
        assert sim.state.get(vm_off)["$container"] == host
        shown = await cached(sim, vm_off, lambda vm: vm["$container"] == host)
        assert len(shown["$VBDs"]) == 2
        local_vbd = next(v for v in sim.state.of_type("VBD") if v["VDI"] == local)
        await cached(sim, local_vbd["id"])
        await rpc.call("vbd.delete", {"id": local_vbd["id"]})
        assert sim.state.get(vm_off)["$container"] == pool
        assert shared in sim.state


async def test_filter_semantics_limit_and_string_filters() -> None:
    async with running() as sim, client(sim) as rpc:
        assert await rpc.objects(type="SR", tags=["k8s-migrating", "nope"]) == {}
        assert len(await rpc.objects(type="sr")) == 0  # exact, case-sensitive
        nested = await rpc.call("xo.getAllObjects", {"filter": {"type": "VM", "CPUs": {"number": 2}}})
        assert len(nested) == 2
        limited = await rpc.call("xo.getAllObjects", {"filter": {"type": "SR"}, "limit": 2})
        assert len(limited) == 2
        fractional = await rpc.call("xo.getAllObjects", {"filter": {"type": "SR"}, "limit": 1.5})
        assert list(fractional) == list(limited)  # limit is a JSON number: XO counts it down, 1.5 keeps 2
        assert await rpc.call("xo.getAllObjects", {"filter": {"type": "SR"}, "limit": 0}) == {}
        by_string = await rpc.call("xo.getAllObjects", {"filter": "type:SR tags:MIGRATING"})
        assert set(by_string) == {SR_LOCAL_A1, SR_LOCAL_A2}
        with pytest.raises(Exception) as info:
            await rpc.call("xo.getAllObjects", {"filter": "just words"})
        assert getattr(info.value, "code", None) == 10
