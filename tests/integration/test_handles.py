"""Volume handles exactly as m4rCsi writes them (issue 10 item 2), against the simulator: what CreateVolume returns,
what ListVolumes reports for every kind of disk (this version's, m4rCsi's, earlier xo-csi's, static volumes), and
that a rollback to m4rCsi finds (and can delete) every disk this driver made.
"""

from __future__ import annotations

from services.csi_frontend.controller import ControllerServicer
from shared import volume_id as vid
from shared.csi import csi_pb2
from shared.units import MiB
from tests.support import m4rcsi
from tests.support.capabilities import mount_capability
from tests.support.controller import Context, Controller
from tests.support.sim import SR_LOCAL_A1, SR_NFS_A, VM_A1, VM_A2

CAP = mount_capability()
LONG = "pvc-" + "0123456789abcdef" * 8  # 132 bytes: cut to 128 below


async def _create(servicer: ControllerServicer, name: str, **parameters: str) -> str:
    response = await servicer.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB), volume_capabilities=[CAP],
        parameters=parameters), Context())  # type: ignore[arg-type]
    return str(response.volume.volume_id)


async def _vdi_id(ctl: Controller, disk: str) -> str:
    (vdi,) = await ctl.xo.find_vdis(name_label=disk)
    return vdi.id


async def test_create_volume_returns_the_handle_m4rcsi_writes(ctl: Controller) -> None:
    servicer = ctl.servicer
    cases: dict[str, dict[str, str]] = {
        "pvc-migrating": {"srsWithTag": "k8s-migrating", "migrating": "true"},
        "pvc-local-tag": {"srsWithTag": "k8s-migrating"},  # fixed on local SRs
        "pvc-local-sr": {"srUUID": SR_LOCAL_A1},
        "pvc-shared-tag": {"srsWithTag": "k8s-shared"},
        "pvc-shared-sr": {"srUUID": SR_NFS_A},
        LONG[:128]: {"srsWithTag": "k8s-migrating"},  # a local volume with a name too long for name:<name>
    }
    handles = {name: await _create(servicer, name, **params) for name, params in cases.items()}
    short = vid.volume_name_for_id(LONG[:128])
    assert handles == {
        "pvc-migrating": "name:pvc-migrating",
        "pvc-local-tag": "name:pvc-local-tag",
        "pvc-local-sr": "name:pvc-local-sr",
        "pvc-shared-tag": await _vdi_id(ctl, "csi-pvc-shared-tag"),  # the bare VDI UUID
        "pvc-shared-sr": await _vdi_id(ctl, "csi-pvc-shared-sr"),
        LONG[:128]: f"name:{short}",
    }
    assert len(handles[LONG[:128]].encode()) == vid.MAX_ID_BYTES
    again = {name: await _create(servicer, name, **params) for name, params in cases.items()}
    assert again == handles  # idempotent: a retry returns the same handle
    # every form works in the later calls, and answers carry the handle as given
    for handle in handles.values():
        got = await servicer.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=handle),
                                                 Context())  # type: ignore[arg-type]
        assert got.volume.volume_id == handle


async def _foreign_disk(ctl: Controller, name: str, sr: str, description: str = "") -> str:
    vdi_id = await ctl.xo.create_disk(name, 64 * MiB, sr)
    if description:
        await ctl.xo.set_vdi(vdi_id, name_description=description)
    return vdi_id


async def test_list_volumes_reports_each_volume_under_the_handle_its_pv_carries(ctl: Controller) -> None:
    servicer = ctl.servicer
    mine_shared = await _create(servicer, "pvc-shared", srsWithTag="k8s-shared")
    mine_local = await _create(servicer, "pvc-local", srsWithTag="k8s-migrating")
    mine_moving = await _create(servicer, "pvc-moving", srsWithTag="k8s-migrating", migrating="true")
    await _foreign_disk(ctl, "csi-pvc-m4-local", SR_LOCAL_A1, "csi:info: {}")
    m4_shared = await _foreign_disk(ctl, "csi-pvc-m4-shared", SR_NFS_A, "csi:info: {}")
    await _foreign_disk(ctl, "csi-pvc-m4-moving", SR_LOCAL_A1,
                        'csi:info: {"migrating":{"enabled":true},"srsWithTag":"k8s-migrating"}')
    old_fixed = await _foreign_disk(ctl, "csi-pvc-old", SR_NFS_A, 'csi:info: {"srsWithTag":"k8s-shared"}')
    static = await _foreign_disk(ctl, "database-data", SR_NFS_A)
    await ctl.xo.attach_disk(VM_A2, static)  # a static volume in use: a data disk, not bootable
    await _foreign_disk(ctl, "some-detached-disk", SR_NFS_A)  # no PV can be told to name it: not listed
    await _foreign_disk(ctl, "csi-temp-pvc-creating", SR_NFS_A)  # CreateVolume's: not a volume yet
    await servicer.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=mine_shared, node_id=VM_A1, volume_capability=CAP), Context())  # type: ignore[arg-type]

    listed = await servicer.ListVolumes(csi_pb2.ListVolumesRequest(), Context())  # type: ignore[arg-type]
    published = {e.volume.volume_id: list(e.status.published_node_ids) for e in listed.entries}
    assert published == {
        mine_shared: [VM_A1],
        mine_local: [],
        mine_moving: [],
        "name:pvc-m4-local": [],
        m4_shared: [],
        "name:pvc-m4-moving": [],
        old_fixed: [],  # an earlier xo-csi's fixed volume: its PV says uuid:<VDI>, or the bare UUID if re-made
        f"uuid:{old_fixed}": [],
        static: [VM_A2],
    }
    assert mine_local == "name:pvc-local"


async def test_a_rollback_to_m4rcsi_finds_and_deletes_every_disk_this_driver_made(ctl: Controller) -> None:
    servicer = ctl.servicer
    handles = [await _create(servicer, "pvc-a", srsWithTag="k8s-migrating", migrating="true"),
               await _create(servicer, "pvc-b", srsWithTag="k8s-migrating"),
               await _create(servicer, "pvc-c", srUUID=SR_LOCAL_A1),
               await _create(servicer, "pvc-d", srsWithTag="k8s-shared"),
               await _create(servicer, LONG[:128], srsWithTag="k8s-migrating", migrating="true")]
    for handle in handles:
        (found,) = await m4rcsi.find_disk(ctl.xo, handle)
        assert found.name_label.startswith("csi-pvc-") and not found.name_label.startswith("csi-temp-")
        assert await m4rcsi.delete_volume(ctl.xo, handle)  # it deletes the disk: nothing leaks
        assert await m4rcsi.find_disk(ctl.xo, handle) == []
    # why the uuid: form had to go: m4rCsi cannot read it, and its DeleteVolume "succeeds" leaking the disk
    old = await _foreign_disk(ctl, "csi-pvc-old", SR_NFS_A, 'csi:info: {"srsWithTag":"k8s-shared"}')
    assert not await m4rcsi.delete_volume(ctl.xo, f"uuid:{old}")
    assert await ctl.xo.get_vdi(old) is not None

