"""XO simulator objects: shapes of pools, hosts, SRs, VMs, and xo.getAllObjects filters."""

from __future__ import annotations

import pytest

from tests.support.sim import (
    HOST_A1,
    POOL_A,
    SR_LOCAL_A1,
    SR_LOCAL_A2,
    SR_NFS_A,
    VM_A1,
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
        assert (vm["power_state"], vm["$container"], vm["$VBDs"], vm["VIFs"]) == ("Running", HOST_A1, [], [])
        assert set(vm["CPUs"]) == {"max", "number"} and "resident_on" not in vm


async def test_halted_vm_container_is_the_pool() -> None:
    topology = {"pools": [{"name_label": "P", "hosts": [{"name_label": "h", "vms": [
        {"name_label": "off", "power_state": "Halted"}]}]}]}
    async with running(topology) as sim:
        vm = next(iter(sim.state.of_type("VM")))
        assert vm["$container"] == vm["$pool"]


async def test_filter_semantics_limit_and_string_filters() -> None:
    async with running() as sim, client(sim) as rpc:
        assert await rpc.objects(type="SR", tags=["k8s-migrating", "nope"]) == {}
        assert len(await rpc.objects(type="sr")) == 0  # exact, case-sensitive
        nested = await rpc.call("xo.getAllObjects", {"filter": {"type": "VM", "CPUs": {"number": 2}}})
        assert len(nested) == 2
        limited = await rpc.call("xo.getAllObjects", {"filter": {"type": "SR"}, "limit": 2})
        assert len(limited) == 2
        assert await rpc.call("xo.getAllObjects", {"filter": {"type": "SR"}, "limit": 0}) == {}
        by_string = await rpc.call("xo.getAllObjects", {"filter": "type:SR tags:MIGRATING"})
        assert set(by_string) == {SR_LOCAL_A1, SR_LOCAL_A2}
        with pytest.raises(Exception) as info:
            await rpc.call("xo.getAllObjects", {"filter": "just words"})
        assert getattr(info.value, "code", None) == 10
