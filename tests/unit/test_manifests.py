"""k8s/: every document validates offline against the Kubernetes API schema (kubernetes-validate, strict, the
oldest supported and the newest shipped Kubernetes); KEDA and kustomize documents are checked by hand; and the
manifests agree with the code: driver name, argparse flags, StorageClass parameters, queue name, timeouts,
shutdown grace, mount propagation and least-privilege RBAC.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.csi_frontend.settings import DEFAULT_DRIVER_NAME
from shared import messages, storage_class

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ("base", "brokers", "brokers-ha", "keda")
OLDEST_KUBERNETES = "1.34"  # csi-provisioner v6 needs it (docs/deploy.md); kubernetes-validate adds its newest below
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
KEDA_API = "keda.sh/v1alpha1"
RABBITMQ_OPERATOR_API = "rabbitmq.com/v1beta1"  # checked against its CRD by test_manifests_ha.py
CRD_APIS = (KEDA_API, RABBITMQ_OPERATOR_API)
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"
MIN_ATTACHER_TIMEOUT_S = 120.0
KUBELET_DIR = "/var/lib/kubelet"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")

Doc = dict[str, Any]


# -- loading -------------------------------------------------------------------------------------------------


def _load(path: Path) -> list[Doc]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"
    return docs


def _all_documents() -> list[tuple[str, Doc]]:
    found = []
    for path in sorted(K8S.rglob("*.y*ml")):
        for index, doc in enumerate(_load(path)):
            name = doc.get("metadata", {}).get("name", "")
            found.append((f"{path.relative_to(K8S)}#{index} {doc.get('kind')}/{name}", doc))
    assert found, "k8s/ holds no manifests"
    return found


ALL_DOCUMENTS = _all_documents()
KUBERNETES_DOCUMENTS = [
    (label, doc) for label, doc in ALL_DOCUMENTS
    if doc.get("apiVersion") not in (KUSTOMIZE_API, *CRD_APIS)
]


def _find(kind: str, name: str | None = None) -> Doc:
    matches = [doc for _, doc in ALL_DOCUMENTS
               if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected exactly one {kind} {name or ''} under k8s/, found {len(matches)}"
    return matches[0]


def _all(kind: str) -> list[Doc]:
    return [doc for _, doc in ALL_DOCUMENTS if doc.get("kind") == kind]


def _containers(workload: Doc) -> dict[str, Doc]:
    return {container["name"]: container for container in workload["spec"]["template"]["spec"]["containers"]}


def _flags(container: Doc) -> dict[str, str]:
    """``--name=value`` / ``--name`` arguments as {name: value} ("" for a bare flag)."""
    flags = {}
    for arg in container.get("args", []):
        if arg.startswith("-"):
            name, _, value = arg.lstrip("-").partition("=")
            flags[name] = value
    return flags


def _sidecar(workload: Doc, image_name: str) -> Doc:
    matches = [c for c in _containers(workload).values() if c["image"].startswith(SIDECAR_REGISTRY + image_name + ":")]
    assert len(matches) == 1, f"{workload['metadata']['name']}: expected one {image_name} container"
    return matches[0]


def _duration_s(text: str) -> float:
    parts = _DURATION_PART.findall(text)
    assert parts and "".join(number + unit for number, unit in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * _DURATION_UNITS_S[unit] for number, unit in parts)


def _console_scripts() -> dict[str, str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert isinstance(scripts, dict)
    return scripts


def _our_containers() -> Iterator[tuple[str, Doc, Doc]]:
    """(label, workload, container) for every container that runs one of this project's console scripts."""
    scripts = _console_scripts()
    for workload in (doc for kind in _WORKLOAD_KINDS for doc in _all(kind)):
        for container in _containers(workload).values():
            command = container.get("command", [])
            if command and command[0] in scripts:
                yield f"{workload['metadata']['name']}/{container['name']}", workload, container


# -- schemas ------------------------------------------------------------------------------------------------


def _kubernetes_versions() -> tuple[str, ...]:
    utils = pytest.importorskip("kubernetes_validate.utils",
                                reason="kubernetes-validate is a dev dependency (pyproject [dev])")
    newest = ".".join(utils.latest_version().split(".")[:2])
    return (OLDEST_KUBERNETES, newest) if newest != OLDEST_KUBERNETES else (OLDEST_KUBERNETES,)


@pytest.mark.parametrize(("label", "doc"), KUBERNETES_DOCUMENTS, ids=[label for label, _ in KUBERNETES_DOCUMENTS])
def test_document_matches_the_kubernetes_schema(label: str, doc: Doc) -> None:
    """Strict: an unknown or misplaced field fails (kubectl would only warn, or drop it)."""
    versions = _kubernetes_versions()
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{label} vs Kubernetes {version}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{label}: {exc.message} (a CRD? check it by hand in this file)")


def _kustomization_dirs() -> list[Path]:
    return [path.parent for path in sorted(K8S.rglob("kustomization.yaml"))]


def test_kustomizations_are_the_expected_ones() -> None:
    assert [path.relative_to(K8S).as_posix() for path in _kustomization_dirs()] == sorted(KUSTOMIZATIONS)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomization_lists_every_manifest_of_its_directory(directory: str) -> None:
    """Not in the kubernetes schema: checked by hand. Example Secrets (*.example.yaml) stay out on purpose."""
    folder = K8S / directory
    (kustomization,) = _load(folder / "kustomization.yaml")
    assert kustomization["apiVersion"] == KUSTOMIZE_API and kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "images", "labels"}
    assert kustomization["namespace"] == "xo-csi"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for resource in resources:
        assert (folder / resource).is_file(), f"{directory}/kustomization.yaml lists a missing {resource}"
    manifests = {path.name for path in folder.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {name for name in manifests if name.endswith(".example.yaml")}
    assert set(resources) == manifests - examples, f"{directory}: list every manifest (examples excepted)"
    for image in kustomization.get("images", []):
        assert set(image) <= {"name", "newName", "newTag", "digest"} and image.get("name")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomize_build_renders_valid_manifests(directory: str) -> None:
    """`kubectl kustomize` (what `kubectl apply -k` runs), where kubectl exists; its output validates too."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the per-file checks above still ran")
    result = subprocess.run([kubectl, "kustomize", str(K8S / directory)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert rendered
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in rendered:
        if doc["apiVersion"] in CRD_APIS:
            continue
        kubernetes_validate.validate(doc, OLDEST_KUBERNETES, strict=True)
        cluster_scoped = doc["kind"] in {"Namespace", "CSIDriver", "ClusterRole", "ClusterRoleBinding",
                                         "StorageClass"}
        assert cluster_scoped or doc["metadata"].get("namespace") == "xo-csi", doc["metadata"]["name"]


def test_keda_resources_have_their_required_fields() -> None:
    """KEDA's CRDs are not in the core schema: the fields KEDA requires, by hand."""
    scaled = _find("ScaledObject")
    auth = _find("TriggerAuthentication")
    for doc in (scaled, auth):
        assert doc["apiVersion"] == KEDA_API and doc["metadata"]["namespace"] == "xo-csi"
    assert scaled["spec"]["scaleTargetRef"]["name"]
    assert scaled["spec"]["triggers"], "a ScaledObject needs at least one trigger"
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] and isinstance(trigger["metadata"], dict)
        assert all(isinstance(value, str) for value in trigger["metadata"].values()), "trigger metadata: strings"
    assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["parameter"] and ref["name"] and ref["key"]


def test_keda_scales_on_waiting_plus_running_jobs() -> None:
    scaled = _find("ScaledObject")
    triggers = {trigger["name"]: trigger for trigger in scaled["spec"]["triggers"]}
    assert triggers["waiting"]["type"] == "rabbitmq"
    assert triggers["waiting"]["metadata"]["queueName"] == messages.JOBS_QUEUE
    assert triggers["running"]["type"] == "prometheus"
    assert "xocsi_migration_jobs_running" in triggers["running"]["metadata"]["query"]
    assert scaled["spec"]["advanced"]["scalingModifiers"]["formula"] == "waiting + running"
    migrator = _containers(_find("Deployment", "xo-csi-migrator"))["migrator"]
    assert scaled["spec"]["advanced"]["scalingModifiers"]["target"] == _flags(migrator)["concurrency"]
    port = _flags(migrator)["metrics-port"]
    pod = _find("Deployment", "xo-csi-migrator")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == port


def test_controller_readiness_is_readyz_on_its_metrics_port_and_liveness_the_csi_probe() -> None:
    frontend = _containers(_find("Deployment", "xo-csi-controller"))["xo-csi-frontend"]
    ports = {port["name"]: port["containerPort"] for port in frontend["ports"]}
    assert ports["http-metrics"] == int(_flags(frontend)["metrics-port"])
    assert frontend["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert frontend["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}  # the sidecar: Probe


# -- the manifests agree with the code ---------------------------------------------------------------------


def test_driver_name_matches_the_code() -> None:
    assert _find("CSIDriver")["metadata"]["name"] == DEFAULT_DRIVER_NAME
    for storage in _all("StorageClass"):
        assert storage["provisioner"] == DEFAULT_DRIVER_NAME, storage["metadata"]["name"]
    node = _find("DaemonSet", "xo-csi-node")
    registrar = _flags(_sidecar(node, "csi-node-driver-registrar"))
    plugin_dir = f"{KUBELET_DIR}/plugins/{DEFAULT_DRIVER_NAME}"
    assert registrar["kubelet-registration-path"] == f"{plugin_dir}/csi.sock"
    volumes = {volume["name"]: volume for volume in node["spec"]["template"]["spec"]["volumes"]}
    assert volumes["socket-dir"]["hostPath"]["path"].rstrip("/") == plugin_dir


def test_csidriver_declares_what_the_driver_does() -> None:
    spec = _find("CSIDriver")["spec"]
    assert spec == {"attachRequired": True, "podInfoOnMount": False, "storageCapacity": True,
                    "fsGroupPolicy": "File", "volumeLifecycleModes": ["Persistent"]}


def test_our_containers_run_console_scripts_with_flags_their_parser_knows() -> None:
    scripts = _console_scripts()
    seen = set()
    for label, _, container in _our_containers():
        program = container["command"][0]
        seen.add(program)
        parser = importlib.import_module(scripts[program].split(":")[0]).build_parser()
        try:
            _, unknown = parser.parse_known_args(container.get("args", []))
        except SystemExit:
            pytest.fail(f"{label}: {program} {container.get('args')} is refused by its parser")
        assert not unknown, f"{label}: {program} has no option {unknown}"
    assert seen == {"xo-csi-frontend", "xo-csi-migrator"}


def test_frontend_modes_and_endpoints() -> None:
    modes = {}
    for label, _, container in _our_containers():
        flags = _flags(container)
        if container["command"][0] == "xo-csi-frontend":
            modes[label] = flags["mode"]
            assert flags["endpoint"] == "unix:///csi/csi.sock", label
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            assert mounts["/csi"] == "socket-dir", f"{label}: the sidecars find the socket in /csi"
    assert sorted(modes.values()) == ["controller", "node"]


def test_sidecar_timeouts_fit_migrations() -> None:
    """ControllerPublishVolume may wait for a disk migration until just before the attacher's deadline."""
    controller = _find("Deployment", "xo-csi-controller")
    attacher = _flags(_sidecar(controller, "csi-attacher"))
    assert _duration_s(attacher["timeout"]) >= MIN_ATTACHER_TIMEOUT_S
    assert _duration_s(attacher["retry-interval-max"]) <= 60, "a migration longer than --timeout: rejoin soon"
    provisioner = _flags(_sidecar(controller, "csi-provisioner"))
    assert _duration_s(provisioner["timeout"]) >= 120, "CreateVolume: avoid the Go driver's disk leakage"
    resizer = _flags(_sidecar(controller, "csi-resizer"))
    assert _duration_s(resizer["timeout"]) >= 60


def test_controller_sidecars_elect_a_leader() -> None:
    controller = _find("Deployment", "xo-csi-controller")
    assert controller["spec"]["replicas"] >= 2
    for image in ("csi-provisioner", "csi-attacher", "csi-resizer"):
        assert "leader-election" in _flags(_sidecar(controller, image)), image


def test_provisioner_tracks_topology_and_capacity() -> None:
    controller = _find("Deployment", "xo-csi-controller")
    provisioner = _sidecar(controller, "csi-provisioner")
    flags = _flags(provisioner)
    # Topology is GA and on by default since external-provisioner v5: the gate must not be turned off (setting it
    # on only earns a "will be removed" warning); tests/k8s proves CreateVolume gets its topology without it
    assert "Topology=false" not in flags.get("feature-gates", ""), "WaitForFirstConsumer needs the topology"
    assert "enable-capacity" in flags and "extra-create-metadata" in flags
    assert flags["capacity-ownerref-level"] == "2", "Pod -> ReplicaSet -> Deployment owns the capacity objects"
    assert flags["default-fstype"] in storage_class.FS_TYPES
    env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in provisioner["env"]}
    assert env == {"POD_NAME": "metadata.name", "NAMESPACE": "metadata.namespace"}


def test_migrator_grace_is_shorter_than_the_termination_grace_period() -> None:
    migrator = _find("Deployment", "xo-csi-migrator")
    (container,) = _containers(migrator).values()
    grace_s = float(_flags(container)["grace"])
    assert grace_s < migrator["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_migrator_probes_use_its_health_port() -> None:
    migrator = _find("Deployment", "xo-csi-migrator")
    (container,) = _containers(migrator).values()
    port = int(_flags(container)["health-port"])
    ports = {item["name"]: item["containerPort"] for item in container["ports"]}
    assert ports[container["livenessProbe"]["httpGet"]["port"]] == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_node_plugin_mounts_kubelet_dir_with_bidirectional_propagation() -> None:
    node = _find("DaemonSet", "xo-csi-node")
    volumes = {volume["name"]: volume for volume in node["spec"]["template"]["spec"]["volumes"]}
    plugin = _containers(node)["xo-csi-frontend"]
    assert plugin["securityContext"]["privileged"] is True, "Bidirectional propagation needs privileged"
    mounts = {volumes[mount["name"]]["hostPath"]["path"].rstrip("/"): mount
              for mount in plugin["volumeMounts"] if "hostPath" in volumes[mount["name"]]}
    assert mounts[KUBELET_DIR]["mountPath"] == KUBELET_DIR
    assert mounts[KUBELET_DIR]["mountPropagation"] == "Bidirectional"
    assert mounts["/dev"]["mountPath"] == "/dev", "attached disks appear in /dev after the container started"
    assert mounts["/sys"]["mountPath"] == "/sys", "the node id is /sys/class/dmi/id/product_uuid"
    for name, container in _containers(node).items():
        if name != "xo-csi-frontend":
            for mount in container.get("volumeMounts", []):
                assert "mountPropagation" not in mount, f"{name}: only the plugin propagates mounts"


def test_sidecar_images_are_pinned_sig_storage_releases() -> None:
    for workload in (doc for kind in _WORKLOAD_KINDS for doc in _all(kind)):
        for container in _containers(workload).values():
            image = container["image"]
            if image == "xo-csi":
                continue  # ours: the tag comes from k8s/base/kustomization.yaml images
            name, _, tag = image.rpartition(":")
            assert name and re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-management)?", tag), f"pin {image} to a release"
            if container["name"] in ("csi-provisioner", "csi-attacher", "csi-resizer", "node-driver-registrar",
                                     "liveness-probe"):
                assert name.startswith(SIDECAR_REGISTRY), image


def test_storageclass_examples_are_accepted_by_the_driver() -> None:
    classes = {storage["metadata"]["name"]: storage for storage in _all("StorageClass")}
    assert set(classes) == {"xoa-migrating", "xoa-shared", "xoa-fixed"}
    parsed = {name: storage_class.parse(storage["parameters"]) for name, storage in classes.items()}
    assert parsed["xoa-migrating"].migrating and parsed["xoa-migrating"].srs_with_tag == "k8s-migrating"
    assert classes["xoa-migrating"]["volumeBindingMode"] == "WaitForFirstConsumer"
    assert classes["xoa-migrating"]["allowVolumeExpansion"] is True
    assert parsed["xoa-shared"].srs_with_tag == "k8s-shared" and not parsed["xoa-shared"].migrating
    assert classes["xoa-shared"]["volumeBindingMode"] == "Immediate"
    assert parsed["xoa-fixed"].sr_uuid and not parsed["xoa-fixed"].migrating


def test_keda_scales_the_migrator_on_the_jobs_queue() -> None:
    scaled = _find("ScaledObject")
    migrator = _find("Deployment", "xo-csi-migrator")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", migrator["metadata"]["name"])
    (trigger,) = [trigger for trigger in scaled["spec"]["triggers"] if trigger["type"] == "rabbitmq"]
    assert trigger["metadata"]["queueName"] == messages.JOBS_QUEUE
    assert trigger["metadata"]["mode"] == "QueueLength"
    (container,) = _containers(migrator).values()
    assert trigger["metadata"]["value"] == "1", "the formula's input: one per waiting job"
    assert trigger["authenticationRef"]["name"] == _find("TriggerAuthentication")["metadata"]["name"]
    budget = _find("PodDisruptionBudget", migrator["metadata"]["name"])
    assert scaled["spec"]["minReplicaCount"] >= budget["spec"]["minAvailable"] >= 1


# -- secrets and RBAC --------------------------------------------------------------------------------------


def _secret_keys() -> dict[str, set[str]]:
    return {secret["metadata"]["name"]: set(secret["stringData"]) for secret in _all("Secret")}


def test_example_secrets_use_the_go_drivers_keys() -> None:
    keys = _secret_keys()
    assert keys["xo-csi-credentials"] == {"XOA_URL", "XOA_TOKEN", "XOA_USERNAME", "XOA_PASSWORD"}
    assert keys["xo-csi-brokers"] == {"AMQP_URL", "REDIS_URL"}
    for path in K8S.rglob("*.yaml"):
        is_example = path.name.endswith(".example.yaml")
        assert is_example == any(doc["kind"] == "Secret" for doc in _load(path)), f"{path}: Secrets only in examples"


def _secret_references(node: Any) -> Iterator[tuple[str, str | None]]:
    """(secret name, key or None for a whole-Secret envFrom) anywhere below ``node``."""
    if isinstance(node, dict):
        if "secretRef" in node:
            yield node["secretRef"]["name"], None
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
        for value in node.values():
            yield from _secret_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _secret_references(item)


def test_every_referenced_secret_has_an_example() -> None:
    keys = _secret_keys()
    references = list(_secret_references([doc for _, doc in ALL_DOCUMENTS if doc["kind"] != "Secret"]))
    assert references
    for name, key in references:
        assert name in keys, f"Secret {name} is referenced but no *.example.yaml shows it"
        assert key is None or key in keys[name], f"Secret {name} has no key {key} in its example"
    auth = _find("TriggerAuthentication")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in keys[ref["name"]]


def _rules_of(service_account: str) -> list[Doc]:
    """Every rule granted to the ServiceAccount through (Cluster)RoleBindings."""
    rules = []
    for binding in _all("ClusterRoleBinding") + _all("RoleBinding"):
        if any(s["kind"] == "ServiceAccount" and s["name"] == service_account for s in binding["subjects"]):
            role = _find(binding["roleRef"]["kind"], binding["roleRef"]["name"])
            rules.extend(role["rules"])
    return rules


def _granted(rules: list[Doc]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_controller_rbac_covers_the_sidecars() -> None:
    granted = _granted(_rules_of("xo-csi-controller"))
    needed = {
        ("", "persistentvolumes", "create"), ("", "persistentvolumes", "delete"), ("", "persistentvolumes", "patch"),
        ("", "persistentvolumeclaims", "update"), ("", "persistentvolumeclaims/status", "patch"),
        ("storage.k8s.io", "storageclasses", "watch"), ("storage.k8s.io", "csinodes", "watch"),
        ("", "nodes", "watch"), ("storage.k8s.io", "volumeattachments", "patch"),
        ("storage.k8s.io", "volumeattachments/status", "patch"), ("", "events", "create"),
        ("storage.k8s.io", "csistoragecapacities", "create"), ("coordination.k8s.io", "leases", "update"),
        ("", "pods", "get"), ("apps", "replicasets", "get"),
        # the frontend's WaitForFirstConsumer placement (selected_node.py)
        ("", "persistentvolumeclaims", "get"), ("", "nodes", "get"), ("storage.k8s.io", "csinodes", "get"),
    }
    assert needed - granted == set()
    own = _granted(_find("ClusterRole", "xo-csi-controller-frontend")["rules"])
    assert own == {("", "persistentvolumeclaims", "get"), ("", "nodes", "get"), ("storage.k8s.io", "csinodes", "get")}


def test_rbac_is_least_privilege() -> None:
    for role in _all("ClusterRole") + _all("Role"):
        for rule in role["rules"]:
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], role["metadata"]["name"]
            assert "secrets" not in rule["resources"], "no StorageClass uses CSI secrets"
    # leader election, capacity objects and owner lookups stay in the driver's namespace
    namespaced = _granted(_find("Role", "xo-csi-controller")["rules"])
    cluster = _granted([rule for role in _all("ClusterRole") for rule in role["rules"]])
    for resource in ("leases", "csistoragecapacities", "pods", "replicasets"):
        assert not any(granted[1] == resource for granted in cluster), f"{resource}: namespaced Role only"
        assert any(granted[1] == resource for granted in namespaced), resource


@pytest.mark.parametrize(("account", "workload"), [("xo-csi-migrator", "xo-csi-migrator")])
def test_services_without_kubernetes_api_access_get_no_token(account: str, workload: str) -> None:
    assert _find("ServiceAccount", account)["automountServiceAccountToken"] is False
    assert _rules_of(account) == [], f"{account} is bound to a role"
    (pod,) = [doc["spec"]["template"]["spec"] for kind in _WORKLOAD_KINDS for doc in _all(kind)
              if doc["metadata"]["name"] == workload]
    assert pod["serviceAccountName"] == account and pod["automountServiceAccountToken"] is False


def test_node_plugin_gets_its_node_name_and_may_only_get_nodes_and_no_xo_secret() -> None:
    node = _find("DaemonSet", "xo-csi-node")
    pod = node["spec"]["template"]["spec"]
    plugin = _containers(node)["xo-csi-frontend"]
    env = {item["name"]: item for item in plugin["env"]}
    assert env["CSI_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert list(_secret_references(node)) == [], "node plugins need no XO credentials (node-metadata=kubernetes)"
    assert "--node-metadata=xo" not in plugin["args"]
    assert pod["serviceAccountName"] == "xo-csi-node" and pod["automountServiceAccountToken"] is True
    assert _granted(_rules_of("xo-csi-node")) == {("", "nodes", "get")}


def test_only_the_node_plugin_is_privileged_or_root() -> None:
    for label, workload, container in _our_containers():
        context = {**workload["spec"]["template"]["spec"].get("securityContext", {}),
                   **container.get("securityContext", {})}
        if workload["kind"] == "DaemonSet":
            assert context["privileged"] is True and context["runAsUser"] == 0, label
        else:
            assert context.get("runAsNonRoot") is True and not context.get("privileged"), label
            assert context.get("allowPrivilegeEscalation") is False, label
