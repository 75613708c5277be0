"""The soak's invariants, checked after each fault (what must hold at any time) and at the end (everything)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import httpx
import redis.asyncio as aioredis

from dev.stack import Stack
from dev.wait import eventually
from shared import keys, messages, placement

SETTLE_S = 120.0


class _Volume(Protocol):
    name: str
    node: str | None


class _Report(Protocol):
    invariants: dict[str, bool]
    violations: list[str]
    notes: list[str]


def _disk(name: str) -> str:
    return f"csi-{name}"


async def check_during(stack: Stack, volumes: Sequence[_Volume], report: _Report,
                       preexisting: frozenset[str] = frozenset()) -> None:
    """At any time: no volume has more than two VDIs (a copy in flight), and no VDI is foreign to the soak (but
    the ``preexisting`` ones, by id: the node VMs' system disks)."""
    names = Counter(v["name_label"] for v in await stack.xo.get_objects({"type": "VDI"})
                    if v["id"] not in preexisting)
    known = {_disk(v.name) for v in volumes}
    for name, count in names.items():
        if name in known and count > 2:
            report.violations.append(f"after a fault: {count} VDIs named {name}")
        if name not in known and not name.startswith("csi-temp-"):
            report.violations.append(f"after a fault: unexpected VDI {name}")


async def check_final(stack: Stack, volumes: Sequence[_Volume], host_of: dict[str, str], report: _Report,
                      preexisting: frozenset[str] = frozenset()) -> None:
    """Everything, once the workload and faults have stopped and the system settled."""
    checks = {
        "one_vdi_per_volume_on_a_usable_sr": _volumes_in_place(stack, volumes, host_of),
        "no_orphan_or_temporary_vdi": _no_orphans(stack, volumes, preexisting),
        "queues_drained": _queues(stack, report),
        "no_lock_or_job_record_in_redis": _redis_clean(stack),
        "no_process_died_unexpectedly": _processes_alive(stack),
    }
    for name, check in checks.items():
        try:
            await check
            report.invariants[name] = True
        except AssertionError as exc:
            report.invariants[name] = False
            report.violations.append(f"{name}: {exc}")


async def _volumes_in_place(stack: Stack, volumes: Sequence[_Volume], host_of: dict[str, str]) -> None:
    srs = {sr.id: placement.view(sr) for sr in await stack.xo.find_srs()}
    problems = []
    for volume in volumes:
        vdis = await stack.xo.find_vdis(name_label=_disk(volume.name))
        if len(vdis) != 1:
            problems.append(f"{volume.name}: {len(vdis)} VDIs")
            continue
        if volume.node is not None:
            sr = srs[vdis[0].sr_id]
            host = host_of[volume.node]
            if not placement.usable_from(sr, host, sr.pool_id):
                problems.append(f"{volume.name}: on SR {sr.name}, not usable from {volume.node}")
    assert not problems, "; ".join(problems)


async def _no_orphans(stack: Stack, volumes: Sequence[_Volume], preexisting: frozenset[str]) -> None:
    known = {_disk(v.name) for v in volumes}
    extra = sorted(v["name_label"] for v in await stack.xo.get_objects({"type": "VDI"})
                   if v["name_label"] not in known and v["id"] not in preexisting)
    assert not extra, f"VDIs outside the soak's volumes: {extra}"


async def _queues(stack: Stack, report: _Report) -> None:
    assert stack.management_url is not None

    async def depth(http: httpx.AsyncClient, queue: str) -> int:
        response = await http.get(f"/api/queues/%2F/{queue}")
        response.raise_for_status()
        return int(response.json().get("messages", 0))

    async with httpx.AsyncClient(base_url=stack.management_url, auth=("guest", "guest"), timeout=10) as http:
        async def jobs_empty() -> bool:
            return await depth(http, messages.JOBS_QUEUE) == 0
        await eventually(jobs_empty, SETTLE_S, description="the jobs queue to drain")
        dead = await depth(http, messages.DEAD_LETTER_QUEUE)
    if dead:
        report.notes.append(f"{dead} dead-lettered job(s): every soak fault is transient, so none is expected")
    assert dead == 0, f"{dead} message(s) in {messages.DEAD_LETTER_QUEUE}"


async def _redis_clean(stack: Stack) -> None:
    assert stack.redis_url is not None
    client = aioredis.Redis.from_url(stack.redis_url, socket_timeout=5)
    prefix = stack.options.redis_prefix
    try:
        async def no_keys() -> bool:  # each disk's last finished job stays (days): it is no leftover
            return not [key async for key in client.scan_iter(match=keys.all_keys_pattern(prefix))
                        if not keys.is_disk_last_job_key(prefix, key.decode())]
        await eventually(no_keys, SETTLE_S, description=f"Redis keys under {prefix} to expire")
    finally:
        await client.aclose()


async def _processes_alive(stack: Stack) -> None:
    await asyncio.sleep(0)
    dead = [name for name, proc in stack.processes.items() if proc.returncode is not None]
    assert not dead, f"exited on their own: {dead}"
