"""Topology files: the YAML that declares pools, hosts, SRs, VMs, seed VDIs and credentials.

Pure parsing into frozen pydantic models; missing ids are derived deterministically (uuid5 of the names).
Building XO objects from a topology lives in inventory.py.
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from shared.units import parse_size

_NAMESPACE = uuid.UUID("6f1c0d2e-9a57-4a53-9d3c-2f0b5d8e7a11")
BUILTIN_DIR = Path(__file__).parent / "topologies"


def derived_id(*parts: str) -> str:
    """Return a stable UUID for an object named by ``parts`` (kind, then names from the root)."""
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def _size(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int | str):
        raise ValueError(f"size must be bytes or a string like '10GiB', not {value!r}")
    return parse_size(value)


def _uuid(value: str) -> str:
    return str(uuid.UUID(value))


Size = Annotated[int, BeforeValidator(_size)]
Uuid = Annotated[str, AfterValidator(_uuid)]
PowerState = Literal["Running", "Halted", "Paused", "Suspended"]
Permission = Literal["none", "read", "write", "admin"]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Named(_Node):
    """An XO object named by the topology: its id (derived from the names when the file gives none) and name."""

    id: Uuid
    name_label: str


class _Described(_Named):
    """A named object that also has a description (name_description, empty unless the file gives one)."""

    name_description: str = ""


class SrSpec(_Described):
    """A storage repository; local when listed under a host, shared when listed under a pool."""

    size: Size
    tags: list[str] = []
    SR_type: str | None = None
    resize_online: bool = False  # its SM driver has VDI_RESIZE_ONLINE (none of XCP-ng's does)


class RootDiskSpec(_Node):
    """A VM's system disk, plugged at position 0; ``sr`` defaults to the host's first local SR, else the
    pool's first shared SR."""

    size: Size
    sr: str | None = None
    name_label: str | None = None


class DataDiskSpec(RootDiskSpec):
    """One more disk of a VM, plugged (when the VM runs) at the next free position from 1, skipping 3 (the CD's);
    ``sr`` defaults as the root disk's. Its id is derived from the VM and its rank in ``disks``."""

    name_label: str
    name_description: str = ""


class VmSpec(_Described):
    """A VM resident on its host when Running/Paused/Suspended."""

    power_state: PowerState = "Running"
    tags: list[str] = []
    cpus: int = 2
    memory: Size = 4 * 1024**3
    root_disk: RootDiskSpec | None = None
    disks: list[DataDiskSpec] = []


class HostSpec(_Named):
    """A host with its local SRs and the VMs resident on it."""

    address: str | None = None
    srs: list[SrSpec] = []
    vms: list[VmSpec] = []


class PoolSpec(_Described):
    """A pool: shared SRs plus hosts; the first host is the master."""

    shared_srs: list[SrSpec] = []
    hosts: list[HostSpec] = []


class VdiSpec(_Described):
    """A VDI present at start; ``sr`` is an SR id or a unique SR name_label."""

    size: Size
    sr: str
    tags: list[str] = []


class UserSpec(_Node):
    """A user that can sign in with email (or username) and password; XO's default permission is ``none``."""

    email: str
    password: str
    permission: Permission = "none"


def _token(value: Any) -> Any:
    return {"token": value} if isinstance(value, str) else value


class TokenSpec(_Node):
    """An authentication token of ``user`` (an email; default the first user), valid ``expires_in_s`` from start."""

    token: str
    user: str | None = None
    expires_in_s: float | None = Field(default=None, gt=0)


class Topology(_Node):
    """The whole simulated XO: credentials, pools and seed VDIs."""

    tokens: list[Annotated[TokenSpec, BeforeValidator(_token)]] = []
    users: list[UserSpec] = []
    pools: list[PoolSpec] = []
    vdis: list[VdiSpec] = []

    @model_validator(mode="before")
    @classmethod
    def _fill_ids(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = copy.deepcopy(dict(data))
        for pool in _dicts(data.get("pools")):
            pool_name = str(pool.get("name_label"))
            pool.setdefault("id", derived_id("pool", pool_name))
            for sr in _dicts(pool.get("shared_srs")):
                sr.setdefault("id", derived_id("sr", pool_name, str(sr.get("name_label"))))
            for host in _dicts(pool.get("hosts")):
                host_name = str(host.get("name_label"))
                host.setdefault("id", derived_id("host", pool_name, host_name))
                for sr in _dicts(host.get("srs")):
                    sr.setdefault("id", derived_id("sr", pool_name, host_name, str(sr.get("name_label"))))
                for vm in _dicts(host.get("vms")):
                    vm.setdefault("id", derived_id("vm", pool_name, host_name, str(vm.get("name_label"))))
        for vdi in _dicts(data.get("vdis")):
            vdi.setdefault("id", derived_id("vdi", str(vdi.get("sr")), str(vdi.get("name_label"))))
        return data

    @model_validator(mode="after")
    def _check_references(self) -> Topology:
        ids = [pool.id for pool in self.pools]
        ids += [host.id for _, host in self.hosts()]
        ids += [sr.id for _, _, sr in self.srs()]
        ids += [vm.id for _, vm in self.vms()]
        ids += [vdi.id for vdi in self.vdis]
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
        if duplicates:
            raise ValueError(f"duplicate ids in topology: {', '.join(duplicates)}")
        for vdi in self.vdis:
            self.resolve_sr(vdi.sr)
        for pool, host in self.hosts():
            for vm in host.vms:
                for disk in (vm.root_disk, *vm.disks):
                    if disk is not None:
                        self.disk_sr(pool, host, vm, disk)
        emails = {user.email for user in self.users}
        for token in self.tokens:
            if token.user is not None and token.user not in emails:
                raise ValueError(f"token user {token.user!r} must be the email of one of the topology users")
        return self

    def hosts(self) -> Iterator[tuple[PoolSpec, HostSpec]]:
        """Every host with its pool."""
        for pool in self.pools:
            for host in pool.hosts:
                yield pool, host

    def srs(self) -> Iterator[tuple[PoolSpec, HostSpec | None, SrSpec]]:
        """Every SR with its pool and, for a local SR, its host."""
        for pool in self.pools:
            for sr in pool.shared_srs:
                yield pool, None, sr
            for host in pool.hosts:
                for sr in host.srs:
                    yield pool, host, sr

    def vms(self) -> Iterator[tuple[HostSpec, VmSpec]]:
        """Every VM with its host."""
        for _, host in self.hosts():
            for vm in host.vms:
                yield host, vm

    def root_disk_sr(self, pool: PoolSpec, host: HostSpec, vm: VmSpec) -> str:
        """The SR id of a VM's root disk; ValueError when the topology names none and has none nearby."""
        if vm.root_disk is None:
            raise ValueError(f"VM {vm.name_label!r} has no root_disk")
        return self.disk_sr(pool, host, vm, vm.root_disk)

    def disk_sr(self, pool: PoolSpec, host: HostSpec, vm: VmSpec, disk: RootDiskSpec) -> str:
        """The SR id of one of a VM's disks: its ``sr``, else the host's first local SR, else the pool's first shared
        SR; ValueError when there is none."""
        if disk.sr is not None:
            return self.resolve_sr(disk.sr)
        nearby = [*host.srs, *pool.shared_srs]
        if not nearby:
            what = "a root_disk" if disk is vm.root_disk else f"disk {disk.name_label!r}"
            raise ValueError(f"VM {vm.name_label!r} has {what} but its host has no SR and its pool no shared SR")
        return nearby[0].id

    def resolve_sr(self, ref: str) -> str:
        """Return the id of the SR named by id or unique name_label; ValueError otherwise."""
        matches = self._sr_refs.get(ref, [])
        if len(matches) != 1:
            raise ValueError(f"VDI sr {ref!r} must name exactly one SR by id or name_label ({len(matches)} match)")
        return matches[0]

    @cached_property
    def _sr_refs(self) -> dict[str, list[str]]:
        """SR ids by id and by name_label (a name may be shared)."""
        refs: dict[str, list[str]] = {}
        for _, _, sr in self.srs():
            for ref in {sr.id, sr.name_label}:
                refs.setdefault(ref, []).append(sr.id)
        return refs


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, dict))


def parse_topology(source: str | Mapping[str, Any]) -> Topology:
    """Parse YAML text or an already-loaded mapping; raises pydantic.ValidationError or ValueError."""
    data = yaml.safe_load(source) if isinstance(source, str) else source
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError("a topology must be a mapping at top level")
    return Topology.model_validate(data)


def load_topology(path: str | Path) -> Topology:
    """Load a topology file, or a bundled one by name (``two-hosts``, ``shared-pool``, ``two-pools``)."""
    candidate = Path(path)
    if not candidate.exists():
        bundled = BUILTIN_DIR / f"{path}.yaml"
        if bundled.exists():
            candidate = bundled
    return parse_topology(candidate.read_text(encoding="utf-8"))
