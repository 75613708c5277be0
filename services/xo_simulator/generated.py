"""Generated topologies of real size: ``generated:pools=4,hosts=32,vms=2000,vdis=10000,seed=1`` (issue 14).

Pure and deterministic (same spec and seed, same objects and ids). The shape follows the bundled topologies, scaled:
each pool has a shared NFS SR tagged ``k8s-shared``; each host a local SR tagged ``k8s-migrating`` and one Kubernetes
node VM (``node-<pool>-<host>``, Running); the other VMs (``vm-<n>``) spread over the hosts, mostly Running. Every
VM has its root disk. Of the other VDIs a share ``csi`` are this driver's disks (``csi-pvc-<uuid>`` with a
``csi:info`` description, on an SR of their class, some plugged into a node VM that can use them), and the rest are
foreign: data disks of the VMs (most) or loose VDIs nobody uses. ``python -m services.xo_simulator.generated SPEC``
prints the topology as YAML.
"""

from __future__ import annotations

import random
import sys
import uuid
from dataclasses import dataclass, fields
from typing import Any

import yaml

from shared.vdi_metadata import StorageInfo

from .topology import Topology, parse_topology

PREFIX = "generated:"
GIB = 1024**3
ROOT_SIZES_GIB = (10, 20, 40, 80)
DATA_SIZES_GIB = (5, 10, 50, 100, 250, 500)
VOLUME_SIZES_GIB = (1, 5, 10, 20, 50)
RUNNING_SHARE = 0.85  # of the VMs that are not Kubernetes nodes
ATTACHED_FOREIGN_SHARE = 0.8  # foreign VDIs that are a VM's data disk
ATTACHED_VOLUME_SHARE = 0.6  # driver disks plugged into a node VM (volumes in use)
MIGRATING_TAG, SHARED_TAG = "k8s-migrating", "k8s-shared"
CREDENTIALS: dict[str, Any] = {  # those of the bundled topologies
    "tokens": ["sim-token", {"token": "viewer-token", "user": "viewer@example.org"}],
    "users": [{"email": "admin@example.org", "password": "admin", "permission": "admin"},
              {"email": "viewer@example.org", "password": "viewer", "permission": "none"}],
}


@dataclass(frozen=True)
class GeneratedSpec:
    """Sizes of a generated topology: totals over all pools; ``csi`` is the share of non-root VDIs that are
    driver disks."""

    pools: int = 4
    hosts: int = 32
    vms: int = 2000
    vdis: int = 10000
    seed: int = 1
    csi: float = 0.15

    @classmethod
    def parse(cls, text: str) -> GeneratedSpec:
        """``generated:pools=4,hosts=32,...`` (any subset of the fields; ``generated:`` alone is the default);
        ValueError naming the bad term and the fix."""
        body = text.removeprefix(PREFIX).strip()
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for term in filter(None, (part.strip() for part in body.split(","))):
            key, sep, value = term.partition("=")
            if not sep or key not in known:
                raise ValueError(f"generated topology term {term!r} must be KEY=VALUE, KEY one of {', '.join(known)}")
            try:
                values[key] = float(value) if key == "csi" else int(value)
            except ValueError as exc:
                raise ValueError(f"generated topology term {term!r}: {value!r} is not a number") from exc
        spec = cls(**values)
        spec.check()
        return spec

    def check(self) -> None:
        """ValueError unless the sizes can be built: every host has its node VM, every VM its root disk."""
        if not 1 <= self.pools <= self.hosts:
            raise ValueError("generated topology needs 1 <= pools <= hosts")
        if self.vms < self.hosts:
            raise ValueError(f"generated topology needs vms >= hosts ({self.hosts}): one Kubernetes node VM per host")
        if self.vdis < self.vms:
            raise ValueError(f"generated topology needs vdis >= vms ({self.vms}): every VM has its root disk")
        if not 0 <= self.csi <= 1:
            raise ValueError("generated topology needs 0 <= csi <= 1")


def is_generated(source: object) -> bool:
    """Whether ``source`` names a generated topology."""
    return isinstance(source, str) and source.startswith(PREFIX)


def generate(spec: GeneratedSpec) -> Topology:
    """The topology of ``spec`` (ids derived from names, as for a YAML file)."""
    return parse_topology(generate_mapping(spec))


def generate_mapping(spec: GeneratedSpec) -> dict[str, Any]:
    """The topology of ``spec`` as the mapping a YAML file would hold."""
    spec.check()
    return _Builder(spec).build()


class _Builder:
    def __init__(self, spec: GeneratedSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.pools: list[dict[str, Any]] = []
        self.hosts: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (pool, host)
        self.nodes: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []  # (pool, host, node VM)
        self.others: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []  # (pool, host, VM)
        self.loose: list[dict[str, Any]] = []

    def build(self) -> dict[str, Any]:
        self._pools_and_hosts()
        self._vms()
        non_root = self.spec.vdis - self.spec.vms
        volumes = round(non_root * self.spec.csi)
        self._foreign_disks(non_root - volumes)
        self._volumes(volumes)
        return {**CREDENTIALS, "pools": self.pools, "vdis": self.loose}

    def _pools_and_hosts(self) -> None:
        for p in range(1, self.spec.pools + 1):
            self.pools.append({"name_label": f"Pool {p}", "shared_srs": [
                {"name_label": f"NFS {p}", "size": "64TiB", "tags": [SHARED_TAG]}], "hosts": []})
        for h in range(self.spec.hosts):
            pool = self.pools[h % self.spec.pools]
            p, n = h % self.spec.pools + 1, len(pool["hosts"]) + 1
            host = {"name_label": f"host-{p}-{n:02d}", "address": f"10.{p}.{n // 250}.{n % 250 + 1}",
                    "srs": [{"name_label": f"Local {p}-{n:02d}", "size": "4TiB", "tags": [MIGRATING_TAG]}], "vms": []}
            pool["hosts"].append(host)
            self.hosts.append((pool, host))

    def _vms(self) -> None:
        for pool, host in self.hosts:
            node = self._vm(pool, host, f"node-{host['name_label'].removeprefix('host-')}", "Running",
                            root_on_local=True)
            self.nodes.append((pool, host, node))
        for n in range(1, self.spec.vms - self.spec.hosts + 1):
            pool, host = self.hosts[(n - 1) % len(self.hosts)]
            state = "Running" if self.rng.random() < RUNNING_SHARE else "Halted"
            vm = self._vm(pool, host, f"vm-{n:05d}", state, root_on_local=self.rng.random() < 0.7)
            self.others.append((pool, host, vm))

    def _vm(self, pool: dict[str, Any], host: dict[str, Any], name: str, state: str, *, root_on_local: bool
            ) -> dict[str, Any]:
        root: dict[str, Any] = {"size": f"{self.rng.choice(ROOT_SIZES_GIB)}GiB"}
        if not root_on_local:
            root["sr"] = pool["shared_srs"][0]["name_label"]
        vm: dict[str, Any] = {"name_label": name, "power_state": state, "cpus": self.rng.choice((1, 2, 4, 8)),
              "memory": f"{self.rng.choice((2, 4, 8, 16))}GiB", "root_disk": root, "disks": []}
        host["vms"].append(vm)
        return vm

    def _foreign_disks(self, count: int) -> None:
        for n in range(1, count + 1):
            size = f"{self.rng.choice(DATA_SIZES_GIB)}GiB"
            pool, host, vm = self.rng.choice(self.others or self.nodes)
            local = host["srs"][0]["name_label"]
            sr = local if self.rng.random() < 0.5 else pool["shared_srs"][0]["name_label"]
            if self.rng.random() < ATTACHED_FOREIGN_SHARE:
                vm["disks"].append({"name_label": f"{vm['name_label']} data {len(vm['disks']) + 1}", "size": size,
                                    "sr": sr})
            else:
                self.loose.append({"name_label": f"loose-{n:05d}", "size": size, "sr": sr,
                                   "name_description": "left by a deleted VM"})

    def _volumes(self, count: int) -> None:
        for _ in range(count):
            pool, host, node = self.rng.choice(self.nodes)
            migrating = self.rng.random() < 0.5
            sr = host["srs"][0]["name_label"] if migrating else pool["shared_srs"][0]["name_label"]
            info = StorageInfo(srs_with_tag=MIGRATING_TAG if migrating else SHARED_TAG, migrating=migrating)
            disk = {"name_label": f"csi-pvc-{uuid.UUID(int=self.rng.getrandbits(128), version=4)}",
                    "name_description": info.to_description(), "size": f"{self.rng.choice(VOLUME_SIZES_GIB)}GiB",
                    "sr": sr}
            if self.rng.random() < ATTACHED_VOLUME_SHARE:
                node["disks"].append(disk)  # plugged into the node of its host (local SR) or of its pool (shared)
            else:
                self.loose.append(disk)


def main(argv: list[str] | None = None) -> int:
    """Print the YAML of ``generated:...`` (argv[0]; the default spec without one)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        spec = GeneratedSpec.parse(args[0] if args else PREFIX)
    except ValueError as exc:
        print(f"generated: {exc}", file=sys.stderr)
        return 2
    yaml.safe_dump(generate_mapping(spec), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
