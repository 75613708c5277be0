"""Generated topologies of the XO simulator (issue 14): the spec, the shape an operator would recognise, determinism."""

from __future__ import annotations

import pytest

from services.xo_simulator import shapes
from services.xo_simulator.generated import GeneratedSpec, generate, main
from services.xo_simulator.inventory import populate
from services.xo_simulator.model import ObjectStore
from services.xo_simulator.xapi import Xapi
from shared import vdi_metadata

SMALL = GeneratedSpec(pools=2, hosts=4, vms=40, vdis=200, seed=3)


def test_the_spec_reads_any_subset_of_its_fields() -> None:
    assert GeneratedSpec.parse("generated:") == GeneratedSpec(pools=4, hosts=32, vms=2000, vdis=10000, seed=1, csi=0.15)
    assert GeneratedSpec.parse("generated:vms=100, vdis=300,csi=0.5") == GeneratedSpec(vms=100, vdis=300, csi=0.5)


@pytest.mark.parametrize(("text", "message"), [
    ("generated:pods=3", "'pods=3' must be KEY=VALUE, KEY one of pools, hosts, vms, vdis, seed, csi"),
    ("generated:vms", "'vms' must be KEY=VALUE"),
    ("generated:vms=many", "'many' is not a number"),
    ("generated:vms=10", "vms >= hosts \\(32\\)"),
    ("generated:vms=100,vdis=50,hosts=4", "vdis >= vms \\(100\\): every VM has its root disk"),
    ("generated:pools=5,hosts=4", "1 <= pools <= hosts"),
    ("generated:csi=2", "0 <= csi <= 1"),
])
def test_a_bad_spec_names_the_term_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GeneratedSpec.parse(text)


def _objects(spec: GeneratedSpec) -> ObjectStore:
    store = ObjectStore()
    populate(Xapi(store), generate(spec))
    return store


def test_sizes_are_exact_and_every_host_has_its_tagged_srs_and_a_running_node_vm() -> None:
    store = _objects(SMALL)
    counts = {kind: len(store.of_type(kind)) for kind in ("pool", "host", "SR", "VM", "VDI")}
    assert counts == {"pool": 2, "host": 4, "SR": 6, "VM": 40, "VDI": 200}
    for host in store.of_type("host"):
        local = [sr for sr in store.of_type("SR") if sr["$container"] == host["id"]]
        assert [sr["tags"] for sr in local] == [["k8s-migrating"]]
        nodes = [vm for vm in store.of_type("VM") if vm["$container"] == host["id"]
                 and vm["name_label"].startswith("node-")]
        assert [vm["power_state"] for vm in nodes] == ["Running"]
    shared = [sr for sr in store.of_type("SR") if sr["shared"]]
    assert sorted(sr["$container"] for sr in shared) == sorted(pool["id"] for pool in store.of_type("pool"))
    assert all(sr["tags"] == ["k8s-shared"] for sr in shared)


def test_every_vm_has_its_root_disk_and_running_vms_have_their_disks_plugged() -> None:
    store = _objects(SMALL)
    for vm in store.of_type("VM"):
        vbds = [store.get(vbd_id) for vbd_id in vm["$VBDs"]]
        assert [vbd["position"] for vbd in vbds][:1] == ["0"] and vbds[0]["bootable"] is True
        assert "3" not in [vbd["position"] for vbd in vbds]  # the CD's position
        running = vm["power_state"] == "Running"
        assert all(vbd["attached"] is running for vbd in vbds)
        if running:
            assert [vbd["device"] for vbd in vbds] == [shapes.device_name(int(vbd["position"])) for vbd in vbds]
        for vbd in vbds:  # a running VM's host can use each of its disks' SRs
            sr = store.get(store.get(vbd["VDI"])["$SR"])
            assert sr["$pool"] == vm["$pool"] and (sr["shared"] or sr["$container"] == vm["$container"]
                                                   or not running)


def test_a_share_of_the_other_vdis_are_driver_disks_of_their_class_some_in_use_by_a_node() -> None:
    store = _objects(SMALL)
    volumes = [vdi for vdi in store.of_type("VDI") if vdi["name_label"].startswith("csi-pvc-")]
    assert len(volumes) == round((SMALL.vdis - SMALL.vms) * SMALL.csi)
    for vdi in volumes:
        info = vdi_metadata.parse(vdi["name_description"])
        sr = store.get(vdi["$SR"])
        assert info is not None and info.srs_with_tag in sr["tags"] and info.migrating is (not sr["shared"])
        for vbd_id in vdi["$VBDs"]:
            assert store.get(store.get(vbd_id)["VM"])["name_label"].startswith("node-")
    in_use = [vdi for vdi in volumes if vdi["$VBDs"]]
    assert 0 < len(in_use) < len(volumes)
    sr_usage = {sr["id"]: sum(store.get(v)["size"] for v in sr["VDIs"]) for sr in store.of_type("SR")}
    assert {sr["id"]: sr["usage"] for sr in store.of_type("SR")} == sr_usage  # accounted once, correctly


def test_the_same_spec_gives_the_same_objects_and_another_seed_others() -> None:
    first, again = _objects(SMALL), _objects(SMALL)
    assert first.all().keys() == again.all().keys()
    assert [v["name_label"] for v in first.of_type("VDI")] == [v["name_label"] for v in again.of_type("VDI")]
    other = _objects(GeneratedSpec(pools=2, hosts=4, vms=40, vdis=200, seed=4))
    assert [v["name_label"] for v in other.of_type("VDI")] != [v["name_label"] for v in first.of_type("VDI")]


def test_the_module_prints_the_yaml_of_a_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generated:pools=1,hosts=1,vms=2,vdis=3"]) == 0
    text = capsys.readouterr().out
    assert "name_label: node-1-01" in text and "name_label: vm-00001" in text and "sim-token" in text
    assert main(["generated:vms=x"]) == 2
    assert "'x' is not a number" in capsys.readouterr().err
