"""Constructors of XO-shaped objects (XO-API.md §4): pool, host, PBD, SR, VM (and control domain), VDI, VBD, task,
message.

Only shapes live here; which objects exist and how they change is the store's and xapi.py's business.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

XoObject = dict[str, Any]

# Fields every XO object carries besides its own (xapiObjectToXo).
XAPI_VERSION = "8.3.0"


def opaque_ref() -> str:
    """Return a fake XAPI reference."""
    return f"OpaqueRef:{uuid.uuid4()}"


def new_uuid() -> str:
    """Return a random UUID string for an object created at run time."""
    return str(uuid.uuid4())


def _common(obj_id: str, obj_type: str, pool_id: str) -> XoObject:
    return {
        "id": obj_id,
        "uuid": obj_id,
        "type": obj_type,
        "$pool": pool_id,
        "$poolId": pool_id,
        "_xapiRef": opaque_ref(),
    }


def pool(obj_id: str, name_label: str, name_description: str, master: str | None, default_sr: str | None) -> XoObject:
    """An XO pool; its ``$pool`` is its own id."""
    return _common(obj_id, "pool", obj_id) | {
        "name_label": name_label,
        "name_description": name_description,
        "master": master,
        "default_SR": default_sr,
        "HA_enabled": False,
        "tags": [],
        "cpus": {"cores": 16, "sockets": 2},
        "current_operations": {},
        "otherConfig": {},
        "platform_version": "3.4.0",
        "suspendSr": None,
        "crashDumpSr": None,
        "zstdSupported": True,
        "vtpmSupported": True,
    }


def host(obj_id: str, pool_id: str, name_label: str, address: str) -> XoObject:
    """An XO host, enabled and running."""
    return _common(obj_id, "host", pool_id) | {
        "name_label": name_label,
        "name_description": "",
        "address": address,
        "hostname": name_label,
        "enabled": True,
        "power_state": "Running",
        "memory": {"usage": 0, "size": 256 * 1024**3},
        "cpus": {"cores": 16, "sockets": 2},
        "residentVms": [],
        "PIFs": [],
        "$PIFs": [],
        "$PBDs": [],
        "PCIs": [],
        "PGPUs": [],
        "controlDomain": None,
        "version": XAPI_VERSION,
        "productBrand": "XCP-ng",
        "build": "release/8.3",
        "tags": [],
        "startTime": int(time.time()),
        "rebootRequired": False,
        "current_operations": {},
        "otherConfig": {},
    }


def pbd(obj_id: str, pool_id: str, host_id: str, sr_id: str) -> XoObject:
    """An attached PBD joining an SR to a host."""
    return _common(obj_id, "PBD", pool_id) | {
        "attached": True,
        "host": host_id,
        "SR": sr_id,
        "device_config": {},
        "otherConfig": {},
    }


def sr(
    obj_id: str,
    pool_id: str,
    *,
    name_label: str,
    name_description: str,
    size: int,
    shared: bool,
    sr_type: str,
    tags: Sequence[str],
    container: str,
    pbds: Sequence[str],
    is_thin: bool,
) -> XoObject:
    """An XO SR; ``$container`` is the pool for a shared SR, the host of its PBD otherwise."""
    return _common(obj_id, "SR", pool_id) | {
        "name_label": name_label,
        "name_description": name_description,
        "size": size,
        "physical_usage": 0,
        "usage": 0,
        "shared": shared,
        "SR_type": sr_type,
        "content_type": "user",
        "tags": list(tags),
        "VDIs": [],
        "$PBDs": list(pbds),
        "$container": container,
        "allocationStrategy": "thin" if is_thin else "thick",
        "inMaintenanceMode": False,
        "current_operations": {},
        "other_config": {},
        "sm_config": {},
    }


def vm(obj_id: str, pool_id: str, *, name_label: str, name_description: str, power_state: str,
       container: str, cpus: int, memory_bytes: int, tags: Sequence[str]) -> XoObject:
    """An XO VM; ``$container`` is its host while resident, its pool when halted."""
    return _common(obj_id, "VM", pool_id) | {
        "name_label": name_label,
        "name_description": name_description,
        "power_state": power_state,
        "$container": container,
        "$VBDs": [],
        "VIFs": [],
        "CPUs": {"max": cpus, "number": cpus},
        "memory": {
            "dynamic": [memory_bytes, memory_bytes],
            "static": [memory_bytes // 4, memory_bytes],
            "size": memory_bytes,
        },
        "tags": list(tags),
        "addresses": {},
        "mainIpAddress": None,
        "os_version": None,
        "snapshots": [],
        "current_operations": {},
        "virtualizationMode": "hvm",
        "other": {},
        "affinityHost": None,
        "boot": {"firmware": "uefi", "order": "cd"},
        "bios_strings": {},
        "creation": {},
    }


def control_domain(obj_id: str, pool_id: str, *, host_id: str, host_name: str) -> XoObject:
    """A host's control domain (dom0) as XO shows it: ``type: "VM-controller"``, Running on its host. XAPI plugs a
    VDI into it while it streams or copies the VDI (Sm_fs_ops.with_block_attached_device)."""
    return vm(obj_id, pool_id, name_label=f"Control domain on host: {host_name}", name_description="The domain "
              "which manages physical devices and manages other domains", power_state="Running",
              container=host_id, cpus=16, memory_bytes=8 * 1024**3, tags=()) | {"type": "VM-controller"}


def vdi(obj_id: str, pool_id: str, *, sr_id: str, name_label: str, name_description: str,
        size: int, usage: int, tags: Sequence[str]) -> XoObject:
    """A user VDI: ``size`` is its virtual size, ``usage`` what it occupies on its SR (see accounting.py)."""
    return _common(obj_id, "VDI", pool_id) | {
        "name_label": name_label,
        "name_description": name_description,
        "size": size,
        "usage": usage,
        "chainPhysicalUsage": usage,
        "$SR": sr_id,
        "$VBDs": [],
        "VDI_type": "user",
        "snapshots": [],
        "tags": list(tags),
        "parent": None,
        "image_format": "vhd",
        "cbt_enabled": False,
        "missing": False,
        "current_operations": {},
        "other_config": {},
    }


def vbd(obj_id: str, pool_id: str, *, vm_id: str, vdi_id: str, position: str, bootable: bool,
        read_only: bool) -> XoObject:
    """A disk VBD, detached: ``device`` stays null until plugged."""
    return _common(obj_id, "VBD", pool_id) | {
        "attached": False,
        "bootable": bootable,
        "device": None,
        "is_cd_drive": False,
        "position": position,
        "read_only": read_only,
        "VDI": vdi_id,
        "VM": vm_id,
    }


def device_name(position: int) -> str:
    """Return the Linux xen-blkfront name for a userdevice: 0 -> xvda, 1 -> xvdb, 26 -> xvdaa."""
    letters = ""
    n = position
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return f"xvd{letters}"


def task(obj_id: str, pool_id: str, *, name_label: str, host_id: str | None) -> XoObject:
    """An XAPI task as XO shows it (``type: "task"``), pending at 0 %."""
    return _common(obj_id, "task", pool_id) | {
        "name_label": name_label,
        "name_description": "",
        "status": "pending",
        "progress": 0.0,
        "created": int(time.time()),
        "finished": None,
        "result": "",
        "error_info": [],
        "allowedOperations": [],
        "current_operations": {},
        "$host": host_id,
    }


def message(obj_id: str, pool_id: str, *, name: str, body: str, object_id: str) -> XoObject:
    """An XAPI message (alarm, event) as XO shows it (``type: "message"``)."""
    return _common(obj_id, "message", pool_id) | {
        "name": name,
        "body": body,
        "time": int(time.time()),
        "$object": object_id,
    }
