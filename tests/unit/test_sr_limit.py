"""The per-SR migration limit without a network: SrSlots' arguments and keys, and how
the setting reaches the migrator's handler (env, flag). The Redis side is in tests/integration/test_sr_limit.py."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from services.migrator.__main__ import build_parser, load_settings
from services.migrator.app import handler_deps
from services.migrator.settings import MigratorSettings
from shared.keys import sr_slots_key
from shared.locks import SrSlots


def test_keys_are_built_per_sr_deduplicated_and_in_a_stable_order() -> None:
    slots = SrSlots(aioredis.Redis(), "xocsi:", ["sr-b", "sr-a", "sr-b"], limit=2, lease_s=30, wait_s=5, owner="csi-1")
    assert slots.sr_ids == ["sr-a", "sr-b"]
    assert slots.keys == [sr_slots_key("xocsi:", "sr-a"), sr_slots_key("xocsi:", "sr-b")]
    assert slots.keys[0] == "xocsi:slots:sr:sr-a"
    assert slots.token.startswith("csi-1:")
    other = SrSlots(aioredis.Redis(), "xocsi:", ["sr-a"], limit=2, lease_s=30, wait_s=5, owner="csi-1")
    assert other.token != slots.token  # a lease token is unique per hold


@pytest.mark.parametrize(
    ("sr_ids", "limit", "lease_s", "wait_s"),
    [([], 1, 30, 5), (["sr-a"], 0, 30, 5), (["sr-a"], 1, 0, 5), (["sr-a"], 1, 30, -1)],
)
def test_nonsense_arguments_are_refused(sr_ids: list[str], limit: int, lease_s: float, wait_s: float) -> None:
    with pytest.raises(ValueError):
        SrSlots(aioredis.Redis(), "xocsi:", sr_ids, limit=limit, lease_s=lease_s, wait_s=wait_s)


def test_the_limit_reaches_the_handler_from_the_env_or_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler_limit(settings: MigratorSettings) -> int:
        return handler_deps(settings, xo=None, redis=None, key_prefix="xocsi:").per_sr_limit  # type: ignore[arg-type]

    assert handler_limit(MigratorSettings()) == 0  # unset: no limit (integration: the handler then takes no slot)
    monkeypatch.setenv("MIGRATOR_PER_SR_LIMIT", "3")
    assert handler_limit(MigratorSettings()) == 3
    settings, *_ = load_settings(build_parser().parse_args(["--per-sr-limit", "2"]))
    assert handler_limit(settings) == 2  # the flag overrides the env


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        MigratorSettings(per_sr_limit=-1)
