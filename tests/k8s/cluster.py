"""The control plane for the k8s suite: find the team's binaries (../shared/tools/k8s or $XOCSI_K8S_TOOLS), unpack
them once into a checksum-keyed cache, start etcd + kube-apiserver + kube-controller-manager with up.sh and stop
them with down.sh --purge; talk to the API server with kubectl, as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TOOLS_ENV = "XOCSI_K8S_TOOLS"
REPO = Path(__file__).resolve().parents[2]
KUBECTL_TIMEOUT_S = 60.0
Obj = dict[str, Any]


class KubectlError(RuntimeError):
    """kubectl exited non-zero; ``stderr`` says why (NotFound, Forbidden ...)."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"kubectl {' '.join(args)} exited with {returncode}: {stderr.strip()}")
        self.stderr = stderr

    @property
    def is_not_found(self) -> bool:
        return "NotFound" in self.stderr or "not found" in self.stderr


def tools_dir() -> Path | None:
    """Where unpack.sh/up.sh/down.sh live: $XOCSI_K8S_TOOLS, else ../shared/tools/k8s beside the repository
    (for a git worktree, beside its main checkout too). None when absent."""
    if os.environ.get(TOOLS_ENV):
        path = Path(os.environ[TOOLS_ENV])
        return path if (path / "up.sh").is_file() else None
    for root in (REPO, _main_checkout(REPO)):
        if root is not None and (root.parent / "shared/tools/k8s/up.sh").is_file():
            return root.parent / "shared/tools/k8s"
    return None


def _main_checkout(repo: Path) -> Path | None:
    """The main working tree of a linked worktree (its .git is a file "gitdir: <main>/.git/worktrees/<name>")."""
    git = repo / ".git"
    if not git.is_file():
        return None
    gitdir = Path(git.read_text().removeprefix("gitdir:").strip())
    return gitdir.parents[2] if gitdir.parent.name == "worktrees" else None


def unpack(tools: Path) -> tuple[Path, float]:
    """The directory holding the binaries (unpack.sh caches by checksum) and the seconds it took."""
    started = time.monotonic()
    done = subprocess.run([str(tools / "unpack.sh")], capture_output=True, text=True, check=True, timeout=600)
    return Path(done.stdout.strip().splitlines()[-1]), time.monotonic() - started


@dataclass(frozen=True)
class Cluster:
    """A running control plane. The kubeconfig is the admin's (system:masters): the harness creates what the
    scheduler, kubelet and attach-detach controller would; the sidecars get a ServiceAccount token instead."""

    bin_dir: Path
    kubeconfig: Path
    state_dir: Path
    server: str
    ca_file: Path

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    async def kubectl(self, *args: str, stdin: str | None = None, kubeconfig: Path | None = None,
                      timeout_s: float = KUBECTL_TIMEOUT_S) -> str:
        """Run kubectl with this cluster's (or ``kubeconfig``'s) identity; stdout, or KubectlError."""
        process = await asyncio.create_subprocess_exec(
            str(self.binary("kubectl")), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await process.communicate(stdin.encode() if stdin is not None else None)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            raise KubectlError(args, process.returncode or 0, err.decode(errors="replace"))
        return out.decode()

    async def apply(self, *documents: Obj | str) -> None:
        """kubectl apply -f - of objects (dicts) and/or YAML texts."""
        text = "\n---\n".join(d if isinstance(d, str) else yaml.safe_dump(d) for d in documents)
        await self.kubectl("apply", "-f", "-", stdin=text)

    async def create(self, document: Obj) -> Obj:
        return dict(json.loads(await self.kubectl("create", "-o", "json", "-f", "-", stdin=json.dumps(document))))

    async def get(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        return dict(json.loads(await self.kubectl("get", kind, name, "-o", "json", *_ns(namespace))))

    async def find(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        """The object, or None when the API server says NotFound."""
        try:
            return await self.get(kind, name, namespace)
        except KubectlError as exc:
            if exc.is_not_found:
                return None
            raise

    async def list(self, kind: str, namespace: str | None = None, selector: str | None = None) -> list[Obj]:
        args = ["get", kind, "-o", "json", *_ns(namespace), *(["-l", selector] if selector else [])]
        return list(json.loads(await self.kubectl(*args))["items"])

    async def delete(self, kind: str, name: str, namespace: str | None = None, *, wait: bool = False) -> None:
        await self.kubectl("delete", kind, name, "--ignore-not-found", f"--wait={str(wait).lower()}", *_ns(namespace))

    async def patch(self, kind: str, name: str, patch: Obj, namespace: str | None = None,
                    subresource: str | None = None) -> Obj:
        args = ["patch", kind, name, "--type=merge", "-p", json.dumps(patch), "-o", "json", *_ns(namespace)]
        if subresource:
            args.append(f"--subresource={subresource}")
        return dict(json.loads(await self.kubectl(*args)))

    async def events(self, namespace: str, involved_name: str) -> list[Obj]:
        """Events about one object, oldest first (kubectl get events --field-selector involvedObject.name=...)."""
        items = await self.kubectl("get", "events", "-n", namespace, "-o", "json",
                                   f"--field-selector=involvedObject.name={involved_name}")
        return sorted(json.loads(items)["items"], key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    async def token_kubeconfig(self, namespace: str, service_account: str, path: Path) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount (a TokenRequest token), so that RBAC applies."""
        token = (await self.kubectl("create", "token", service_account, "-n", namespace, "--duration=24h")).strip()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "local", "cluster": {"server": self.server,
                                                       "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "local", "user": service_account,
                                                    "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path


def _ns(namespace: str | None) -> list[str]:
    return ["-n", namespace] if namespace else []


@contextlib.contextmanager
def running_cluster(tools: Path, bin_dir: Path) -> Iterator[Cluster]:
    """up.sh (etcd, kube-apiserver, kube-controller-manager with the PV controllers) ... down.sh --purge."""
    env = {**os.environ, "K8S_BIN_DIR": str(bin_dir), "K8S_KCM": "1"}
    done = subprocess.run([str(tools / "up.sh")], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"up.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    kubeconfig = Path(done.stdout.strip().splitlines()[-1])
    state = Path(kubeconfig.read_text().splitlines()[0].removeprefix("# k8s-state-dir:").strip())
    try:
        values = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)
        yield Cluster(bin_dir, kubeconfig, state, values["K8S_APISERVER"], Path(values["K8S_CA"]))
    finally:
        subprocess.run([str(tools / "down.sh"), "--purge", str(kubeconfig)], capture_output=True, timeout=120,
                       check=False)
