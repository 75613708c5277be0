"""A node plugin with --node-metadata=xo asks XO who it is once, at start, then closes its session: XO sends every
signed-in connection every change of every pool, which a node has no use for (one storm per node otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.csi import csi_pb2
from tests.support.controller import controller
from tests.support.migration import HOST_A2, VM_A2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def test_a_node_reading_its_metadata_from_xo_signs_out_once_it_knows(tmp_path: Path) -> None:
    settings = {"mode": "node", "node_id": VM_A2, "node_metadata": "xo", "host_topology": True,
                "device_dir": str(tmp_path)}
    async with controller(settings=settings) as running:
        assert running.frontend.node is not None
        info = await running.frontend.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), None)  # type: ignore[arg-type]
        assert (info.node_id, info.accessible_topology.segments["host"]) == (VM_A2, HOST_A2)
        assert running.frontend.xo is None and running.frontend.attacher is None
        assert len(running.sim.simulator.connections) == 0  # XO sends this node nothing any more
        assert await running.frontend.readiness() == (True, {})  # readiness no longer asks XO
