"""Loop devices standing in for attached XO disks, and NodeServicer calls on them, for the node integration tests
(needs root and util-linux). The ``host`` fixture (a sandbox of them) is in tests/integration/conftest.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from services.csi_frontend import mounter
from services.csi_frontend.node import NodeConfig, NodeServicer
from shared.csi import csi_pb2


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for loop devices and mounts"
    missing = [tool for tool in ("losetup", "mkfs.ext4", "mkfs.xfs", "blkid", "mount") if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control: loop devices are unavailable in this environment"
    return None


class FakeContext:
    """Stands in for grpc.aio.ServicerContext: only the deadline is read."""

    def __init__(self, remaining_s: float = 60.0) -> None:
        self.remaining_s = remaining_s

    def time_remaining(self) -> float | None:
        return self.remaining_s


class Host:
    """Loop devices exposed as <root>/devices/<name>, as Xen exposes /dev/xvdX, and their cleanup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.device_dir = root / "devices"
        self.device_dir.mkdir()
        self._loops: dict[str, tuple[Path, Path]] = {}

    async def attach(self, name: str, size_bytes: int) -> Path:
        image = self.root / f"{name}.img"
        image.touch()
        os.truncate(image, size_bytes)  # sparse
        result = await mounter.run("losetup", "--find", "--show", str(image), timeout_s=30)
        loop = Path(result.stdout.strip())
        self._loops[name] = (loop, image)
        (self.device_dir / name).symlink_to(loop)
        return loop

    async def copy(self, source: str, name: str) -> Path:
        """Attach ``name`` as a block copy of disk ``source`` (what XO's VDI.clone and VDI.copy give): dd from
        one loop device to the other, so filesystem UUIDs are copied too."""
        source_loop, source_image = self._loops[source]
        loop = await self.attach(name, source_image.stat().st_size)
        await mounter.run("dd", f"if={source_loop}", f"of={loop}", "bs=1M", "conv=sparse,fsync", "status=none",
                          timeout_s=60)
        return loop

    async def grow(self, name: str, size_bytes: int) -> None:
        loop, image = self._loops[name]
        os.truncate(image, size_bytes)
        await mounter.run("losetup", "-c", str(loop), timeout_s=30)

    async def cleanup(self) -> None:
        prefix = str(self.root) + "/"
        for mount_point in reversed(mount_points()):
            if mount_point.startswith(prefix):
                await mounter.run("umount", "-l", mount_point, timeout_s=30, ok_codes=(0, 32))
        for loop, _ in self._loops.values():
            await mounter.run("losetup", "-d", str(loop), timeout_s=30, ok_codes=(0, 1))


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as lines:
        return [info.mount_point for line in lines if (info := mounter.parse_mountinfo_line(line))]


def servicer(host: Host) -> NodeServicer:
    return NodeServicer(NodeConfig(node_id="vm-test", device_dir=host.device_dir, device_wait_s=2.0))




async def stage(
    node: NodeServicer, staging: Path, device: str, cap: csi_pb2.VolumeCapability, volume_id: str = "name:pvc-1",
    *, remaining_s: float = 60.0,
) -> None:
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id,
        staging_target_path=str(staging),
        volume_capability=cap,
        publish_context={"device": device},
    )
    await node.NodeStageVolume(request, FakeContext(remaining_s))


async def publish(
    node: NodeServicer,
    staging: Path,
    target: Path,
    cap: csi_pb2.VolumeCapability,
    *,
    readonly: bool = False,
    device: str = "xvdb",
) -> None:
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="name:pvc-1",
        staging_target_path=str(staging),
        target_path=str(target),
        volume_capability=cap,
        readonly=readonly,
        publish_context={"device": device},
    )
    await node.NodePublishVolume(request, FakeContext())


async def unpublish(node: NodeServicer, target: Path) -> None:
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="name:pvc-1", target_path=str(target))
    await node.NodeUnpublishVolume(request, FakeContext())


async def unstage(node: NodeServicer, staging: Path) -> None:
    request = csi_pb2.NodeUnstageVolumeRequest(volume_id="name:pvc-1", staging_target_path=str(staging))
    await node.NodeUnstageVolume(request, FakeContext())


async def volume_stats(node: NodeServicer, path: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id="name:pvc-1", volume_path=str(path))
    return await node.NodeGetVolumeStats(request, FakeContext())


async def expand(node: NodeServicer, path: Path, required_bytes: int = 0, limit_bytes: int = 0) -> int:
    request = csi_pb2.NodeExpandVolumeRequest(
        volume_id="name:pvc-1",
        volume_path=str(path),
        capacity_range=csi_pb2.CapacityRange(required_bytes=required_bytes, limit_bytes=limit_bytes),
    )
    return (await node.NodeExpandVolume(request, FakeContext())).capacity_bytes


def usage(response: csi_pb2.NodeGetVolumeStatsResponse, unit: int) -> csi_pb2.VolumeUsage:
    found: csi_pb2.VolumeUsage = next(usage for usage in response.usage if usage.unit == unit)
    return found
