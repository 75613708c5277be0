"""Pydantic models of the XO object fields the driver reads (XO's own names: ``$SR``, ``$container``, ...).

Unknown fields are ignored; a missing required field means XO sent something we cannot use.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class XoObject(BaseModel):
    """Fields common to every XO object."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    id: str
    uuid: str = ""
    type: str
    pool_id: str = Field(default="", alias="$pool")


class Sr(XoObject):
    name_label: str = ""
    size: int = 0
    usage: int = 0
    physical_usage: int = 0
    shared: bool = False
    tags: list[str] = Field(default_factory=list)
    container: str = Field(default="", alias="$container")
    content_type: str = ""
    sr_type: str = Field(default="", alias="SR_type")
    in_maintenance_mode: bool = Field(default=False, alias="inMaintenanceMode")


class Vm(XoObject):
    name_label: str = ""
    power_state: str = ""
    container: str = Field(default="", alias="$container")
    vbd_ids: list[str] = Field(default_factory=list, alias="$VBDs")


class Vdi(XoObject):
    name_label: str = ""
    name_description: str = ""
    size: int = 0
    usage: int = 0
    sr_id: str = Field(alias="$SR")
    vbd_ids: list[str] = Field(default_factory=list, alias="$VBDs")
    current_operations: dict[str, Any] = Field(default_factory=dict)
    missing: bool = False


class Vbd(XoObject):
    attached: bool = False
    device: str | None = None
    position: str | None = None
    read_only: bool = False
    bootable: bool = False
    is_cd_drive: bool = False
    vdi_id: str | None = Field(default=None, alias="VDI")
    vm_id: str = Field(alias="VM")
