"""The notification storm: unrelated objects change in the background and every signed-in socket hears of it."""

from __future__ import annotations

from typing import Any

import pytest

from dev.wait import eventually
from shared.units import MiB
from tests.support.sim import SR_LOCAL_A1, VIEWER_TOKEN, RpcClient, client, items_of, running

pytestmark = pytest.mark.integration
DRIVER_FIELDS = {"VM": ("power_state", "$container", "$VBDs", "name_label", "tags"),
                 "SR": ("size", "usage", "physical_usage", "VDIs", "$container", "shared", "tags"),
                 "host": ("name_label", "enabled", "power_state", "$pool")}


def _ids_of(rpc: RpcClient, obj_type: str) -> set[str]:
    return {obj_id for n in rpc.notifications for obj_id, obj in items_of(n, "enter").items()
            if obj["type"] == obj_type}


def _exited(rpc: RpcClient) -> set[str]:
    return {obj_id for n in rpc.notifications for obj_id in items_of(n, "exit")}


def _types_entered(rpc: RpcClient) -> set[str]:
    return {obj["type"] for n in rpc.notifications for obj in items_of(n, "enter").values()}


async def test_the_default_storm_reaches_every_socket_and_spares_what_the_driver_reads() -> None:
    async with running() as sim, client(sim) as admin, client(sim, token=VIEWER_TOKEN) as viewer:
        before = {obj_id: obj for obj_id, obj in sim.state.all().items() if obj["type"] in DRIVER_FIELDS}
        await eventually(lambda: {"VM", "host", "SR", "task", "message"} <= _types_entered(viewer), timeout_s=20)
        await eventually(lambda: bool(_ids_of(viewer, "task") & _exited(viewer)), timeout_s=20)  # came and went
        assert sim.simulator.noise.emitted >= 5
        for n in viewer.notifications:
            for obj_id, obj in items_of(n, "enter").items():
                if obj_id in before:
                    fields = DRIVER_FIELDS[obj["type"]]
                    assert [obj[f] for f in fields] == [before[obj_id][f] for f in fields], obj["type"]
        # every signed-in socket gets every notification, in the same order
        count = await viewer.settled()
        await admin.settled()
        joined = admin.notifications.index(viewer.notifications[0])
        assert admin.notifications[joined:joined + count] == viewer.notifications[:count]


async def test_a_vm_metrics_update_resends_the_whole_vm() -> None:
    async with running(noise_events_per_s=200) as sim, client(sim) as rpc:
        update = await rpc.wait_notification(lambda n: any(
            o["type"] == "VM" and "usage" in o["memory"] for o in items_of(n, "enter").values()))
        vm = next(o for o in items_of(update, "enter").values() if o["type"] == "VM")
        assert {"id", "type", "$pool", "power_state", "$container", "$VBDs", "CPUs", "memory",
                "mainIpAddress", "addresses"} <= set(vm)
        assert vm["memory"]["usage"] < vm["memory"]["size"] and vm["mainIpAddress"] is not None


async def test_no_storm_when_turned_off_for_benchmarks() -> None:
    async with running(noise_events_per_s=0) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "only", "size": MiB, "sr": SR_LOCAL_A1})
        await rpc.call("vdi.set", {"id": vdi_id, "name_label": "renamed"})
        await rpc.wait_notification(lambda n: items_of(n, "enter").get(vdi_id, {}).get("name_label") == "renamed")
        await eventually(lambda: sim.simulator.mirror.pending == 0, timeout_s=10)
        await rpc.settled()
        changed: set[str] = {obj_id for n in rpc.notifications for obj_id in items_of(n, "enter")}
        assert changed == {vdi_id, SR_LOCAL_A1}
        assert sim.simulator.noise.emitted == 0
        assert [o["type"] for o in sim.state.all().values() if o["type"] in ("task", "message")] == []


async def test_reset_drops_noise_objects_and_the_storm_goes_on() -> None:
    async with running(noise_events_per_s=200) as sim, client(sim) as rpc:
        def live(kind: str) -> list[Any]:
            return [o for o in sim.state.all().values() if o["type"] == kind]

        await eventually(lambda: bool(live("message")), timeout_s=10)
        await sim.simulator.reset(reload_topology=True)
        assert live("message") == [] and live("task") == []
        emitted = sim.simulator.noise.emitted
        await eventually(lambda: sim.simulator.noise.emitted > emitted + 10, timeout_s=10)
        assert (await rpc.call("session.getUser"))["email"] == "admin@example.org"  # the socket stayed signed in
