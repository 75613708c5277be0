"""What a user sees with kubectl and what XO and the services report, read for the k8s scenarios: quantities,
CSIStorageCapacity objects, PV node affinity, provisioner events, copy times, filesystem sizes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dev.stack import Stack
from dev.wait import eventually
from shared import placement
from tests.k8s.cluster import Obj
from tests.k8s.deployment import Deployed
from tests.k8s.objects import DRIVER, NAMESPACE
from tests.support.e2e import sim_stats

_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTOR = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "k": 10**3, "M": 10**6, "G": 10**9,
           "T": 10**12}


def quantity(text: str) -> int:
    """Bytes of a Kubernetes quantity as the API server prints storage sizes ("256Mi", "107374182400")."""
    match = _QUANTITY.match(text)
    assert match, f"unexpected quantity {text!r}"
    return int(match.group(1)) * _FACTOR[match.group(2)]


async def segments_of(env: Deployed) -> dict[str, dict[str, str]]:
    """Node name -> the topology segment its node plugin reports (NodeGetInfo), as the Node labels carry it."""
    return {vm: dict((await env.node_info(vm)).accessible_topology.segments) for vm in sorted(env.stack.vm_ids)}


async def capacities(env: Deployed, storage_class_name: str, count: int) -> dict[str, Obj]:
    """The CSIStorageCapacity objects of a class keyed by their segment's host, once there are ``count``."""
    async def listed() -> dict[str, Obj]:
        items = [c for c in await env.cluster.list("csistoragecapacity", NAMESPACE)
                 if c["storageClassName"] == storage_class_name]
        assert len(items) == count, [c["nodeTopology"] for c in items]
        return {c["nodeTopology"]["matchLabels"]["host"]: c for c in items}
    return await eventually(listed, 60, interval_s=0.5, description=f"{count} capacities of {storage_class_name}")


def affinity_terms(pv: Obj) -> list[dict[str, list[str]]]:
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    out = []
    for term in terms:
        assert all(e["operator"] == "In" for e in term["matchExpressions"]), term
        out.append({e["key"]: e["values"] for e in term["matchExpressions"]})
    return sorted_dicts(out)


def sorted_dicts(dicts: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(dicts, key=lambda d: sorted(d.items()))


async def free_of(env: Deployed, sr_name: str) -> int:
    (sr,) = [sr for sr in await env.stack.xo.find_srs() if sr.name_label == sr_name]
    return placement.free_bytes(sr)


def provisioner_reasons(events: list[Obj]) -> list[str]:
    """Reasons of the events the external-provisioner reported, sorted (ties in time are common)."""
    return sorted(e["reason"] for e in events
                  if (e.get("source", {}).get("component") or e.get("reportingComponent", "")).startswith(DRIVER))


def copy_seconds(stack: Stack, disk: str) -> float:
    """The copy time the migrator logged for the disk's (one) successful migration."""
    durations = []
    for name, process in stack.processes.items():
        if not name.startswith("migrator"):
            continue
        for line in process.log_text().splitlines():
            if '"migration_finished"' in line and disk in line:
                entry = json.loads(line)
                if entry.get("outcome") == "succeeded":
                    durations.append(entry["duration_ms"] / 1000)
    (seconds,) = durations
    return float(seconds)


def filesystem_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_blocks * stats.f_frsize


async def copying(stack: Stack, disk: str) -> bool:
    return bool((await sim_stats(stack))["active_migrations"] >= 1 and len(
        await stack.xo.find_vdis(name_label=disk)) == 2)
