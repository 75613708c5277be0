"""Topology parsing of the XO simulator: ids, sizes, references, bundled files."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.xo_simulator.topology import derived_id, load_topology, parse_topology

YAML = """
tokens: [t1]
users: [{email: a@b.c, password: pw}]
pools:
  - name_label: P
    shared_srs: [{name_label: NFS, size: 1TiB, tags: [k8s-shared]}]
    hosts:
      - id: 3F2504E0-4F89-11D3-9A0C-0305E82C3301
        name_label: h1
        srs: [{name_label: L1, size: 100GiB}]
        vms: [{name_label: vm1, power_state: Halted}]
vdis: [{name_label: seed, size: 1GiB, sr: L1}]
"""


def test_sizes_accept_units_and_ids_are_derived_from_names() -> None:
    topology = parse_topology(YAML)
    pool = topology.pools[0]
    assert pool.id == derived_id("pool", "P")
    assert pool.shared_srs[0].size == 1024**4
    host = pool.hosts[0]
    assert host.id == "3f2504e0-4f89-11d3-9a0c-0305e82c3301"  # normalised UUID
    assert host.srs[0].size == 100 * 1024**3
    assert host.srs[0].id == derived_id("sr", "P", "h1", "L1")
    assert host.vms[0].power_state == "Halted"
    assert topology.resolve_sr(topology.vdis[0].sr) == host.srs[0].id
    assert parse_topology(YAML).pools[0].hosts[0].srs[0].id == host.srs[0].id  # deterministic


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("pools: [{name_label: P, hosts: [{name_label: h, unknown: 1}]}]", "Extra inputs"),
        ("pools: [{name_label: P, shared_srs: [{name_label: S, size: 10 potatoes}]}]", "size"),
        ("pools: [{name_label: P, hosts: [{name_label: h, id: not-a-uuid}]}]", "UUID"),
        ("vdis: [{name_label: x, size: 1, sr: nowhere}]", "exactly one SR"),
        ("pools: [{name_label: P, hosts: [{name_label: h, vms: [{name_label: v, power_state: On}]}]}]", "power_state"),
        ("pools: [{name_label: P}, {name_label: P}]", "duplicate ids"),
        ("users: [{email: a, password: b, permission: root}]", "permission"),
        ("tokens: [{token: t, user: nobody@example.org}]", "token user"),
        ("tokens: [{token: t, expires_in_s: 0}]", "expires_in_s"),
        ("pools: [{name_label: P, hosts: [{name_label: h, vms: [{name_label: v, root_disk: {size: 1GiB}}]}]}]",
         "root_disk but its host has no SR"),
        ("pools: [{name_label: P, hosts: [{name_label: h, vms: [{name_label: v, disks: [{name_label: d, size: 1}]}]}]}"
         "]", "disk 'd' but its host has no SR"),
        ("pools: [{name_label: P, hosts: [{name_label: h, srs: [{name_label: L, size: 1}], vms: [{name_label: v, "
         "disks: [{name_label: d, size: 1, sr: nowhere}]}]}]}]", "exactly one SR"),
    ],
)
def test_invalid_topologies_are_rejected_with_a_reason(yaml_text: str, message: str) -> None:
    with pytest.raises((ValidationError, ValueError), match=message):
        parse_topology(yaml_text)


@pytest.mark.parametrize("name", ["two-hosts", "shared-pool", "two-pools"])
def test_bundled_topologies_load_with_the_example_credentials(name: str) -> None:
    topology = load_topology(name)
    assert [(t.token, t.user, t.expires_in_s) for t in topology.tokens] == [
        ("sim-token", None, None), ("viewer-token", "viewer@example.org", None)]
    assert [(u.email, u.permission) for u in topology.users] == [
        ("admin@example.org", "admin"), ("viewer@example.org", "none")]
    assert all(pool.shared_srs and "k8s-shared" in pool.shared_srs[0].tags for pool in topology.pools)
    assert all(vm.power_state == "Running" for _, vm in topology.vms())
    for pool, host in topology.hosts():  # every node VM has a system disk, on its host's SR if it has one
        for vm in host.vms:
            assert vm.root_disk is not None and vm.root_disk.size == 10 * 1024**3
            expected = host.srs[0].id if host.srs else pool.shared_srs[0].id
            assert topology.root_disk_sr(pool, host, vm) == expected


def test_defaults_follow_xo_permission_none_tokens_of_the_first_user_and_no_online_resize() -> None:
    topology = parse_topology(YAML)
    assert topology.users[0].permission == "none"
    assert [(t.token, t.user, t.expires_in_s) for t in topology.tokens] == [("t1", None, None)]
    assert topology.pools[0].shared_srs[0].resize_online is False
    assert topology.pools[0].hosts[0].vms[0].root_disk is None
    explicit = parse_topology(YAML.replace("tokens: [t1]", "tokens: [t1, {token: t2, user: a@b.c, expires_in_s: 90}]"))
    assert [(t.token, t.user, t.expires_in_s) for t in explicit.tokens] == [("t1", None, None), ("t2", "a@b.c", 90)]


def test_two_pools_has_local_migrating_srs_on_every_host() -> None:
    topology = load_topology("two-pools")
    assert len(topology.pools) == 2
    for _, host in topology.hosts():
        assert [sr.tags for sr in host.srs] == [["k8s-migrating"]]
        assert len(host.vms) == 1


def test_a_vm_may_have_data_disks_next_to_its_root_disk() -> None:
    topology = parse_topology(YAML.replace("vms: [{name_label: vm1, power_state: Halted}]", "vms: [{name_label: vm1, "
                                           "root_disk: {size: 2GiB}, disks: [{name_label: logs, size: 1GiB, sr: NFS, "
                                           "name_description: app logs}, {name_label: db, size: 5GiB}]}]"))
    pool = topology.pools[0]
    host = pool.hosts[0]
    vm = host.vms[0]
    assert [(d.name_label, d.size, d.name_description) for d in vm.disks] == [
        ("logs", 1024**3, "app logs"), ("db", 5 * 1024**3, "")]
    assert [topology.disk_sr(pool, host, vm, d) for d in vm.disks] == [pool.shared_srs[0].id, host.srs[0].id]
