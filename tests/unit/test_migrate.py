"""The migrator without a network: which of two same-named VDIs is the source (settle_duplicates), and the
health probes' verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from services.migrator.health import HealthServer
from services.migrator.migrate import settle_duplicates
from shared.errors import OperationPending, PreconditionFailed
from shared.xo.models import Vdi

MARK_TO_B = 'csi:info: {"migrating":{"inProgressToSRUUID":"sr-b"},"srsWithTag":"k8s"}'


def _vdi(vdi_id: str, sr_id: str, **fields: Any) -> Vdi:
    return Vdi.model_validate({"id": vdi_id, "type": "VDI", "$SR": sr_id, "name_label": "csi-a", **fields})


@pytest.mark.parametrize(
    ("vdis", "seen", "keep", "stray"),
    [
        ([_vdi("v1", "sr-a"), _vdi("v2", "sr-b")], "v1", "v1", "v2"),  # the requester saw the source
        ([_vdi("v2", "sr-b"), _vdi("v1", "sr-a")], "v1", "v1", "v2"),
        ([_vdi("v1", "sr-a", name_description=MARK_TO_B), _vdi("v2", "sr-b", name_description=MARK_TO_B)],
         "gone", "v1", "v2"),  # else: the one not on the SR the mark names
    ],
)
def test_the_complete_source_is_kept(vdis: list[Vdi], seen: str, keep: str, stray: str) -> None:
    source, copy = settle_duplicates("csi-a", vdis, seen)
    assert (source.id, copy.id) == (keep, stray)


@pytest.mark.parametrize(
    ("vdis", "seen", "error"),
    [
        ([_vdi("v1", "sr-a", current_operations={"t": "copy"}), _vdi("v2", "sr-b")], "v1", OperationPending),
        ([_vdi("v1", "sr-a"), _vdi("v2", "sr-b"), _vdi("v3", "sr-c")], "v1", PreconditionFailed),
        ([_vdi("v1", "sr-a"), _vdi("v2", "sr-b")], "gone", PreconditionFailed),  # neither seen nor marked
        ([_vdi("v1", "sr-a"), _vdi("v2", "sr-b", **{"$VBDs": ["vbd-1"]})], "v1", PreconditionFailed),  # copy in use
    ],
)
def test_anything_ambiguous_is_left_to_an_operator(vdis: list[Vdi], seen: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        settle_duplicates("csi-a", vdis, seen)


async def _ok() -> None:
    return None


async def _down() -> None:
    raise ConnectionError("refused")


async def test_readiness_needs_every_check() -> None:
    health = HealthServer(loop_age_s=lambda: 0.0, checks={"redis": _ok, "xo": _down}, liveness_timeout_s=5,
                          probe_timeout_s=1)
    ready, report = await health.readiness()
    assert not ready
    assert report == {"redis": "ok", "xo": "ConnectionError: refused"}


@pytest.mark.parametrize(("age_s", "alive"), [(0.5, True), (4.9, True), (5.0, False)])
async def test_liveness_is_the_consume_loop_age(age_s: float, alive: bool) -> None:
    health = HealthServer(loop_age_s=lambda: age_s, checks={}, liveness_timeout_s=5, probe_timeout_s=1)
    assert (await health.liveness()) == (alive, {"consume_loop_age_s": age_s})
