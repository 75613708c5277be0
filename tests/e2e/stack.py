"""The whole stack as separate processes for e2e tests: the XO simulator in real data mode, one
controller frontend and one node frontend per node VM, each on its own unix socket."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shared.config import XoSettings
from shared.csi import csi_pb2, csi_pb2_grpc
from shared.xo.client import XoClient
from tests.support.procs import ServiceProcess

TOPOLOGIES = Path(__file__).resolve().parents[2] / "services" / "xo_simulator" / "topologies"
URL_RE = re.compile(r"xo-sim listening on (ws://\S+)")
ServiceStarter = Callable[..., AbstractAsyncContextManager[ServiceProcess]]


@dataclass
class Stack:
    xo_url: str
    xo: XoClient
    controller: csi_pb2_grpc.ControllerStub
    identity: csi_pb2_grpc.IdentityStub
    nodes: dict[str, csi_pb2_grpc.NodeStub]  # by VM name
    vm_ids: dict[str, str]  # VM name -> VM uuid
    device_root: Path
    work: Path
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    async def sr_id(self, name: str) -> str:
        return next(sr.id for sr in await self.xo.find_srs() if sr.name_label == name)

    async def node_for_disk(self, disk_name: str, *, same_host: bool = True) -> str:
        """A node VM name on the host of the disk's (local) SR, or on another host."""
        vdi = (await self.xo.find_vdis(name_label=disk_name))[0]
        sr = await self.xo.get_sr(vdi.sr_id)
        assert sr is not None
        for name, vm_id in sorted(self.vm_ids.items()):
            vm = await self.xo.get_vm(vm_id)
            if vm is not None and (vm.container == sr.container) == same_host:
                return name
        raise AssertionError(f"no node {'on' if same_host else 'off'} the host of {disk_name}")


def frontend_env(xo_url: str) -> dict[str, str]:
    return {"XOA_URL": xo_url, "XOA_TOKEN": "sim-token", "LOG_LEVEL": "info"}


async def _ready(channel: grpc.aio.Channel) -> bool:
    try:
        await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return True


@contextlib.asynccontextmanager
async def frontend(start: ServiceStarter, name: str, socket: Path, xo_url: str, *args: str
                   ) -> AsyncIterator[tuple[ServiceProcess, grpc.aio.Channel]]:
    channel = grpc.aio.insecure_channel(f"unix://{socket}")
    argv = [sys.executable, "-m", "services.csi_frontend", "--endpoint", f"unix://{socket}", *args]
    try:
        async with start(argv, env=frontend_env(xo_url), ready=lambda: _ready(channel), name=name,
                         timeout_s=30) as proc:
            yield proc, channel
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def running_stack(start: ServiceStarter, work: Path, topology: str = "two-hosts.yaml",
                        sim_args: tuple[str, ...] = (), controller_args: tuple[str, ...] = ()
                        ) -> AsyncIterator[Stack]:
    backing, device_root = work / "backing", work / "devices"
    argv = [sys.executable, "-m", "services.xo_simulator", "--topology", str(TOPOLOGIES / topology),
            "--listen", "127.0.0.1:0", "--backing-dir", str(backing), "--device-root", str(device_root),
            "--admin", *sim_args]
    async with start(argv, ready_line_regex=URL_RE.pattern, name="xo-sim", timeout_s=20) as sim:
        match = URL_RE.search(sim.log_text())
        assert match, sim.log_tail()
        xo_url = match.group(1)
        xo = XoClient.from_settings(XoSettings(url=xo_url, token="sim-token"))  # type: ignore[arg-type]
        try:
            vms = {vm["name_label"]: vm["id"] for vm in await xo.get_objects({"type": "VM"})}
            async with contextlib.AsyncExitStack() as stack_cm:
                _, ctrl = await stack_cm.enter_async_context(
                    frontend(start, "controller", work / "controller.sock", xo_url, "--mode", "controller",
                             *controller_args))
                nodes: dict[str, csi_pb2_grpc.NodeStub] = {}
                for vm_name, vm_id in sorted(vms.items()):
                    _, channel = await stack_cm.enter_async_context(frontend(
                        start, f"node-{vm_name}", work / f"{vm_name}.sock", xo_url, "--mode", "node",
                        "--node-id", vm_id, "--device-dir", str(device_root / vm_id)))
                    nodes[vm_name] = csi_pb2_grpc.NodeStub(channel)
                yield Stack(xo_url, xo, csi_pb2_grpc.ControllerStub(ctrl), csi_pb2_grpc.IdentityStub(ctrl), nodes,
                            vms, device_root, work, processes={"xo-sim": sim})
        finally:
            await xo.close()


def mount_cap(fs_type: str = "ext4", mode: int = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
              ) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def is_root() -> bool:
    return os.geteuid() == 0


def params(**kwargs: Any) -> dict[str, str]:
    return {k: str(v) for k, v in kwargs.items()}
