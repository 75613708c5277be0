"""k8s/brokers-ha: the RabbitmqCluster validates against the RabbitMQ Cluster Operator's own CRD schema (vendored in
tests/unit/schemas/, made strict: an unknown or misplaced field fails, as it would with kubectl --validate=strict);
both brokers are laid out to survive the loss of one node; the Redis start scripts parse; and they use the names
the services are told (REDIS_SENTINEL_MASTER, ports, the password Secret). The plain Kubernetes documents are
validated with the others in test_manifests.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dev.ha import SENTINEL_MASTER

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).parent / "schemas" / "rabbitmqcluster-v1beta1.json"
RABBITMQ_OPERATOR_API = "rabbitmq.com/v1beta1"
Doc = dict[str, Any]


def _documents(folder: str) -> list[Doc]:
    return [doc for path in sorted((ROOT / "k8s" / folder).glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(kind: str, name: str, folder: str = "brokers-ha") -> Doc:
    found = [doc for doc in _documents(folder) if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in k8s/{folder}"
    return found[0]


def _strict(node: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its properties and does not
    keep unknown fields (Kubernetes prunes those fields; kubectl --validate=strict reports them)."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    strict = {key: _strict(value) for key, value in node.items() if key != "$comment"}
    if ("properties" in strict and "additionalProperties" not in strict
            and not strict.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


def _schema_errors(doc: Doc) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency (pyproject [dev])")
    validator = jsonschema.Draft7Validator(_strict(json.loads(SCHEMA.read_text())))
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(doc)]


def test_the_rabbitmq_cluster_matches_the_operators_crd() -> None:
    cluster = _one("RabbitmqCluster", "xo-csi-rabbitmq")
    assert cluster["apiVersion"] == RABBITMQ_OPERATOR_API
    assert _schema_errors(cluster) == []


def test_the_crd_check_catches_a_misspelt_or_mistyped_field() -> None:
    cluster = _one("RabbitmqCluster", "xo-csi-rabbitmq")
    assert _schema_errors({**cluster, "spec": {**cluster["spec"], "replica": 3}}) == [
        "spec: Additional properties are not allowed ('replica' was unexpected)"]
    assert _schema_errors({**cluster, "spec": {**cluster["spec"], "replicas": "3"}}) == [
        "spec.replicas: '3' is not of type 'integer'"]


def test_the_rabbitmq_cluster_keeps_a_quorum_through_the_loss_of_one_node() -> None:
    cluster = _one("RabbitmqCluster", "xo-csi-rabbitmq")
    spec = cluster["spec"]
    assert spec["replicas"] == 3
    pods = {"app.kubernetes.io/name": cluster["metadata"]["name"]}  # how the operator labels the cluster's pods
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert (term["topologyKey"], term["labelSelector"]) == ("kubernetes.io/hostname", {"matchLabels": pods})
    budget = _one("PodDisruptionBudget", "xo-csi-rabbitmq")["spec"]
    assert (budget["maxUnavailable"], budget["selector"]) == (1, {"matchLabels": pods})
    (container,) = _one("StatefulSet", "xo-csi-rabbitmq", "brokers")["spec"]["template"]["spec"]["containers"]
    assert spec["image"] == container["image"], "the same RabbitMQ series as k8s/brokers"


def _scripts() -> dict[str, str]:
    return dict(_one("ConfigMap", "xo-csi-redis-ha")["data"])


@pytest.mark.parametrize("script", ["common.sh", "redis.sh", "sentinel.sh"])
def test_the_redis_scripts_parse(script: str, tmp_path: Path) -> None:
    shell = shutil.which("dash") or shutil.which("sh")
    assert shell is not None
    path = tmp_path / script
    path.write_text(_scripts()[script])
    result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_redis_sentinel_watches_the_primary_the_services_ask_for() -> None:
    scripts = _scripts()
    assert re.search(rf"^MASTER_NAME={SENTINEL_MASTER}\b", scripts["common.sh"], re.MULTILINE)
    monitor = re.search(r'"sentinel monitor \$\{MASTER_NAME\} \$\{PRIMARY\} 6379 (\d+)"', scripts["sentinel.sh"])
    assert monitor is not None
    workload = _one("StatefulSet", "xo-csi-redis-ha")
    replicas = workload["spec"]["replicas"]
    assert (replicas, int(monitor.group(1))) == (3, 2), "three sentinels, a majority of them to fail over"
    service = _one("Service", workload["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert {port["name"]: port["port"] for port in service["spec"]["ports"]} == {"redis": 6379, "sentinel": 26379}
    containers = {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}
    assert {name: c["command"] for name, c in containers.items()} == {
        "redis": ["sh", "/scripts/redis.sh"], "sentinel": ["sh", "/scripts/sentinel.sh"]}
    for container in containers.values():
        secrets = {env["name"]: env["valueFrom"]["secretKeyRef"] for env in container["env"]}
        assert secrets == {name: {"name": "xo-csi-redis", "key": "password"}
                           for name in ("REDIS_PASSWORD", "REDISCLI_AUTH")}
    budget = _one("PodDisruptionBudget", "xo-csi-redis-ha")["spec"]
    assert (budget["maxUnavailable"], budget["selector"]) == (1, workload["spec"]["selector"])


def test_the_overlay_is_listed_in_the_docs() -> None:
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "kubectl apply -k k8s/brokers-ha" in deploy
    assert f"REDIS_SENTINEL_MASTER={SENTINEL_MASTER}" in deploy
