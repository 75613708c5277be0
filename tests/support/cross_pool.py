"""Helpers of the in-process cross-pool move and clone tests (tests/integration/test_cross_pool*.py): two pools
with a tagged local SR each, a disk with real bytes on pool A (the simulator in real data mode), requests for a
node of pool B, and what "exactly one complete disk" means."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dev.wait import eventually
from services.xo_simulator.topology import derived_id
from shared import transfer_marks, vdi_metadata
from shared.jobs import JobRecord
from shared.messages import MigrationRequested
from shared.units import MiB
from tests.support.brokers import RedisEndpoint
from tests.support.migration import DESCRIPTION, DISK, TAG, Env, open_env, vdis_named

DISK_SIZE = 64 * MiB
SR_A1 = derived_id("sr", "Pool A", "host-a1", "Local A1")
SR_B1 = derived_id("sr", "Pool B", "host-b1", "Local B1")
POOL_B = derived_id("pool", "Pool B")
HOST_B1 = derived_id("host", "Pool B", "host-b1")
VM_B1 = derived_id("vm", "Pool B", "host-b1", "node-b1")
INCOMING = transfer_marks.incoming_name(DISK)


def two_pools(*, b1_size: str = "100GiB", b1_type: str | None = None) -> dict[str, Any]:
    """Pool A (host-a1, Local A1 holding the disk) and pool B (host-b1, Local B1), both SRs tagged."""
    b1: dict[str, Any] = {"name_label": "Local B1", "size": b1_size, "tags": [TAG]}
    if b1_type is not None:
        b1["SR_type"] = b1_type
    return {
        "tokens": ["sim-token"],
        "pools": [
            {"name_label": "Pool A", "hosts": [{"name_label": "host-a1", "srs": [
                {"name_label": "Local A1", "size": "100GiB", "tags": [TAG]}], "vms": [{"name_label": "node-a1"}]}]},
            {"name_label": "Pool B", "hosts": [{"name_label": "host-b1", "srs": [b1], "vms": [
                {"name_label": "node-b1"}]}]},
        ],
        "vdis": [{"name_label": DISK, "name_description": DESCRIPTION, "size": DISK_SIZE, "sr": "Local A1"}],
    }


def require_real_data() -> None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        reason = "cross-pool streams need the simulator's real data mode: root and losetup"
        print(reason)
        pytest.skip(reason)


@contextlib.asynccontextmanager
async def cross_pool_env(tmp_path: Path, amqp_url: str, redis_server: RedisEndpoint, prefix: str, *,
                         topology: dict[str, Any] | None = None, **sim_options: Any) -> AsyncIterator[Env]:
    """``open_env`` on two pools, in real data mode."""
    require_real_data()
    async with open_env(amqp_url, redis_server, prefix, topology=topology or two_pools(),
                        backing_dir=tmp_path / "backing", device_root=tmp_path / "devices", **sim_options) as env:
        yield env


def backing_path(env: Env, vdi: dict[str, Any]) -> Path:
    data = env.sim.simulator.data
    assert data is not None, "real data mode"
    return data.path(vdi["$SR"], vdi["id"])


def write_content(env: Env, name: str = DISK, seed: int = 7) -> str:
    """Random data in about a third of the disk's 2 MiB blocks (and a few bytes at its end); the content's sha256."""
    [vdi] = vdis_named(env.sim, name)
    path = backing_path(env, vdi)
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for block in sorted(rng.sample(range(vdi["size"] // (2 * MiB)), vdi["size"] // (6 * MiB))):
            os.pwrite(fd, rng.randbytes(2 * MiB), block * 2 * MiB)
        os.pwrite(fd, b"the end", vdi["size"] - 7)
        os.fsync(fd)
    finally:
        os.close(fd)
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def assert_one_complete_disk(env: Env, checksum: str, sr_id: str, name: str = DISK) -> dict[str, Any]:
    """Exactly one VDI carries ``name``, on ``sr_id``, holding ``checksum``, with its csi:info and no mark; no VDI
    is left being filled. Reads XAPI's truth, not XO's cache."""
    vdis = vdis_named(env.sim, name)
    assert [v["$SR"] for v in vdis] == [sr_id], vdis
    assert vdis_named(env.sim, transfer_marks.incoming_name(name)) == []
    info = vdi_metadata.parse(vdis[0]["name_description"])
    assert info is not None and info.in_progress_to_sr is None, vdis[0]["name_description"]
    assert sha256_of(backing_path(env, vdis[0])) == checksum
    return vdis[0]


async def submit_to_pool_b(env: Env) -> MigrationRequested:
    """A migration job of DISK to node-b1 (pool B), as the frontend's gate creates it, without waiting."""
    return await env.submit(vm_id=VM_B1, host_id=HOST_B1, pool_id=POOL_B)


async def finished(env: Env, within_s: float = 60.0, name: str = DISK) -> JobRecord:
    """The job record once the job ended."""
    async def ended() -> JobRecord | None:
        return await env.finished(name)
    return await eventually(ended, within_s, 0.05, description=f"the job of {name} ended")


async def streaming(env: Env) -> None:
    """Return once the simulator runs a content stream."""
    await eventually(lambda: env.sim.simulator.stats.active_streams > 0, 30, 0.01,
                     description="a content stream running in the simulator")
