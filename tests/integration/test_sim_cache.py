"""XO's object cache in the simulator: lag behind XAPI, one enter/exit per batch, barriers, ids resolved through it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dev.wait import eventually
from services.xo_simulator.topology import derived_id
from shared.units import MiB
from tests.support.sim import SR_LOCAL_A1, SR_NFS_A, VM_A1, RpcError, cached, client, items_of, running

pytestmark = pytest.mark.integration
QUIET = {"noise_events_per_s": 0}  # the lag stays; no background events, so a test can count notifications
HALTED = {"tokens": ["sim-token"], "pools": [{"name_label": "P", "shared_srs": [{"name_label": "NFS", "size": "1TiB"}],
          "hosts": [{"name_label": "h", "vms": [{"name_label": "off", "power_state": "Halted"}]}]}]}
HALTED_VM, HALTED_SR = derived_id("vm", "P", "h", "off"), derived_id("sr", "P", "NFS")


def _about(obj_id: str, notifications: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(n["params"]["type"], n["params"]["items"][obj_id]) for n in notifications
            if obj_id in n.get("params", {}).get("items", {})]


async def test_a_write_returns_before_the_cache_shows_it_and_reads_see_the_old_state() -> None:
    async with running(cache_lag_ms="100-100") as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "old", "size": MiB, "sr": SR_LOCAL_A1})
        started = time.monotonic()
        await rpc.call("vdi.set", {"id": vdi_id, "name_label": "new"})
        assert (await rpc.objects(id=vdi_id))[vdi_id]["name_label"] == "old"  # XO's cache has not caught up
        assert await rpc.objects(type="VDI", name_label="new") == {}
        renamed = await rpc.wait_notification(lambda n: items_of(n, "enter").get(vdi_id, {}).get("name_label") == "new")
        assert time.monotonic() - started >= 0.1
        assert items_of(renamed, "enter")[vdi_id]["name_label"] == "new"
        assert (await rpc.objects(type="VDI", name_label="new")).keys() == {vdi_id}


async def test_waiting_calls_return_once_the_cache_shows_their_object() -> None:
    async with running(cache_lag_ms="300-300") as sim, client(sim) as rpc:
        started = time.monotonic()
        vdi_id = await rpc.call("disk.create", {"name": "waited", "size": MiB, "sr": SR_LOCAL_A1})
        assert time.monotonic() - started >= 0.3  # XO's _getOrWaitObject
        assert vdi_id in sim.cache and (await rpc.objects(id=vdi_id)).keys() == {vdi_id}


async def test_an_id_the_cache_does_not_show_yet_is_code_1() -> None:
    async with running(HALTED, cache_lag_ms="300-300", **QUIET) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "d", "size": MiB, "sr": HALTED_SR})
        assert await rpc.call("vm.attachDisk", {"vm": HALTED_VM, "vdi": vdi_id}) is True
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]  # XAPI has it, XO does not show it yet
        with pytest.raises(RpcError) as info:
            await rpc.call("vbd.delete", {"id": vbd_id})
        assert info.value.error == {"code": 1, "message": f"no such VBD {vbd_id}",
                                    "data": {"id": vbd_id, "type": "VBD"}}
        await cached(sim, vbd_id)
        assert await rpc.call("vbd.delete", {"id": vbd_id}) is True


async def test_changes_of_one_batch_make_one_enter_then_one_exit_with_values_0() -> None:
    async with running(HALTED, **QUIET) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "d", "size": MiB, "sr": HALTED_SR})
        await rpc.call("vm.attachDisk", {"vm": HALTED_VM, "vdi": vdi_id})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        await eventually(lambda: sim.simulator.mirror.pending == 0, timeout_s=10)
        before = await rpc.settled()
        assert await rpc.call("vdi.delete", {"id": vdi_id}) is True  # VDI, VBD, VM and SR change together
        await rpc.wait_notification(lambda n: vdi_id in items_of(n, "exit"))
        await eventually(lambda: sim.simulator.mirror.pending == 0, timeout_s=10)
        await rpc.settled()
        batch = rpc.notifications[before:]
        assert [n["params"]["type"] for n in batch] == ["enter", "exit"]
        assert set(items_of(batch[0], "enter")) == {HALTED_VM, HALTED_SR}
        assert items_of(batch[0], "enter")[HALTED_VM]["$VBDs"] == []
        assert items_of(batch[1], "exit") == {vdi_id: 0, vbd_id: 0}


async def test_what_lives_shorter_than_the_lag_is_never_shown() -> None:
    async with running(HALTED, cache_lag_ms="200-200", **QUIET) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "d", "size": MiB, "sr": HALTED_SR})
        before = await rpc.settled()
        await rpc.call("vm.attachDisk", {"vm": HALTED_VM, "vdi": vdi_id})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        await rpc.call("vdi.set", {"id": vdi_id, "name_label": "renamed"})
        await sim.simulator.xapi.destroy_vbd(vbd_id)  # gone on the XAPI side before XO's next poll
        await rpc.wait_notification(lambda n: items_of(n, "enter").get(vdi_id, {}).get("name_label") == "renamed",
                                    since=before)
        await eventually(lambda: sim.simulator.mirror.pending == 0, timeout_s=10)
        await rpc.settled()
        assert _about(vbd_id, rpc.notifications[before:]) == []
        assert [kind for n in rpc.notifications[before:] if (kind := n["params"]["type"]) == "exit"] == []


async def test_the_cache_never_goes_back_to_an_older_state() -> None:
    async with running(cache_lag_ms="20-150", **QUIET) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "n0", "size": MiB, "sr": SR_NFS_A})
        before = await rpc.settled()
        for number in range(1, 21):
            await rpc.call("vdi.set", {"id": vdi_id, "name_label": f"n{number}"})
        await rpc.wait_notification(lambda n: items_of(n, "enter").get(vdi_id, {}).get("name_label") == "n20",
                                    since=before)
        names = [int(obj["name_label"][1:]) for kind, obj in _about(vdi_id, rpc.notifications[before:])]
        assert names == sorted(names) and names[-1] == 20 and len(names) < 20  # polls see the newest version


async def test_instant_cache_for_benchmarks() -> None:
    async with running(cache_lag_ms=0, noise_events_per_s=0) as sim, client(sim) as rpc:
        vdi_id = await rpc.call("disk.create", {"name": "d", "size": MiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
        vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
        assert sim.cache.get(vbd_id) is sim.state.get(vbd_id)
        assert await rpc.call("vbd.disconnect", {"id": vbd_id}) is True
        assert sim.cache.get(vbd_id)["attached"] is False


async def test_stats_say_how_long_after_its_answer_a_call_s_changes_reached_the_cache() -> None:
    async with running(cache_lag_ms="100-100", noise_events_per_s=200) as sim, client(sim) as rpc:
        stats = sim.simulator.stats
        vdi_id = await rpc.call("disk.create", {"name": "old", "size": MiB, "sr": SR_LOCAL_A1})
        assert stats.cache_wait_s["disk.create"] < 0.05  # it waited for the cache itself before answering
        await rpc.call("vdi.set", {"id": vdi_id, "name_label": "new"})
        assert stats.cache_waits_pending == 1 and "vdi.set" not in stats.cache_wait_s  # the noise is nobody's
        renamed = await rpc.wait_notification(lambda n: items_of(n, "enter").get(vdi_id, {}).get("name_label") == "new")
        assert items_of(renamed, "enter")[vdi_id]["name_label"] == "new"
        await eventually(lambda: stats.cache_waits_pending == 0, timeout_s=10)
        assert 0.09 <= stats.cache_wait_s["vdi.set"] < 1.0  # the lag, from the answer to the notification
        await rpc.objects(id=vdi_id)
        assert stats.cache_wait_s["xo.getAllObjects"] == 0.0 and stats.cache_waits_pending == 0  # reads change nothing


async def test_xos_time_counts_overlapping_calls_and_cache_waits_once() -> None:
    # busy_s and cache_wait_s add up per call; a benchmark that splits a client's time into XO's and its own needs
    # the wall time during which XO had a call or a change outstanding.
    async with running(cache_lag_ms="100-100", noise_events_per_s=200) as sim, client(sim) as rpc:
        stats = sim.simulator.stats
        ids = [await rpc.call("disk.create", {"name": f"d{n}", "size": MiB, "sr": SR_LOCAL_A1}) for n in range(2)]
        await eventually(lambda: stats.cache_waits_pending == 0, timeout_s=10)
        before, waited = stats.snapshot(active_migrations=0, open_connections=1)["xo_time_s"], sum(
            stats.cache_wait_s.values())
        await asyncio.gather(*(rpc.call("vdi.set", {"id": vdi_id, "name_label": "renamed"}) for vdi_id in ids))
        await eventually(lambda: stats.cache_waits_pending == 0, timeout_s=10)
        xo_s = stats.snapshot(active_migrations=0, open_connections=1)["xo_time_s"] - before
        assert sum(stats.cache_wait_s.values()) - waited >= 0.18  # two lags of 100 ms, counted per call
        assert 0.09 <= xo_s < 0.17  # one stretch of XO's time: the two waits overlapped
