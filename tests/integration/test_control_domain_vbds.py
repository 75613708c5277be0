"""A disk XO exports (a clone's source) is plugged into XAPI's control domain for the stream, and XO shows that VBD
like a VM's (shared/xo/control_domains.py): the driver takes it for no node. Two clones of one source run at once;
ListVolumes and ControllerGetVolume show no node; an unpublish from every node leaves it; a publish, a delete and an
expansion answer ABORTED naming XO's work, then succeed once the export is over. Real RabbitMQ and Redis, the
simulator in real data mode, its exports held at a slow pace until the test releases them."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from dev.wait import eventually
from services.csi_frontend.cloning import CloneRequest
from services.csi_frontend.provisioning import Provisioner
from services.csi_frontend.status import code_for
from services.xo_simulator.topology import derived_id
from shared import storage_class
from shared.errors import OperationPending
from shared.units import MiB
from shared.volume_id import by_name
from tests.support.cross_pool import (
    DISK_SIZE,
    POOL_B,
    SR_B1,
    VM_B1,
    assert_one_complete_disk,
    finished,
    submit_to_pool_b,
    write_content,
)
from tests.support.migration import TAG, Env, vdis_named

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
PARAMS = storage_class.parse({"srsWithTag": TAG, "migrating": "true"})
DOM0_A1 = derived_id("vm-controller", "Pool A", "host-a1")
HOST_A1 = derived_id("host", "Pool A", "host-a1")
VM_A1 = derived_id("vm", "Pool A", "host-a1", "node-a1")
HELD_BPS = 1 * MiB  # the pace of exports until the test releases them: the ~22 MiB a clone sends take ~20 s
XO_AT_WORK = f"XO is exporting or copying volume name:vol1 (VBD {{vbd}} of the control domain of host {HOST_A1} "


@pytest.fixture
def stream_options() -> dict[str, Any]:
    return {"stream_rate_bps": HELD_BPS}


def _clone(env: Env, name: str) -> asyncio.Task[Any]:
    """CreateVolume of ``name`` (pool B) from vol1, running."""
    assert env.frontend.cloner is not None
    request = CloneRequest(name, (0, 0), False, PARAMS, [{"pool": POOL_B}], [], "name:vol1")
    return asyncio.create_task(env.frontend.cloner.create(request, 90))


def _dom0_vbds(env: Env, vdi_id: str, *, cache: bool = True) -> list[str]:
    """The ids of the VBDs through which a control domain has ``vdi_id`` plugged, in XO's cache (or XAPI's truth)."""
    store = env.sim.cache if cache else env.sim.state
    return sorted(vbd["id"] for vbd in store.of_type("VBD")
                  if vbd["VDI"] == vdi_id and vbd["VM"] == DOM0_A1 and vbd["attached"])


async def _exported(env: Env, vdi_id: str, count: int = 1) -> list[str]:
    """Once XO's cache shows ``count`` exports of ``vdi_id`` running (the control domain's VBDs), their ids."""
    return await eventually(lambda: (found := _dom0_vbds(env, vdi_id)) and len(found) == count and found, 30,
                            description=f"XO's cache shows {count} control domain VBD(s) on the source")


async def _cloning(env: Env) -> tuple[str, dict[str, Any], asyncio.Task[Any], str]:
    """vol1 with content, a worker, and a clone of vol1 into vol2 whose export runs (held): (content checksum, the
    source VDI, the clone, the control domain's VBD)."""
    checksum = write_content(env)
    [source] = vdis_named(env.sim)
    await env.worker("w1")
    clone = _clone(env, "vol2")
    [vbd_id] = await _exported(env, source["id"])
    return checksum, source, clone, vbd_id


def _provisioner(env: Env) -> Provisioner:
    assert env.frontend.provisioner is not None
    return env.frontend.provisioner


def _release(env: Env) -> None:
    env.sim.simulator.stream_rate_bps = 0


async def test_two_clones_of_one_source_at_once_both_succeed(xenv: Env) -> None:
    """Before, the second clone's source check took the first one's export for a node: FAILED_PRECONDITION
    "detach the source volume"."""
    checksum = write_content(xenv)
    [source] = vdis_named(xenv.sim)
    await xenv.worker("w1")
    await xenv.worker("w2")
    first = _clone(xenv, "vol2")
    await _exported(xenv, source["id"])
    second = _clone(xenv, "vol3")
    await _exported(xenv, source["id"], 2)  # both exports at once, each through its own read-only VBD
    _release(xenv)
    created = await asyncio.gather(first, second)
    assert [(c.volume_id, c.size_bytes) for c in created] == [(by_name("vol2"), DISK_SIZE),
                                                              (by_name("vol3"), DISK_SIZE)]
    for name in ("csi-vol2", "csi-vol3"):
        assert_one_complete_disk(xenv, checksum, SR_B1, name=name)
    assert xenv.sim.simulator.stats.streams["rest.vdi.export"] == 2
    assert _dom0_vbds(xenv, source["id"], cache=False) == []


async def test_listing_describing_and_publishing_during_an_export_show_no_control_domain(xenv: Env) -> None:
    """Before, ListVolumes and ControllerGetVolume listed the control domain as a node of the source, and a publish
    answered FAILED_PRECONDITION "attached to node <dom0>"."""
    _, source, clone, vbd_id = await _cloning(xenv)
    provisioner = _provisioner(xenv)

    entries = [e for e in await provisioner.list_volumes() if e.vdi.id == source["id"]]
    state = await provisioner.describe(by_name("vol1"))
    with pytest.raises(OperationPending) as pending:
        await xenv.attacher.publish(by_name("vol1"), VM_A1, False, 30)

    assert [(e.listed_id, e.published_vms) for e in entries] == [("name:vol1", [])]
    assert state.published_vms == []
    assert code_for(pending.value) == grpc.StatusCode.ABORTED
    assert pending.value.message.startswith(XO_AT_WORK.format(vbd=vbd_id))
    assert _dom0_vbds(xenv, source["id"], cache=False) == [vbd_id]  # the export goes on
    _release(xenv)
    await clone
    context = await xenv.attacher.publish(by_name("vol1"), VM_A1, False, 30)
    assert context["device"] == "xvda"  # node-a1 of this topology has no system disk


async def test_an_unpublish_from_every_node_during_an_export_leaves_the_control_domains_vbd(xenv: Env) -> None:
    """Before, ControllerUnpublishVolume without a node deleted XAPI's VBD in the middle of the export, which broke
    the clone's stream."""
    checksum, source, clone, vbd_id = await _cloning(xenv)

    await xenv.attacher.unpublish(by_name("vol1"), None, 30)

    assert _dom0_vbds(xenv, source["id"], cache=False) == [vbd_id]
    _release(xenv)
    assert (await clone).volume_id == by_name("vol2")
    assert_one_complete_disk(xenv, checksum, SR_B1, name="csi-vol2")
    assert xenv.sim.simulator.stats.streams["rest.vdi.export"] == 1


async def test_delete_and_expand_during_an_export_answer_aborted_then_succeed(xenv: Env) -> None:
    """Before, both answered FAILED_PRECONDITION "attached to node <dom0>": final for the CO, for a disk that is
    free a moment later."""
    _, source, clone, vbd_id = await _cloning(xenv)
    provisioner = _provisioner(xenv)

    with pytest.raises(OperationPending) as expanding:
        await provisioner.expand(by_name("vol1"), (2 * DISK_SIZE, 0), 30)
    with pytest.raises(OperationPending) as deleting:
        await provisioner.delete(by_name("vol1"), 30)

    for refused in (expanding.value, deleting.value):
        assert code_for(refused) == grpc.StatusCode.ABORTED
        assert refused.message.startswith(XO_AT_WORK.format(vbd=vbd_id))
    assert [v["size"] for v in vdis_named(xenv.sim)] == [DISK_SIZE]
    _release(xenv)
    await clone
    assert await provisioner.expand(by_name("vol1"), (2 * DISK_SIZE, 0), 30) == 2 * DISK_SIZE
    await provisioner.delete(by_name("vol1"), 30)
    assert vdis_named(xenv.sim) == [] and len(vdis_named(xenv.sim, "csi-vol2")) == 1


async def test_a_move_job_finding_the_disk_exported_fails_retryable_and_a_later_publish_moves_it(xenv: Env) -> None:
    """A migration job whose disk XO is exporting (another volume's clone) is retried, not failed for good: the
    export is XO at work, not a node using the disk where it is. Held past its attempts, it ends retryable, so a later
    publish runs a new job, which moves the disk once the export is over. Before, the job failed for good at its first
    attempt with FAILED_PRECONDITION "plugged into VM <dom0>"."""
    checksum, source, clone, vbd_id = await _cloning(xenv)
    await xenv.worker("w2")
    await submit_to_pool_b(xenv)

    ended = await finished(xenv, name="csi-vol1")  # the export is held: every attempt finds it
    assert ended.result is not None and ended.result.error is not None
    attempts = xenv.workers[-1].settings.max_attempts  # every attempt of the job
    assert (ended.attempt, ended.result.outcome, ended.result.error.retryable) == (attempts, "failed", True)
    assert ended.result.error.message.startswith(f"XO is exporting or copying disk csi-vol1 (VBD {vbd_id} ")
    assert _dom0_vbds(xenv, source["id"], cache=False) == [vbd_id]  # the export went on
    _release(xenv)
    assert (await clone).volume_id == by_name("vol2")
    context = await xenv.attacher.publish(by_name("vol1"), VM_B1, False, 60)
    assert context["device"] == "xvda"
    assert_one_complete_disk(xenv, checksum, SR_B1)  # moved to pool B, whole
    assert_one_complete_disk(xenv, checksum, SR_B1, name="csi-vol2")
