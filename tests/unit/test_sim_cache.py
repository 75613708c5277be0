"""XO's cache mirror in the simulator: lag parsing, batching, hidden pools, barriers (no server, no network)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from services.xo_simulator.cache import CacheMirror, Lag
from services.xo_simulator.model import ObjectStore


def _obj(obj_id: str, pool: str, **extra: Any) -> dict[str, Any]:
    return {"id": obj_id, "uuid": obj_id, "type": "VDI", "$pool": pool, "_xapiRef": f"OpaqueRef:{obj_id}", **extra}


def _mirror(lag: str | float = 0) -> tuple[ObjectStore, CacheMirror, list[tuple[list[str], list[str]]]]:
    truth = ObjectStore()
    mirror = CacheMirror(truth, Lag.parse(lag), random.Random(1))
    batches: list[tuple[list[str], list[str]]] = []
    mirror.cache.subscribe(lambda entered, exited: batches.append((list(entered), list(exited))))
    return truth, mirror, batches


@pytest.mark.parametrize(("spec", "low", "high"), [("20-150", 20, 150), ("50", 50, 50), (0, 0, 0), (None, 0, 0),
                                                   ("0-0", 0, 0)])
def test_lag_parses_ms_or_ranges(spec: str | float | None, low: float, high: float) -> None:
    lag = Lag.parse(spec)
    assert (lag.low_ms, lag.high_ms, lag.is_instant) == (low, high, high == 0)


@pytest.mark.parametrize("spec", ["150-20", "-5", "soon", "1-2-3"])
def test_lag_refuses_nonsense(spec: str) -> None:
    with pytest.raises(ValueError, match="cache lag"):
        Lag.parse(spec)


def test_an_instant_cache_follows_each_truth_batch_as_one_batch() -> None:
    truth, mirror, batches = _mirror(0)
    with truth.batch():
        truth.add(_obj("a", "p1"))
        truth.add(_obj("b", "p1"))
    truth.remove("a")
    assert batches == [(["a", "b"], []), ([], ["a"])]
    assert mirror.cache.get("b") is truth.get("b")


def test_a_lost_pool_leaves_in_one_exit_and_returns_current_in_one_enter() -> None:
    truth, mirror, batches = _mirror(0)
    with truth.batch():
        for obj_id, pool in (("a", "p1"), ("b", "p1"), ("c", "p2")):
            truth.add(_obj(obj_id, pool))
    batches.clear()
    mirror.hide_pool("p1")
    assert batches == [([], ["a", "b"])] and mirror.hidden_pools == ["p1"] and not mirror.is_connected("p1")
    truth.update("a", {"size": 2})  # XAPI goes on
    truth.remove("b")
    truth.add(_obj("d", "p1"))
    assert batches == [([], ["a", "b"])]  # nothing of p1 reaches the cache
    mirror.show_pool("p1")
    assert batches[-1] == (["a", "d"], []) and mirror.cache.get("a")["size"] == 2
    mirror.show_pool("p1")  # already connected: no-op
    assert len(batches) == 2


async def test_a_lagged_cache_applies_due_changes_by_reading_the_current_truth() -> None:
    truth, mirror, batches = _mirror("30-30")
    truth.add(_obj("a", "p1", name_label="one"))
    truth.update("a", {"name_label": "two"})
    assert mirror.cache.find("a") is None and mirror.pending == 1
    await mirror.barrier()
    assert mirror.cache.get("a")["name_label"] == "two" and batches == [(["a"], [])]
    truth.add(_obj("tmp", "p1"))
    truth.remove("tmp")  # lived shorter than the lag
    await mirror.barrier()
    assert batches == [(["a"], [])] and mirror.pending == 0


async def test_a_barrier_waits_for_a_lost_pool_and_close_releases_everything() -> None:
    truth, mirror, _ = _mirror("10-10")
    truth.add(_obj("a", "p1"))
    mirror.hide_pool("p1")
    waiting = asyncio.create_task(mirror.barrier("p1"))
    await asyncio.wait_for(mirror.barrier(), 1)  # the change itself was applied (and hidden)
    assert not waiting.done() and "a" not in mirror.cache
    mirror.show_pool("p1")
    await asyncio.wait_for(waiting, 1)
    assert "a" in mirror.cache
    truth.add(_obj("b", "p1"))
    mirror.hide_pool("p1")
    blocked = asyncio.create_task(mirror.barrier("p1"))
    await asyncio.sleep(0)
    mirror.close()
    await asyncio.wait_for(blocked, 1)
    assert mirror.pending == 0


async def test_flush_applies_everything_now() -> None:
    truth, mirror, batches = _mirror("10000")
    truth.add(_obj("a", "p1"))
    truth.add(_obj("b", "p1"))
    mirror.flush()
    assert batches == [(["a", "b"], [])] and mirror.pending == 0
    await asyncio.wait_for(mirror.barrier(), 1)
