"""Placement rules, table-driven (pure)."""

from __future__ import annotations

import pytest

from shared import placement
from shared.errors import CapacityExhausted, PlacementImpossible
from shared.placement import SrView
from shared.units import GiB, MiB
from shared.xo.models import Sr

A1 = SrView("sr-a1", "Local A1", "pool-a", "host-a1", 10 * GiB)
A2 = SrView("sr-a2", "Local A2", "pool-a", "host-a2", 50 * GiB)
B1 = SrView("sr-b1", "Local B1", "pool-b", "host-b1", 30 * GiB)
NFS_A = SrView("nfs-a", "NFS A", "pool-a", None, 100 * GiB)
NFS_B = SrView("nfs-b", "NFS B", "pool-b", None, 5 * GiB)


def test_view_tells_local_from_shared() -> None:
    local = Sr.model_validate({"id": "s", "type": "SR", "$pool": "p", "$container": "h", "shared": False,
                               "size": 10, "usage": 4, "physical_usage": 3, "SR_type": "lvm"})
    shared = Sr.model_validate({"id": "t", "type": "SR", "$pool": "p", "$container": "p", "shared": True})
    assert placement.view(local) == SrView("s", "", "p", "h", 6)
    assert placement.view(shared).is_shared


@pytest.mark.parametrize(
    ("sr_type", "free"),
    [("ext", 70), ("nfs", 70), ("xfs", 70), ("", 70),  # thin: size - physical_usage (usage may exceed size)
     ("lvm", 0), ("lvmoiscsi", 0), ("LVMoHBA", 0)],  # thick: size - usage, never negative
)
def test_free_space_is_physical_on_thin_srs_and_virtual_on_thick_ones(sr_type: str, free: int) -> None:
    sr = Sr.model_validate({"id": "s", "type": "SR", "size": 100, "usage": 150, "physical_usage": 30,
                            "SR_type": sr_type})
    assert placement.free_bytes(sr) == free


@pytest.mark.parametrize(
    ("srs", "size", "requisite", "preferred", "expected"),
    [
        ([A1, A2, B1], GiB, [], [], "sr-a2"),  # roomiest without requirements
        ([A1, A2, B1], GiB, [{"pool": "pool-b"}], [], "sr-b1"),
        ([A1, A2, B1], GiB, [{"pool": "pool-a"}], [{"pool": "pool-a", "host": "host-a1"}], "sr-a1"),
        ([A1, A2, B1], 20 * GiB, [{"pool": "pool-a"}], [{"pool": "pool-a", "host": "host-a1"}], "sr-a2"),
        ([A1, A2, B1], GiB, [], [{"pool": "pool-b", "host": "host-b1"}, {"pool": "pool-a"}], "sr-b1"),
        ([NFS_A, NFS_B], GiB, [{"pool": "pool-b", "host": "host-b1"}], [], "nfs-b"),
        ([NFS_A, NFS_B], GiB, [], [{"pool": "pool-a", "host": "any-host"}], "nfs-a"),
    ],
)
def test_choose_for_create(srs: list[SrView], size: int, requisite: list[dict[str, str]],
                           preferred: list[dict[str, str]], expected: str) -> None:
    assert placement.choose_for_create(srs, size, requisite, preferred).id == expected


def test_no_sr_in_topology_is_placement_impossible() -> None:
    with pytest.raises(PlacementImpossible, match="pool=pool-z"):
        placement.choose_for_create([A1, A2], GiB, [{"pool": "pool-z"}])


def test_no_room_is_capacity_exhausted_naming_the_best_sr() -> None:
    with pytest.raises(CapacityExhausted, match="most free: Local A2 with 50 GiB"):
        placement.choose_for_create([A1, A2], 60 * GiB, [{"pool": "pool-a"}])


def test_unknown_topology_key_never_matches() -> None:
    assert not placement.matches(A1, {"zone": "x"})


@pytest.mark.parametrize(
    ("sr", "host", "pool", "usable"),
    [(A1, "host-a1", "pool-a", True), (A1, "host-a2", "pool-a", False), (NFS_A, "host-a2", "pool-a", True),
     (NFS_A, "host-b1", "pool-b", False)],
)
def test_usable_from(sr: SrView, host: str, pool: str, usable: bool) -> None:
    assert placement.usable_from(sr, host, pool) is usable


def test_choose_for_host_picks_a_usable_sr_with_room() -> None:
    assert placement.choose_for_host([A1, A2, B1], GiB, "host-a1", "pool-a").id == "sr-a1"
    with pytest.raises(CapacityExhausted):
        placement.choose_for_host([A1, A2, B1], 11 * GiB, "host-a1", "pool-a")
    with pytest.raises(PlacementImpossible):
        placement.choose_for_host([A1, A2], GiB, "host-b1", "pool-b")


def test_segments_and_capacity() -> None:
    assert placement.accessible_segments([A1, A2, B1], host_topology=False) == [{"pool": "pool-a"},
                                                                                 {"pool": "pool-b"}]
    assert placement.accessible_segments([A1], host_topology=True) == [{"host": "host-a1", "pool": "pool-a"}]
    assert placement.capacity([A1, A2, B1], {"pool": "pool-a"}) == (60 * GiB, 50 * GiB)
    assert placement.capacity([A1, A2, B1], {"pool": "nope"}) == (0, 0)
    # the largest volume in whole 2 MiB steps: a CreateVolume of an odd size is rounded up to them
    odd = SrView("sr-odd", "Odd", "pool-c", "host-c1", 10 * GiB + 3 * MiB)
    assert placement.capacity([odd], {"pool": "pool-c"}) == (10 * GiB + 3 * MiB, 10 * GiB + 2 * MiB)


@pytest.mark.parametrize(("host_topology", "segments"), [
    (False, {"pool": "pool-a"}),
    (True, {"pool": "pool-a", "host": "host-a1"}),
])
def test_node_segments_name_the_host_only_with_host_topology(host_topology: bool, segments: dict[str, str]) -> None:
    assert placement.node_segments("pool-a", "host-a1", host_topology) == segments


def test_vdi_migrate_never_moves_a_disk_to_another_pool() -> None:
    with pytest.raises(PlacementImpossible, match="only within a pool"):
        placement.choose_for_host([A1, B1], GiB, "host-b1", "pool-b", from_pool="pool-a")
    assert placement.choose_for_host([A1, A2], GiB, "host-a2", "pool-a", from_pool="pool-a").id == "sr-a2"


def test_a_move_across_pools_picks_the_roomiest_sr_usable_from_the_node() -> None:
    """A stream (transfer.py) may go to another pool, by the same rules as a move within one."""
    assert placement.choose_across_pools([A1, A2, B1], GiB, "host-b1", "pool-b").id == "sr-b1"
    assert placement.choose_across_pools([NFS_A, NFS_B, A1], GiB, "host-b7", "pool-b").id == "nfs-b"
    with pytest.raises(CapacityExhausted, match="NFS B"):
        placement.choose_across_pools([NFS_A, NFS_B], 6 * GiB, "host-b7", "pool-b")
    with pytest.raises(PlacementImpossible, match="pool-c"):
        placement.choose_across_pools([NFS_A, NFS_B], GiB, "host-c1", "pool-c")


def test_a_migrating_volume_s_topology_spans_every_pool_with_a_tagged_sr() -> None:
    assert placement.accessible_segments([NFS_A, NFS_B], host_topology=False) == [{"pool": "pool-a"},
                                                                                   {"pool": "pool-b"}]
