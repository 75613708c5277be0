"""The sidecars run with exactly the args of k8s/base/controller.yaml: the harness may only point --csi-address at
the replica's socket and add what running outside a pod requires (--kubeconfig, --leader-election-namespace and
the downward-API variables). Needs no cluster: it checks the argv the k8s suite starts the sidecars with."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s.cluster import Cluster
from tests.k8s.sidecars import (
    OUTSIDE_POD_FLAGS,
    SIDECARS,
    ReplicaConfig,
    controller_deployment,
    manifest_containers,
    pod_env,
)

pytestmark = pytest.mark.k8s


def config(tmp_path: Path) -> ReplicaConfig:
    cluster = Cluster(tmp_path / "bin", tmp_path / "admin.kubeconfig", tmp_path, "https://127.0.0.1:6443",
                      tmp_path / "ca.crt")
    return ReplicaConfig(cluster, tmp_path / "sa.kubeconfig", "xo-csi", tmp_path, {})


@pytest.mark.parametrize("name", SIDECARS)
def test_sidecar_argv_is_the_manifests_plus_only_what_outside_a_pod_needs(tmp_path: Path, name: str) -> None:
    manifest = manifest_containers(controller_deployment())[name]
    socket = tmp_path / "xo-csi-controller-0.sock"
    binary, *args = config(tmp_path).sidecar_argv(name, socket)
    assert binary == str(tmp_path / "bin" / name)
    added = [a for a in args if a.split("=", 1)[0] in OUTSIDE_POD_FLAGS]
    kept = [a for a in args if a not in added]
    # same flags, same values, same order; only the socket path differs (the pod's emptyDir is /csi)
    assert kept == [f"--csi-address={socket}" if a == "--csi-address=/csi/csi.sock" else a for a in manifest.args]
    assert "--csi-address=/csi/csi.sock" in manifest.args
    # --leader-election-namespace only because the manifest leaves it to the pod's namespace
    assert added == [f"--kubeconfig={tmp_path / 'sa.kubeconfig'}", "--leader-election-namespace=xo-csi"]
    assert "--leader-election" in manifest.args
    assert not any(a.startswith("--leader-election-namespace") for a in manifest.args)


def test_only_the_downward_api_variables_of_the_manifest_are_set() -> None:
    containers = manifest_containers(controller_deployment())
    envs = {name: pod_env(containers[name], "xo-csi-controller-0", "xo-csi") for name in SIDECARS}
    assert envs == {"csi-provisioner": {"POD_NAME": "xo-csi-controller-0", "NAMESPACE": "xo-csi"},
                    "csi-attacher": {}, "csi-resizer": {}}


def test_extra_flags_are_only_given_on_top(tmp_path: Path) -> None:
    """A test that needs another flag (the reconcile period) appends it after the manifest's args."""
    plain = config(tmp_path).sidecar_argv("csi-attacher", tmp_path / "s.sock")
    extra = config(tmp_path).sidecar_argv("csi-attacher", tmp_path / "s.sock", ["--reconcile-sync=2s"])
    assert extra == [*plain, "--reconcile-sync=2s"]
