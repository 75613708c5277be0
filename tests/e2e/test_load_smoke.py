"""`make load` (bench/load.py) in its CI size: every migrating attach of a crowd completes with one copy per disk,
and nothing is left in the queues or in Redis afterwards. The full size (1,000 volumes, 16 migrators, 500 attaches)
runs with `make load`; its figures are in docs/migrations.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import load

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


async def test_a_crowd_of_migrating_attaches_completes_once_each_and_leaves_nothing_behind(tmp_path: Path) -> None:
    args = load.parser().parse_args(["--volumes", "40", "--attaches", "20", "--migrators", "4", "--size", "16MiB",
                                     "--migration-rate", "64MiB", "--result-ttl-s", "5", "--timeout-s", "150"])

    result = await load.run(tmp_path, args)

    assert "MIGRATOR_JOB_RESULT_TTL_S" not in os.environ  # the short TTL was for its own stack only
    assert result.problems == []
    assert len(result.latencies_s) == 20
    assert len(result.copies) == 20 and set(result.copies.values()) == {1}  # no job lost, none run twice
    assert result.after["queues"] == {"xocsi.migrations": 0, "xocsi.migrations.dead": 0}
    assert result.after["redis_keys_after_ttl"] == 0
    # sampled from the management API, whose counts lag by its statistics interval (5 s): reported, not exact
    assert result.peak["rabbitmq_connections"] >= 1 and result.peak["redis_clients"] >= 1
