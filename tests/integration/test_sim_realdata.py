"""XO simulator real data mode: sparse files, loop devices, device links, data surviving migrations."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.units import MiB
from tests.support.sim import SR_LOCAL_A1, SR_LOCAL_A2, SR_NFS_A, VM_A1, VM_A2, RpcError, cached, client, running

pytestmark = [pytest.mark.integration, pytest.mark.root]
SKIP_REASON = "real data mode needs root and losetup for loop devices"
requires_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None, reason=SKIP_REASON)


def _write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _loops_using(folder: Path) -> list[str]:
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if str(folder) in line]


@requires_root
async def test_bytes_survive_copy_and_live_migrations_and_nothing_leaks(tmp_path: Path) -> None:
    backing, devices = tmp_path / "backing", tmp_path / "dev"
    payload, more = os.urandom(MiB), os.urandom(4096)
    try:
        async with running(backing_dir=backing, device_root=devices, migration_rate_bps=256 * MiB) as sim, \
                client(sim) as rpc:
            vdi_id = await rpc.call("disk.create", {"name": "data", "size": "64MiB", "sr": SR_LOCAL_A1})
            image = backing / SR_LOCAL_A1 / f"{vdi_id}.img"
            assert image.stat().st_size == 64 * MiB and image.stat().st_blocks == 0  # sparse

            await rpc.call("vm.attachDisk", {"vm": VM_A1, "vdi": vdi_id})
            link = devices / VM_A1 / "xvdb"
            assert os.readlink(link).startswith("/dev/loop")
            await asyncio.to_thread(_write, link, 4 * MiB, payload)
            vbd_id = sim.state.get(vdi_id)["$VBDs"][0]
            await cached(sim, vbd_id)
            await rpc.call("vbd.disconnect", {"id": vbd_id})
            assert sim.state.get(vdi_id)["usage"] == image.stat().st_blocks * 512 >= MiB  # thin: allocated bytes
            assert not link.exists() and _loops_using(tmp_path) == []

            copy_id = await rpc.call("vdi.migrate", {"id": vdi_id, "sr_id": SR_LOCAL_A2})
            assert not image.exists()
            copied = backing / SR_LOCAL_A2 / f"{copy_id}.img"
            assert copied.stat().st_size == 64 * MiB and copied.stat().st_blocks * 512 < 8 * MiB  # still sparse

            await rpc.call("vm.attachDisk", {"vm": VM_A2, "vdi": copy_id})
            link2 = devices / VM_A2 / "xvdb"
            assert await asyncio.to_thread(_read, link2, 4 * MiB, MiB) == payload

            await asyncio.to_thread(_write, link2, 0, more)
            moved_id = await rpc.call("vdi.migrate", {"id": copy_id, "sr_id": SR_NFS_A})  # live: file renamed
            assert (backing / SR_NFS_A / f"{moved_id}.img").exists() and not copied.exists()
            assert await asyncio.to_thread(_read, link2, 0, 4096) == more
            assert await asyncio.to_thread(_read, link2, 4 * MiB, MiB) == payload

            with pytest.raises(RpcError) as info:  # no online resize on XCP-ng SRs
                await rpc.call("vdi.set", {"id": moved_id, "size": "128MiB"})
            assert info.value.error["code"] == 17
            vbd2 = next(v["id"] for v in sim.state.of_type("VBD") if v["VM"] == VM_A2 and v["VDI"] == moved_id)
            await rpc.call("vbd.disconnect", {"id": vbd2})
            await rpc.call("vdi.set", {"id": moved_id, "size": "128MiB"})  # offline: the backing file grows
            assert (backing / SR_NFS_A / f"{moved_id}.img").stat().st_size == 128 * MiB
            await rpc.call("vbd.connect", {"id": vbd2})
            assert await asyncio.to_thread(_device_size, link2) == 128 * MiB
            assert await asyncio.to_thread(_read, link2, 4 * MiB, MiB) == payload
            assert len(_loops_using(tmp_path)) == 1
        assert _loops_using(tmp_path) == []
        assert not link2.exists()
    finally:
        for line in _loops_using(tmp_path):  # never leave a loop device behind, even on failure
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)


@requires_root
async def test_reset_with_topology_detaches_and_deletes(tmp_path: Path) -> None:
    backing, devices = tmp_path / "backing", tmp_path / "dev"
    topology = {"tokens": ["sim-token"], "pools": [{"name_label": "Pool A", "hosts": [{
        "name_label": "host-a1", "srs": [{"name_label": "Local A1", "size": "1GiB"}],
        "vms": [{"name_label": "node-a1"}]}]}],
        "vdis": [{"name_label": "seed", "size": "8MiB", "sr": "Local A1"}]}
    try:
        async with running(topology, backing_dir=backing, device_root=devices) as sim, client(sim) as rpc:
            seed = next(iter(sim.state.of_type("VDI")))
            assert (backing / SR_LOCAL_A1 / f"{seed['id']}.img").stat().st_size == 8 * MiB
            extra = await rpc.call("disk.create", {"name": "extra", "size": MiB, "sr": SR_LOCAL_A1, "vm": VM_A1})
            assert len(_loops_using(tmp_path)) == 1
            await sim.simulator.reset(reload_topology=True)
            assert _loops_using(tmp_path) == [] and not (devices / VM_A1 / "xvdb").exists()
            assert not (backing / SR_LOCAL_A1 / f"{extra}.img").exists()
            assert [v["name_label"] for v in sim.state.of_type("VDI")] == ["seed"]
    finally:
        for line in _loops_using(tmp_path):
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)
