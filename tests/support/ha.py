"""Helpers of the HA suite (tests/ha/): many migrating volumes moved at once from node-a1's host to node-a2's
through the whole stack, and what must hold afterwards whatever broker died on the way."""

from __future__ import annotations

import asyncio

from dev.stack import Stack
from shared.units import MiB
from tests.support.e2e import MIGRATING, Volume, create, host_segment, migrations_of, publish, srs_of


async def volumes_on_a1(stack: Stack, prefix: str, count: int, size: int = 64 * MiB) -> list[Volume]:
    """``count`` migrating volumes created on host-a1's local SR (one at a time, as the provisioner would)."""
    preferred = await host_segment(stack, "node-a1")
    volumes = []
    for n in range(count):
        name = f"{prefix}-{n}"
        volumes.append(Volume(name, await create(stack, name, size, MIGRATING, preferred)))
    return volumes


def publish_all(stack: Stack, volumes: list[Volume], node: str = "node-a2") -> asyncio.Future[list[dict[str, str]]]:
    """ControllerPublishVolume of every volume to ``node`` at once, each retried as external-attacher does."""
    return asyncio.gather(*(publish(stack, volume.volume_id, node) for volume in volumes))


async def each_moved_exactly_once(stack: Stack, volumes: list[Volume], host_sr: str = "Local A2") -> None:
    """Every volume has one VDI, on the SR of node-a2's host, and XO copied it exactly once."""
    moved = {volume.name: (await srs_of(stack, volume.disk), await migrations_of(stack, volume.disk))
             for volume in volumes}
    assert moved == {volume.name: ([host_sr], 1) for volume in volumes}
