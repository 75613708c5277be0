"""shared/backoff.py: the delays every retry loop and capped poll sleeps, and ``retrying``."""

from __future__ import annotations

import itertools
import random

import pytest

from services.migrator.consumer import RESUME_BACKOFF
from shared.backoff import Backoff, retrying
from shared.locks import SLOT_BACKOFF


def test_delays_double_from_the_start_and_stop_at_the_cap() -> None:
    assert list(itertools.islice(Backoff(0.02, 0.5, jitter=False).delays(), 8)) == pytest.approx(
        [0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5, 0.5])
    assert Backoff(0.5, 30, jitter=False).delay_s(10) == 30
    assert Backoff(0.5, 0, jitter=False).delay_s(0) == 0  # a cap of 0 turns the wait off


def test_jitter_draws_each_delay_from_its_upper_half_and_never_repeats_a_lockstep() -> None:
    ceilings = [0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    delays = list(itertools.islice(SLOT_BACKOFF.delays(random.Random(7)), len(ceilings)))
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)
    assert max(itertools.islice(RESUME_BACKOFF.delays(random.Random(1)), 1000)) <= 5.0


async def test_retrying_retries_what_it_may_and_returns_the_first_success() -> None:
    seen: list[Exception] = []
    attempts: list[int] = []

    async def flaky(attempt: int) -> str:
        attempts.append(attempt)
        if attempt < 3:
            raise ConnectionError(f"try {attempt}")
        return "done"

    result = await retrying(flaky, backoff=Backoff(0.001, 0.002), retry_if=lambda e: isinstance(e, ConnectionError),
                            on_retry=seen.append)
    assert (result, attempts) == ("done", [0, 1, 2, 3])
    assert [str(e) for e in seen] == ["try 0", "try 1", "try 2"]


async def test_retrying_raises_a_refused_error_at_once_and_an_accepted_one_after_the_deadline() -> None:
    calls = 0

    async def broken(_: int) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        await retrying(broken, backoff=Backoff(0.001, 0.001), retry_if=lambda e: isinstance(e, ConnectionError))
    assert calls == 1

    calls = 0
    with pytest.raises(ValueError, match="bad input"):
        await retrying(broken, backoff=Backoff(0.001, 0.001), retry_if=lambda e: True, give_up_after_s=0.05)
    assert calls > 1
