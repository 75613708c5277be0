"""Space accounting of the XO simulator: thin SRs count allocated bytes and may be overcommitted, LVM is thick."""

from __future__ import annotations

from typing import Any

import pytest

from services.xo_simulator.accounting import Accounting, is_thin, vhd_metadata_bytes
from services.xo_simulator.errors import XapiError
from services.xo_simulator.model import ObjectStore
from shared.units import GiB


def _sr(sr_type: str, **extra: Any) -> dict[str, Any]:
    return {"id": sr_type, "type": "SR", "_xapiRef": f"OpaqueRef:{sr_type}", "SR_type": sr_type, "size": 10 * GiB,
            "usage": 0, "physical_usage": 0, "VDIs": [], **extra}


def test_vhd_metadata_is_headers_and_a_bat_of_4_bytes_per_2_mib_block() -> None:
    assert vhd_metadata_bytes(0) == 2048
    assert vhd_metadata_bytes(2 * 1024**2) == 2048 + 512
    assert vhd_metadata_bytes(10 * GiB) == 2048 + 5120 * 4


@pytest.mark.parametrize(("sr_type", "thin"), [("ext", True), ("nfs", True), ("lvm", False), ("lvmoiscsi", False)])
def test_thin_by_sr_type(sr_type: str, thin: bool) -> None:
    assert is_thin(_sr(sr_type)) is thin


def test_thin_checks_physical_space_only_and_thick_checks_virtual_space() -> None:
    accounting = Accounting(ObjectStore(), None)
    accounting.ensure_space(_sr("ext", usage=100 * GiB), 50 * GiB, vhd_metadata_bytes(50 * GiB))  # overcommit
    with pytest.raises(XapiError, match="SR_BACKEND_FAILURE_44"):
        accounting.ensure_space(_sr("ext", physical_usage=10 * GiB), GiB, 1)
    accounting.ensure_space(_sr("lvm", usage=9 * GiB), GiB, GiB)
    with pytest.raises(XapiError, match="SR_BACKEND_FAILURE_44"):
        accounting.ensure_space(_sr("lvm", usage=9 * GiB), GiB + 1, 0)


def test_refresh_sr_sums_sizes_and_usages() -> None:
    store = ObjectStore()
    accounting = Accounting(store, None)
    for sr_type in ("ext", "lvm"):
        store.add(_sr(sr_type))
        for index, (size, usage) in enumerate(((GiB, 4096), (2 * GiB, 8192))):
            store.add({"id": f"{sr_type}{index}", "type": "VDI", "_xapiRef": f"OpaqueRef:{sr_type}{index}",
                       "size": size, "usage": usage})
        accounting.refresh_sr(sr_type, [f"{sr_type}0", f"{sr_type}1"])
    assert [store.get("ext")[k] for k in ("usage", "physical_usage", "VDIs")] == [3 * GiB, 12288, ["ext0", "ext1"]]
    assert [store.get("lvm")[k] for k in ("usage", "physical_usage")] == [3 * GiB, 3 * GiB]
    assert accounting.initial_usage(store.get("ext"), GiB) == vhd_metadata_bytes(GiB)
    assert accounting.initial_usage(store.get("lvm"), GiB) == GiB
