"""The benchmarks' machine line gives the cost of a hop between processes on idle cores (bench/wakeup.py)."""

from __future__ import annotations

import re

from bench import wakeup


def test_the_machine_line_gives_a_round_trip_between_idle_cores_in_microseconds() -> None:
    line = wakeup.across_cores()

    found = re.fullmatch(r"a round trip between idle cores (\d+) us p50, (\d+) us p99", line)
    assert found is not None, line
    p50_us, p99_us = int(found[1]), int(found[2])
    assert 0 < p50_us <= p99_us
