"""The real Kubernetes machinery drives the driver (issue 11): kube-apiserver + the PV controllers, and
csi-provisioner, csi-attacher and csi-resizer run with exactly the args of k8s/base/controller.yaml, two controller
replicas electing leaders through Leases, against the frontends, migrators and node plugins as separate processes.

The test plays scheduler (selected-node annotation), kubelet (Node/CSINode from NodeGetInfo, NodeStage/NodePublish,
the PVC's filesystem-resize status) and attach-detach controller (VolumeAttachments). Each scenario asserts what a
user sees with kubectl and what XO holds, and prints its timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
import pytest_asyncio

from dev.wait import eventually
from shared import volume_id as vid
from shared.csi import csi_pb2
from shared.units import MiB
from tests.k8s import kubelet
from tests.k8s.cluster import KubectlError, Obj
from tests.k8s.conftest import MIGRATION_RATE, record
from tests.k8s.deployment import LEASES, PODS, Deployed
from tests.k8s.objects import APPS, NAMESPACE, attachment, attachment_name, claim, static_volume, storage_class
from tests.k8s.sidecars import SIDECARS
from tests.k8s.views import (
    affinity_terms,
    capacities,
    copy_seconds,
    copying,
    filesystem_bytes,
    free_of,
    provisioner_reasons,
    quantity,
    segments_of,
    sorted_dicts,
)
from tests.support.e2e import create, host_segment, migrations_of, sha256_of, srs_of, write_file

pytestmark = [pytest.mark.k8s, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

MIGRATING_CLASS = "xoa-migrating"
Expansion = csi_pb2.PluginCapability.VolumeExpansion
_Cap = csi_pb2.ControllerServiceCapability.RPC
DATA_BYTES = 64 * MiB  # written before a move: the sparse copy moves about this much (~2 s)
FAILOVER_DATA_BYTES = 160 * MiB  # ~5 s of copy: the leader dies while it runs


async def delete_claim(env: Deployed, pvc: str, pv: str) -> None:
    await env.cluster.delete("pvc", pvc, APPS)
    await env.gone("pv", pv)


# --- the controller pods ----------------------------------------------------------------------------------


async def test_running_sidecars_have_the_manifest_args_and_lead_as_their_pod(driver: Deployed, timer: None) -> None:
    """What runs is what test_manifest_args checks (the process's own argv); each lease names its pod."""
    for replica in driver.replicas.values():
        for name in SIDECARS:
            cmdline = Path(f"/proc/{replica.processes[name].pid}/cmdline").read_bytes().split(b"\0")[:-1]
            assert [part.decode() for part in cmdline] == driver.config.sidecar_argv(name, replica.socket)
    assert await driver.lease_holders() == dict.fromkeys(LEASES.values(), PODS[0])


# --- 1. WaitForFirstConsumer, topology, capacity ------------------------------------------------------------


async def test_wait_for_first_consumer_claim_binds_near_its_node_and_capacity_follows(driver: Deployed, timer: None
                                                                                       ) -> None:
    env = driver
    await env.cluster.apply(storage_class("storageclass-xoa-migrating.yaml"))
    segments = await segments_of(env)
    hosts = {vm: seg["host"] for vm, seg in segments.items()}
    # capacity tracking: one object per topology segment of the class, owned by the controller Deployment
    before = await capacities(env, MIGRATING_CLASS, len(segments))
    assert sorted_dicts(c["nodeTopology"]["matchLabels"] for c in before.values()) == sorted_dicts(segments.values())
    for capacity in before.values():
        (owner,) = capacity["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"]) == ("Deployment", "xo-csi-controller")
    assert quantity(before[hosts["node-a1"]]["capacity"]) == await free_of(env, "Local A1")
    allocated_before = next(sr.usage for sr in await env.stack.xo.find_srs() if sr.name_label == "Local A1")

    await env.cluster.apply(claim("data-wffc", MIGRATING_CLASS, "256Mi", node="node-a1"))
    pvc, pv = await env.bound("data-wffc")
    name = pv["metadata"]["name"]
    assert pv["spec"]["csi"]["volumeHandle"] == f"name:{name}"
    assert pv["spec"]["capacity"]["storage"] == "256Mi" and pvc["status"]["capacity"]["storage"] == "256Mi"
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    # the disk sits next to the selected node; a migrating volume may be attached anywhere in its pool
    assert [sr.name_label for sr in await env.stack.xo.find_srs() for v in await env.stack.xo.find_vdis(
        name_label=f"csi-{name}") if v.sr_id == sr.id] == ["Local A1"]
    assert affinity_terms(pv) == sorted_dicts({k: [v] for k, v in seg.items()} for seg in segments.values())
    # provisioned at the first try: no ProvisioningFailed, no retry
    assert provisioner_reasons(await env.cluster.events(APPS, "data-wffc")) == ["Provisioning", "ProvisioningSucceeded"]

    # the provisioner refreshes the capacity of the PV's segments after provisioning: the SR's room as XO shows it
    # now. Local A1 is thin (ext): the disk adds 256 MiB to its virtual allocation but takes physical space only as
    # data is written, and thin room is size - physical usage (shared/placement.py free_bytes).
    (local_a1,) = [sr for sr in await env.stack.xo.find_srs() if sr.name_label == "Local A1"]
    assert local_a1.usage >= allocated_before + 256 * MiB

    async def refreshed() -> dict[str, Obj]:
        now = await capacities(env, MIGRATING_CLASS, len(segments))
        assert quantity(now[hosts["node-a1"]]["capacity"]) == await free_of(env, "Local A1")
        return now
    after = await eventually(refreshed, 30, interval_s=0.5, description="capacity of node-a1's segment refreshed")
    assert after[hosts["node-a2"]]["capacity"] == before[hosts["node-a2"]]["capacity"]
    await delete_claim(env, "data-wffc", name)
    assert await env.vdis(f"csi-{name}") == []


async def _migrating_volume(env: Deployed, claim_name: str, size: str) -> tuple[str, str, str]:
    """A bound claim of the migrating class made for node-a1: its PV name, disk (VDI name) and volume handle."""
    await env.cluster.apply(storage_class("storageclass-xoa-migrating.yaml"))
    await env.cluster.apply(claim(claim_name, MIGRATING_CLASS, size, node="node-a1"))
    _, pv = await env.bound(claim_name)
    name = pv["metadata"]["name"]
    return name, f"csi-{name}", pv["spec"]["csi"]["volumeHandle"]


# --- 2. attach, detach, attach elsewhere through a migration ------------------------------------------------


async def test_volume_attachment_attaches_detaches_and_follows_its_pod_through_a_migration(
        driver: Deployed, timer: None) -> None:
    env, stack = driver, driver.stack
    name, disk, handle = await _migrating_volume(env, "data-move", "256Mi")

    va, _ = await env.attach(name, "node-a1")
    assert va["metadata"]["annotations"]["csi.alpha.kubernetes.io/node-id"] == stack.vm_ids["node-a1"]
    assert await env.vbds(disk) == [(stack.vm_ids["node-a1"], True)]
    assert await migrations_of(stack, disk) == 0  # created on node-a1's host: attach only
    async with kubelet.mounted(env, "node-a1", name) as target:
        checksum = await asyncio.to_thread(write_file, target / "data.bin", DATA_BYTES)
    await env.detach(name, "node-a1")
    assert await env.vbds(disk) == []  # detached: the VBD is gone in XO

    # node-a2 is on the other host: the attacher's one ControllerPublishVolume (--timeout=300s) waits for the copy
    va, attach_s = await env.attach(name, "node-a2")
    assert await migrations_of(stack, disk) == 1
    assert await srs_of(stack, disk) == ["Local A2"]
    assert await env.vbds(disk) == [(stack.vm_ids["node-a2"], True)]
    # every call answered OK: the one that waited for the copy did not time out nor answer ABORTED (no backoff).
    # (The attacher may publish an attached volume twice: it re-syncs the VA on its own status update.)
    assert set(env.rpc_codes("ControllerPublishVolume", handle)) == {"OK"}
    assert env.rpc_codes("ControllerUnpublishVolume", handle) == ["OK"]
    async with kubelet.mounted(env, "node-a2", name) as target:
        assert await asyncio.to_thread(sha256_of, target / "data.bin") == checksum
    record("VolumeAttachment created -> attached on the other host", attach_s,
           f"(copy {copy_seconds(stack, disk):.1f} s of {DATA_BYTES // MiB} MiB at {MIGRATION_RATE}/s)")

    await env.detach(name, "node-a2")
    assert await env.vbds(disk) == []
    await delete_claim(env, "data-move", name)
    assert await env.vdis(disk) == []


# --- 3. the attacher's reconcile (LIST_VOLUMES_PUBLISHED_NODES) ----------------------------------------------

RECONCILE_SYNC = "--reconcile-sync=2s"  # ON TOP of the manifest's attacher args, for these tests only (default 1m)
RECONCILE_PERIODS = 4


@pytest_asyncio.fixture(loop_scope="module")
async def short_reconcile(driver: Deployed) -> AsyncIterator[Deployed]:
    """The attachers restarted with --reconcile-sync=2s on top of the manifest's args; restored afterwards."""
    await driver.restart_sidecars("csi-attacher", [RECONCILE_SYNC])
    try:
        yield driver
    finally:
        await driver.restart_sidecars("csi-attacher")  # back to exactly the manifest's args


async def assert_left_alone(env: Deployed, handles: Mapping[str, str], node: str = "node-a1") -> None:
    """For RECONCILE_PERIODS reconcile periods (counted by the attacher's ListVolumes calls) the attacher finds
    each volume published to ``node``: no "do not match" report, no forced re-publish, VA status untouched."""
    published_before = {h: len(env.rpc_codes("ControllerPublishVolume", h)) for h in handles.values()}
    mismatches_before = len(env.sidecar_log_lines("do not match"))
    lists_before = len(env.rpc_codes("ListVolumes"))
    await eventually(lambda: len(env.rpc_codes("ListVolumes")) >= lists_before + RECONCILE_PERIODS,
                     RECONCILE_PERIODS * 2 * 3, interval_s=0.5, description=f"{RECONCILE_PERIODS} reconciles")
    for pv in handles:
        va = await env.cluster.get("volumeattachment", attachment_name(pv, node))
        assert va["status"]["attached"] is True, (pv, va["status"])
    assert env.sidecar_log_lines("do not match")[mismatches_before:] == []
    assert {h: len(env.rpc_codes("ControllerPublishVolume", h)) for h in handles.values()} == published_before


async def test_attacher_reconcile_leaves_provisioned_and_m4rcsi_made_attachments_alone(
        short_reconcile: Deployed, timer: None) -> None:
    """Three volumes attached to node-a1, one per handle form: a provisioned migrating one (name:<pv>), an m4rCsi-made
    local, non-migrating one (disk csi-<pv>, "csi:info: {}", handle name:<pv>) and an m4rCsi-made fixed shared one
    in a static PV by its bare VDI UUID (m4rCsi's handle for fixed shared volumes)."""
    env, stack = short_reconcile, short_reconcile.stack
    await env.cluster.apply(storage_class("storageclass-xoa-migrating.yaml"))
    await env.cluster.apply(claim("data-reconcile", MIGRATING_CLASS, "128Mi", node="node-a1"))
    _, pv = await env.bound("data-reconcile")
    await create(stack, "m4r-local", 128 * MiB, {"srsWithTag": "k8s-migrating"}, await host_segment(stack, "node-a1"))
    shared_id = await create(stack, "m4r-shared", 128 * MiB, {"srsWithTag": "k8s-shared"})
    for disk in ("csi-m4r-local", "csi-m4r-shared"):
        (vdi,) = await stack.xo.find_vdis(name_label=disk)
        await stack.xo.set_vdi(vdi.id, name_description="csi:info: {}")  # as m4rCsi writes non-migrating disks
    static = {"m4r-local": "name:m4r-local", "m4r-shared": shared_id}  # the bare VDI UUID
    await env.cluster.apply(*(static_volume(name, handle, "128Mi") for name, handle in static.items()))
    handles = {pv["metadata"]["name"]: pv["spec"]["csi"]["volumeHandle"], **static}
    for name in handles:
        await env.attach(name, "node-a1")
    await assert_left_alone(env, handles)
    for name in handles:
        await env.detach(name, "node-a1")
    await delete_claim(env, "data-reconcile", pv["metadata"]["name"])
    for name in static:
        await env.cluster.delete("pv", name, wait=True)
    assert [await env.vbds(f"csi-{name}") for name in static] == [[], []]


async def test_attacher_reconcile_leaves_a_static_pv_naming_this_drivers_disk_by_bare_uuid_alone(
        short_reconcile: Deployed, timer: None) -> None:
    """A static PV naming a fixed shared disk made by this driver by its bare VDI UUID (the handle its CreateVolume
    returns, as m4rCsi's does): ListVolumes reports the disk under that handle."""
    env, stack = short_reconcile, short_reconcile.stack
    bare = await create(stack, "static-bare", 128 * MiB, {"srsWithTag": "k8s-shared"})
    assert vid.is_uuid(bare)
    await env.cluster.apply(static_volume("static-bare", bare, "128Mi"))
    await env.attach("static-bare", "node-a1")
    try:
        await assert_left_alone(env, {"static-bare": bare})
    finally:
        await env.detach("static-bare", "node-a1")
        await env.cluster.delete("pv", "static-bare", wait=True)


# --- 4. expansion through the resizer, as the plugin advertises it ------------------------------------------

XFS_CLASS = "xoa-migrating-xfs"
SIZE, GROWN = "320Mi", "480Mi"  # xfs needs 300 MiB at least


async def test_expansion_reaches_pv_disk_and_filesystem_as_the_plugin_advertises(driver: Deployed, timer: None
                                                                                  ) -> None:
    """ONLINE: resized while attached and mounted, the kubelet's NodeExpandVolume grows the filesystem in use.
    OFFLINE (issue 9): detached first, resized; at the next mount the kubelet stages the volume and, the claim being
    NodeResizePending, calls NodeExpandVolume (operation_generator's mount path), which grows the filesystem.

    xfs, not the example's ext4: growing a mounted ext4 needs CAP_SYS_RESOURCE, which the machines this suite runs
    on (developers' and CI's) do not grant even to root; xfs_growfs does not need it."""
    env = driver
    offline = await env.plugin_expansion() == Expansion.OFFLINE
    await env.cluster.apply(storage_class("storageclass-xoa-migrating.yaml", XFS_CLASS, parameters={
        "csi.storage.k8s.io/fstype": "xfs", "srsWithTag": "k8s-migrating", "migrating": "true"}))
    await env.cluster.apply(claim("data-grow", XFS_CLASS, SIZE, node="node-a1"))
    _, pv = await env.bound("data-grow")
    name = pv["metadata"]["name"]
    await env.attach(name, "node-a1")
    async with kubelet.mounted(env, "node-a1", name) as target:
        checksum = await asyncio.to_thread(write_file, target / "data.bin", 8 * MiB)
        before = filesystem_bytes(target)
        if not offline:
            await resized_by_the_resizer(env, "data-grow", name, GROWN)
            await kubelet.expand(env, "node-a1", name, target, quantity(GROWN))
            after = filesystem_bytes(target)
    if offline:
        await env.detach(name, "node-a1")
        await resized_by_the_resizer(env, "data-grow", name, GROWN)
        await env.attach(name, "node-a1")
        async with kubelet.mounted(env, "node-a1", name) as target:
            await kubelet.expand(env, "node-a1", name, target, quantity(GROWN))
            after = filesystem_bytes(target)
            assert await asyncio.to_thread(sha256_of, target / "data.bin") == checksum
    assert before < quantity(SIZE) < after <= quantity(GROWN), (before, after)
    await kubelet.finish_resize(env, "data-grow", GROWN)
    shown = await env.cluster.kubectl("get", "pvc", "data-grow", "-n", APPS, "-o",
                                      "jsonpath={.status.capacity.storage} {.spec.resources.requests.storage}")
    assert shown == f"{GROWN} {GROWN}"
    await env.detach(name, "node-a1")
    await delete_claim(env, "data-grow", name)


async def resized_by_the_resizer(env: Deployed, pvc: str, pv: str, size: str) -> None:
    """Ask for ``size`` on the claim; until the resizer grew the disk and the PV, leaving the filesystem resize
    to the node (FileSystemResizePending)."""
    await env.cluster.patch("pvc", pvc, {"spec": {"resources": {"requests": {"storage": size}}}}, APPS)

    async def resized() -> Obj:
        claim_now = await env.cluster.get("pvc", pvc, APPS)
        assert claim_now["status"].get("allocatedResourceStatuses") == {"storage": "NodeResizePending"}, claim_now
        return claim_now
    claim_now = await eventually(resized, 60, interval_s=0.25, description=f"{pvc} resized by the resizer")
    assert claim_now["status"]["allocatedResources"]["storage"] == size
    assert "FileSystemResizePending" in [c["type"] for c in claim_now["status"]["conditions"]]
    assert (await env.cluster.get("pv", pv))["spec"]["capacity"]["storage"] == size
    (vdi,) = await env.stack.xo.find_vdis(name_label=f"csi-{pv}")
    assert vdi.size == quantity(size)
    assert env.rpc_codes("ControllerExpandVolume", f"name:{pv}") == ["OK"]


# --- 5. reclaim policies ------------------------------------------------------------------------------------

RETAIN_CLASS = "xoa-migrating-retain"


async def test_reclaim_delete_removes_the_disk_once_detached_and_retain_keeps_it(driver: Deployed, timer: None
                                                                                 ) -> None:
    env = driver
    await env.cluster.apply(storage_class("storageclass-xoa-migrating.yaml"),
                            storage_class("storageclass-xoa-migrating.yaml", RETAIN_CLASS, reclaimPolicy="Retain"))
    await env.cluster.apply(claim("data-delete", MIGRATING_CLASS, "64Mi", node="node-a1"),
                            claim("data-retain", RETAIN_CLASS, "64Mi", node="node-a1"))
    _, deleted = await env.bound("data-delete")
    _, retained = await env.bound("data-retain")
    gone, kept = deleted["metadata"]["name"], retained["metadata"]["name"]
    assert retained["spec"]["persistentVolumeReclaimPolicy"] == "Retain"

    # Delete: the claim goes at once, the PV and its disk only once the volume is detached
    await env.attach(gone, "node-a1")
    await env.cluster.delete("pvc", "data-delete", APPS)
    await env.gone("pvc", "data-delete", APPS)

    async def released() -> Obj:
        pv = await env.cluster.get("pv", gone)
        assert pv["status"]["phase"] == "Released", pv["status"]
        return pv
    await eventually(released, 30, interval_s=0.25, description=f"PV {gone} Released")
    assert len(await env.vdis(f"csi-{gone}")) == 1  # still attached: not deleted
    await env.detach(gone, "node-a1")
    await env.gone("pv", gone)
    assert await env.vdis(f"csi-{gone}") == []
    assert env.rpc_codes("DeleteVolume", f"name:{gone}")[-1] == "OK"

    # Retain: the claim goes, the PV stays Released and the disk stays in XO; DeleteVolume is never called
    await env.cluster.delete("pvc", "data-retain", APPS)
    await env.gone("pvc", "data-retain", APPS)
    await eventually(lambda: _phase(env, kept, "Released"), 30, interval_s=0.25, description=f"PV {kept} Released")
    assert len(await env.vdis(f"csi-{kept}")) == 1
    assert env.rpc_codes("DeleteVolume", f"name:{kept}") == []
    await env.cluster.delete("pv", kept, wait=True)
    assert len(await env.vdis(f"csi-{kept}")) == 1  # the admin deletes a retained disk in XO, if ever
    (vdi,) = await env.stack.xo.find_vdis(name_label=f"csi-{kept}")
    await env.stack.xo.delete_vdi(vdi.id)


async def _phase(env: Deployed, pv: str, phase: str) -> bool:
    return bool((await env.cluster.get("pv", pv))["status"]["phase"] == phase)


# --- 6. controller failover mid migrating attach ----------------------------------------------------------


async def test_leader_killed_mid_migrating_attach_the_other_replica_finishes_it(driver: Deployed, timer: None
                                                                               ) -> None:
    env, stack = driver, driver.stack
    name, disk, handle = await _migrating_volume(env, "data-failover", "512Mi")
    await env.attach(name, "node-a1")
    async with kubelet.mounted(env, "node-a1", name) as target:
        checksum = await asyncio.to_thread(write_file, target / "data.bin", FAILOVER_DATA_BYTES)
    await env.detach(name, "node-a1")
    leader, follower = PODS
    assert set((await env.lease_holders()).values()) == {leader}

    started = time.monotonic()
    await env.cluster.apply(attachment(name, "node-a2"))
    await eventually(lambda: copying(stack, disk), 30, interval_s=0.1, description=f"{disk} being copied")
    waiting = [line for line in env.replicas[leader].log("xo-csi-frontend").splitlines()
               if '"migration_waiting"' in line and disk in line]
    assert len(waiting) == 1, waiting  # the leader's ControllerPublishVolume is waiting for this copy
    await env.kill(leader)  # frontend and sidecars at once, mid copy, its ControllerPublishVolume waiting
    killed = time.monotonic()
    await env.wait_leader(follower)
    took_over = time.monotonic()
    stack.controller_socket = env.replicas[follower].socket
    await env.attached(name, "node-a2")
    attached = time.monotonic()
    record("failover: leader killed -> every lease held by the other replica", took_over - killed)
    record("failover: VolumeAttachment created -> attached", attached - started,
           f"(copy {copy_seconds(stack, disk):.1f} s)")

    assert len(await env.vdis(disk)) == 1 and await srs_of(stack, disk) == ["Local A2"]
    assert await migrations_of(stack, disk) == 1
    assert await env.vbds(disk) == [(stack.vm_ids["node-a2"], True)]  # exactly one VBD: none left by the dead pod
    assert "OK" in env.rpc_codes("ControllerPublishVolume", handle)
    async with kubelet.mounted(env, "node-a2", name) as target:
        assert await asyncio.to_thread(sha256_of, target / "data.bin") == checksum
    await env.detach(name, "node-a2")
    await delete_claim(env, "data-failover", name)
    await env.start(leader)  # the Deployment's second replica again, now a follower


# --- 7. clones ----------------------------------------------------------------------------------------------


async def test_claim_cloned_from_a_claim_binds_with_its_data(driver: Deployed, timer: None) -> None:
    env = driver
    if _Cap.CLONE_VOLUME not in await env.controller_capabilities():
        reason = "CLONE_VOLUME not advertised"
        print(reason)
        pytest.skip(reason)
    await env.cluster.apply(storage_class("storageclass-xoa-migrating.yaml"))
    await env.cluster.apply(claim("data-source", MIGRATING_CLASS, "64Mi", node="node-a1"))
    _, source = await env.bound("data-source")
    await env.attach(source["metadata"]["name"], "node-a1")
    async with kubelet.mounted(env, "node-a1", source["metadata"]["name"]) as target:
        checksum = await asyncio.to_thread(write_file, target / "data.bin", 8 * MiB)
    await env.detach(source["metadata"]["name"], "node-a1")
    clone = claim("data-clone", MIGRATING_CLASS, "64Mi", node="node-a1")
    clone["spec"]["dataSource"] = {"kind": "PersistentVolumeClaim", "name": "data-source"}
    await env.cluster.apply(clone)
    _, cloned = await env.bound("data-clone")
    await env.attach(cloned["metadata"]["name"], "node-a1")
    async with kubelet.mounted(env, "node-a1", cloned["metadata"]["name"]) as target:
        assert await asyncio.to_thread(sha256_of, target / "data.bin") == checksum
    await env.detach(cloned["metadata"]["name"], "node-a1")
    await delete_claim(env, "data-clone", cloned["metadata"]["name"])
    await delete_claim(env, "data-source", source["metadata"]["name"])


# --- the manifests' RBAC -------------------------------------------------------------------------------------


async def test_no_sidecar_was_ever_forbidden(driver: Deployed, timer: None) -> None:
    """Run last: over every scenario above, the sidecars (with the ServiceAccount's token, so the RBAC of
    k8s/base/rbac-controller.yaml applies) were never refused an API call."""
    assert driver.sidecar_log_lines(r"(?i)forbidden") == []
    # ... and the RBAC does apply to them: the ServiceAccount may not read Secrets (no StorageClass uses any)
    with pytest.raises(KubectlError, match="(?i)forbidden"):
        await driver.cluster.kubectl("get", "secrets", "-n", NAMESPACE, kubeconfig=driver.config.kubeconfig)
