"""XAPI's control domains in the simulator (services/xo_simulator/control_domain.py): one ``VM-controller`` per host,
never a VM a caller can attach to; a VBD of one plugs a VDI while XAPI streams it (REST export read-only, import
read-write) or copies it (vdi.migrate of a detached disk), shows in XO's cache like any VBD, holds the VDI as any
plug does (VDI_IN_USE for a resize, a destroy, a VM's plug) and leaves once the stream or copy ends, also when it
fails or is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dev.wait import eventually
from services.xo_simulator.server import SimulatorHandle
from services.xo_simulator.topology import derived_id
from shared.config import XoSettings
from shared.units import MiB
from shared.xo.errors import XoError
from shared.xo.rest import XoRest
from tests.support.sim import (
    HOST_A1,
    HOST_A2,
    SR_LOCAL_A1,
    SR_LOCAL_A2,
    SR_NFS_A,
    TOKEN,
    VM_A2,
    RpcError,
    cached,
    client,
    running,
    uncached,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
DOM0_A1 = derived_id("vm-controller", "Pool A", "host-a1")
DOM0_A2 = derived_id("vm-controller", "Pool A", "host-a2")


def _rest(sim: SimulatorHandle) -> XoRest:
    return XoRest.from_settings(XoSettings(url=sim.url, token=TOKEN))


def _vbds(sim: SimulatorHandle, vdi_id: str, *, cache: bool = False) -> list[dict[str, Any]]:
    """The VBDs of a VDI, as XAPI knows them (or as XO's cache shows them), as (VM, attached, read_only)."""
    store = sim.cache if cache else sim.state
    return sorted(((v["VM"], v["attached"], v["read_only"]) for v in store.of_type("VBD") if v["VDI"] == vdi_id),
                  key=repr)  # type: ignore[return-value]


async def _held(release: asyncio.Event, size: int) -> AsyncIterator[bytes]:
    yield bytes(size // 2)
    await release.wait()
    yield bytes(size - size // 2)


@pytest.mark.parametrize("topology", ["two-hosts", "shared-pool", "two-pools",
                                      "generated:pools=2,hosts=3,vms=6,vdis=6"])
async def test_every_host_has_one_running_control_domain_that_no_call_takes_for_a_vm(topology: str) -> None:
    async with running(topology) as sim, client(sim) as rpc:
        hosts = await rpc.objects(type="host")
        domains = await rpc.objects(type="VM-controller")
        vms = await rpc.objects(type="VM")
        assert sorted(d["$container"] for d in domains.values()) == sorted(hosts)
        assert {h["controlDomain"] for h in hosts.values()} == set(domains)
        assert all(d["power_state"] == "Running" and d["$pool"] == hosts[d["$container"]]["$pool"]
                   for d in domains.values())
        assert not set(domains) & set(vms)
        [dom0] = list(domains)[:1]
        vdi_id = await rpc.call("disk.create", {"name": "d", "size": MiB, "sr": next(iter(
            await rpc.objects(type="SR", shared=True) or await rpc.objects(type="SR")))})
        with pytest.raises(RpcError) as refused:
            await rpc.call("vm.attachDisk", {"vm": dom0, "vdi": vdi_id})
        assert (refused.value.code, refused.value.data) == (1, {"id": dom0, "type": "VM"})


async def test_an_export_plugs_the_vdi_read_only_into_its_hosts_control_domain_until_it_ends() -> None:
    async with running() as sim, client(sim) as rpc, _rest(sim) as rest:
        vdi_id = await rest.create_vdi(SR_LOCAL_A2, 64 * MiB, "exported")
        async with rest.export(vdi_id, "raw") as first:
            await anext(aiter(first))
            assert _vbds(sim, vdi_id) == [(DOM0_A2, True, True)]
            [vbd_id] = sim.state.get(vdi_id)["$VBDs"]
            assert (await cached(sim, vbd_id))["device"] == "xvda"
            async with rest.export(vdi_id, "raw") as second:  # a second read-only attach shares it
                await anext(aiter(second))
                assert _vbds(sim, vdi_id) == [(DOM0_A2, True, True)] * 2
                for method, params in [("vdi.set", {"id": vdi_id, "size": 128 * MiB}),
                                       ("vm.attachDisk", {"vm": VM_A2, "vdi": vdi_id})]:
                    with pytest.raises(RpcError) as in_use:
                        await rpc.call(method, params)
                    assert in_use.value.code == 17, method
        left = [(VM_A2, False, False)]  # the VBD of the refused plug, which XO keeps
        await eventually(lambda: _vbds(sim, vdi_id) == left, 10)  # once the server sees the client gone
        await uncached(sim, vbd_id)
        assert _vbds(sim, vdi_id, cache=True) == left and sim.state.get(DOM0_A2)["$VBDs"] == []
        assert sim.state.get(vdi_id)["size"] == 64 * MiB  # the resize was refused


async def test_a_vdi_of_a_shared_sr_is_plugged_into_the_pool_masters_control_domain() -> None:
    async with running() as sim, _rest(sim) as rest:
        vdi_id = await rest.create_vdi(SR_NFS_A, 8 * MiB, "shared")
        async with rest.export(vdi_id, "raw") as chunks:
            await anext(aiter(chunks))
            assert _vbds(sim, vdi_id) == [(DOM0_A1, True, True)]
            assert sim.state.get(DOM0_A1)["$container"] == HOST_A1
        await eventually(lambda: _vbds(sim, vdi_id) == [], 10)


async def test_an_import_plugs_the_vdi_read_write_and_unplugs_it_when_the_client_gives_up() -> None:
    async with running() as sim, client(sim) as rpc, _rest(sim) as rest:
        vdi_id = await rest.create_vdi(SR_LOCAL_A1, 8 * MiB, "imported")
        release = asyncio.Event()
        importing = asyncio.create_task(rest.import_(vdi_id, "raw", 8 * MiB, _held(release, 8 * MiB)))
        await eventually(lambda: _vbds(sim, vdi_id) == [(DOM0_A1, True, False)], 10)
        with pytest.raises(RpcError) as busy:  # an import also holds the VDI as an operation
            await rpc.call("vdi.set", {"id": vdi_id, "size": 16 * MiB})
        assert busy.value.xapi_code == "OTHER_OPERATION_IN_PROGRESS"
        importing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await importing
        await eventually(lambda: _vbds(sim, vdi_id) == [], 10)
        await rest.import_(vdi_id, "raw", 8 * MiB, _held(_set(), 8 * MiB))  # a complete import: unplugged after
        assert _vbds(sim, vdi_id) == []


def _set() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


async def test_an_export_breaks_when_a_client_destroys_the_control_domains_vbd() -> None:
    """XAPI lets a client unplug and destroy dom0's VBD (VBD.unplug_force): the stream it served breaks."""
    async with running(stream_rate_bps=4 * MiB) as sim, client(sim) as rpc, _rest(sim) as rest:
        vdi_id = await rest.create_vdi(SR_LOCAL_A1, 64 * MiB, "exported")
        with pytest.raises(XoError, match="export"):
            async with rest.export(vdi_id, "raw") as chunks:
                await anext(aiter(chunks))
                [vbd_id] = sim.state.get(vdi_id)["$VBDs"]
                await cached(sim, vbd_id)
                await rpc.call("vbd.delete", {"id": vbd_id})
                async for _ in chunks:
                    pass
        assert _vbds(sim, vdi_id) == [] and sim.simulator.stats.active_streams == 0


async def test_a_detached_copy_plugs_source_and_target_into_control_domains_for_its_duration() -> None:
    async with running(migration_rate_bps=256 * MiB) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "copied", "size": 128 * MiB, "sr": SR_LOCAL_A1})
        await cached(sim, vdi_id)
        migration = asyncio.create_task(rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2}))
        await eventually(lambda: len(_copies(sim)) == 2, 10)
        [target_id] = [v for v in _copies(sim) if v != vdi_id]
        assert _vbds(sim, vdi_id) == [(DOM0_A1, True, True)]
        assert _vbds(sim, target_id) == [(DOM0_A2, True, False)]
        assert sim.state.get(DOM0_A1)["$container"] == HOST_A1 and sim.state.get(DOM0_A2)["$container"] == HOST_A2
        assert await migration == target_id
        assert _vbds(sim, target_id) == [] and _vbds(sim, target_id, cache=True) == []  # XO answered after its cache
        assert sim.state.get(DOM0_A1)["$VBDs"] == [] and sim.state.get(DOM0_A2)["$VBDs"] == []


def _copies(sim: SimulatorHandle) -> list[str]:
    return [v["id"] for v in sim.state.of_type("VDI") if v["name_label"] == "copied"]


async def test_a_cancelled_copy_leaves_no_control_domain_vbd() -> None:
    async with running(migration_rate_bps=64 * MiB) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "copied", "size": 128 * MiB, "sr": SR_LOCAL_A1})
        await cached(sim, vdi_id)
        migration = asyncio.create_task(rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2}))
        await eventually(lambda: len(sim.state.get(DOM0_A2)["$VBDs"]) == 1, 10)
        await sim.simulator.migrator.close()  # what stopping the simulator does: the copy is rolled back
        with pytest.raises(RpcError, match="TASK_CANCELLED"):
            await migration
        assert _copies(sim) == [vdi_id] and _vbds(sim, vdi_id) == []
        assert sim.state.get(DOM0_A1)["$VBDs"] == [] and sim.state.get(DOM0_A2)["$VBDs"] == []


async def test_a_vdi_being_exported_is_not_migrated() -> None:
    async with running() as sim, client(sim) as rpc, _rest(sim) as rest:
        vdi_id = await rest.create_vdi(SR_LOCAL_A1, 64 * MiB, "exported")
        async with rest.export(vdi_id, "raw") as chunks:
            await anext(aiter(chunks))
            with pytest.raises(RpcError) as busy:
                await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2})
            assert busy.value.xapi_code == "OTHER_OPERATION_IN_PROGRESS"
