"""Latency specs and fault rules of the XO simulator."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.xo_simulator.errors import XapiError, XoApiError
from services.xo_simulator.faults import Faults, Latency


def test_latency_parses_global_and_per_method_values() -> None:
    assert Latency.parse("20").for_method_s("x") == pytest.approx(0.02)
    latency = Latency.parse("vdi.migrate=50,*=2")
    assert latency.for_method_s("vdi.migrate") == pytest.approx(0.05)
    assert latency.for_method_s("vdi.set") == pytest.approx(0.002)
    assert Latency.parse(None).for_method_s("x") == 0
    with pytest.raises(ValueError, match="latency"):
        Latency.parse("vdi.migrate=slow")


def test_error_rules_fire_count_times_then_stop() -> None:
    faults = Faults()
    faults.add(Faults.parse([{"method": "vdi.migrate", "xapi": "SR_BACKEND_FAILURE_44", "count": 2},
                             {"method": "*", "error": {"code": 5, "message": "forbidden operation: x"}}]))
    first = faults.pick("vdi.migrate")
    assert first is not None and isinstance(first.to_error("vdi.migrate"), XapiError)
    assert faults.pick("vdi.migrate") is first
    third = faults.pick("vdi.migrate")  # falls through to the catch-all rule
    assert third is not None and isinstance(error := third.to_error("vdi.migrate"), XoApiError)
    assert error.code == 5
    assert faults.rules()[0]["count"] == 0


def test_rate_draws_are_reproducible_with_a_seed() -> None:
    def fired(seed: int) -> list[bool]:
        faults = Faults(seed=seed)
        faults.add(Faults.parse({"kind": "drop_socket", "method": "m", "rate": 0.5}))
        return [faults.pick("m") is not None for _ in range(40)]

    assert fired(7) == fired(7)
    assert 0 < sum(fired(7)) < 40


@pytest.mark.parametrize("spec", [
    {"method": "m"},  # neither error nor xapi
    {"method": "m", "xapi": "X", "error": {"code": 1, "message": "m"}},
    {"xapi": "X"},  # error rules need a method
    {"kind": "drop_socket", "xapi": "X"},
    {"method": "m", "xapi": "X", "rate": 2},
    {"method": "m", "xapi": "X", "surprise": True},
    {"kind": "pool_disconnect"},  # which pool?
    {"kind": "pool_disconnect", "pool": "p", "duration_s": 0},
    {"kind": "drop_socket", "method": "m", "pool": "p"},
    {"kind": "expire_sessions", "duration_s": 5},
    {"method": "vdi.set", "xapi": "X", "after_bytes": 10},  # after_bytes: REST content streams only
    {"method": "rest.vdi.export", "xapi": "X", "after_bytes": -1},
])
def test_invalid_rules_are_rejected(spec: dict) -> None:
    with pytest.raises(ValidationError):
        Faults.parse(spec)


def test_actions_are_not_stored_as_rules() -> None:
    faults = Faults()
    faults.add(Faults.parse([{"kind": "expire_sessions"}, {"kind": "pool_disconnect", "pool": "p", "duration_s": 2}]))
    assert faults.rules() == []
    rule = Faults.parse({"kind": "pool_disconnect", "pool": "p"})[0]
    assert (rule.pool, rule.duration_s) == ("p", None)  # until the faults are cleared


def test_rest_calls_match_only_rules_naming_them() -> None:
    faults = Faults()
    faults.add(Faults.parse([{"method": "*", "error": {"code": 21, "message": "operation failed"}},
                             {"kind": "drop_socket", "method": "rest.vdi.import", "after_bytes": 1024}]))
    assert faults.pick("rest.vdi.export", exact=True) is None  # a JSON-RPC catch-all does not cut REST streams
    rule = faults.pick("rest.vdi.import", exact=True)
    assert rule is not None and (rule.kind, rule.after_bytes) == ("drop_socket", 1024)
    assert faults.pick("vdi.set") is not None  # JSON-RPC methods still see the catch-all


def test_after_calls_lets_that_many_matching_calls_through_first() -> None:
    faults = Faults()
    faults.add(Faults.parse({"kind": "drop_socket", "method": "vdi.set", "after_calls": 2, "count": 1}))
    assert [faults.pick("vdi.set") is not None for _ in range(4)] == [False, False, True, False]
    assert faults.pick("vdi.delete") is None
