"""The controller pod outside a pod: the sidecars with EXACTLY the args of k8s/base/controller.yaml (read from the
manifest), plus only what running outside a pod requires, and one xo-csi-frontend --mode controller per replica.

Outside a pod: ``--csi-address`` points at the replica's own socket (the pod's emptyDir), ``--kubeconfig`` carries
the ServiceAccount token (the pod's mounted token), ``--leader-election-namespace`` names the namespace the pod
would read from its ServiceAccount mount, the downward-API variables get the pod's name and namespace, and each
replica runs in its own UTS namespace whose hostname is the pod name, as in a pod: the sidecars' leader-election
identity is the hostname, and two replicas with one identity would both lead.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dev.process import ServiceProcess, service_process
from dev.stack import socket_answers
from tests.k8s.cluster import REPO, Cluster

CONTROLLER_MANIFEST = REPO / "k8s/base/controller.yaml"
SIDECARS = ("csi-provisioner", "csi-attacher", "csi-resizer")
FRONTEND = "xo-csi-frontend"
# the only flags the harness adds to a manifest container's args (value-free names)
OUTSIDE_POD_FLAGS = ("--kubeconfig", "--leader-election-namespace")
SIDECAR_READY = r"(?i)attempting to acquire leader lease"


@dataclass(frozen=True)
class Container:
    """One container of the controller Deployment as the manifest declares it."""

    name: str
    args: tuple[str, ...]
    field_env: Mapping[str, str]  # variable -> downward-API fieldPath


def controller_deployment(path: Path = CONTROLLER_MANIFEST) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return dict(deployment)


def manifest_containers(deployment: Mapping[str, Any]) -> dict[str, Container]:
    containers = {}
    for spec in deployment["spec"]["template"]["spec"]["containers"]:
        field_env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in spec.get("env", [])
                     if "fieldRef" in e.get("valueFrom", {})}
        containers[spec["name"]] = Container(spec["name"], tuple(spec.get("args", ())), field_env)
    return containers


def outside_pod_args(container: Container, *, socket: Path, kubeconfig: Path, namespace: str) -> list[str]:
    """The container's args with the socket path replaced, plus --kubeconfig and (for --leader-election, whose
    namespace defaults to the pod's) --leader-election-namespace. Nothing else is added or removed."""
    args = [f"--csi-address={socket}" if a.startswith("--csi-address=") else a for a in container.args]
    args.append(f"--kubeconfig={kubeconfig}")
    if "--leader-election" in args and not any(a.startswith("--leader-election-namespace") for a in args):
        args.append(f"--leader-election-namespace={namespace}")
    return args


def pod_env(container: Container, pod: str, namespace: str) -> dict[str, str]:
    """The downward-API variables the manifest asks for, as the kubelet would fill them."""
    values = {"metadata.name": pod, "metadata.namespace": namespace}
    return {variable: values[path] for variable, path in container.field_env.items()}


def in_pod_uts(pod: str, argv: Sequence[str]) -> list[str]:
    """``argv`` in a new UTS namespace whose hostname is ``pod`` (needs root and util-linux unshare)."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "the k8s suite needs unshare (util-linux)"
    return [unshare, "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', pod, *argv]


@dataclass
class Replica:
    """One controller pod: the frontend and the three sidecars, killed together like a pod."""

    pod: str
    socket: Path
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    replaced: list[tuple[str, ServiceProcess]] = field(default_factory=list)  # restarted containers, for their logs
    exits: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def log(self, container: str) -> str:
        """The container's log, its restarted instances' included."""
        former = [p.log_text() for name, p in self.replaced if name == container]
        return "".join([*former, self.processes[container].log_text()])

    def log_tails(self, lines: int = 25) -> str:
        return "\n".join(p.log_tail(lines) for p in self.processes.values())

    async def kill(self) -> None:
        """kill -9 every container at once (the pod dies as a whole), then reap."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.process.kill()
        for process in self.processes.values():
            await process.kill()

    async def close(self) -> None:
        await self.exits.aclose()


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica shares: the cluster, the sidecars' identity and namespace, the frontend's settings."""

    cluster: Cluster
    kubeconfig: Path  # the ServiceAccount's
    namespace: str
    log_dir: Path
    frontend_env: Mapping[str, str]
    frontend_args: tuple[str, ...] = ()
    containers: Mapping[str, Container] = field(default_factory=lambda: manifest_containers(controller_deployment()))

    def sidecar_argv(self, name: str, socket: Path, extra: Sequence[str] = ()) -> list[str]:
        args = outside_pod_args(self.containers[name], socket=socket, kubeconfig=self.kubeconfig,
                                namespace=self.namespace)
        return [str(self.cluster.binary(name)), *args, *extra]


async def start_sidecar(config: ReplicaConfig, replica: Replica, name: str, extra: Sequence[str] = ()) -> None:
    """Start (or restart: the running instance is stopped first) one sidecar of the replica."""
    if name in replica.processes:
        await replica.processes[name].stop()
        replica.replaced.append((name, replica.processes.pop(name)))
    argv = in_pod_uts(replica.pod, config.sidecar_argv(name, replica.socket, extra))
    replica.processes[name] = await replica.exits.enter_async_context(service_process(
        argv, log_dir=config.log_dir, env=pod_env(config.containers[name], replica.pod, config.namespace),
        name=f"{replica.pod}-{name}", ready_line_regex=SIDECAR_READY, timeout_s=60))


async def start_replica(config: ReplicaConfig, pod: str, extra_args: Mapping[str, Sequence[str]] | None = None
                        ) -> Replica:
    """Start the frontend on ``<log_dir>/<pod>.sock``, then the sidecars against it (each ready once it
    competes for its lease). ``extra_args``: flags given ON TOP of the manifest's, per sidecar (a test says why)."""
    replica = Replica(pod, config.log_dir / f"{pod}.sock")
    try:
        # --kubeconfig: the pod's ServiceAccount, as in-cluster (WaitForFirstConsumer placement reads the claim)
        argv = [sys.executable, "-m", "services.csi_frontend", "--mode", "controller",
                "--endpoint", f"unix://{replica.socket}", "--kubeconfig", str(config.kubeconfig),
                *config.frontend_args]
        replica.processes[FRONTEND] = await replica.exits.enter_async_context(service_process(
            argv, log_dir=config.log_dir, env=config.frontend_env, name=f"{pod}-{FRONTEND}",
            ready=lambda: socket_answers(replica.socket), timeout_s=60))
        for name in SIDECARS:
            await start_sidecar(config, replica, name, (extra_args or {}).get(name, ()))
    except BaseException:
        await replica.close()
        raise
    return replica


