"""KubeReader: the few Kubernetes API reads the driver makes (a Node, a PVC, a CSINode), over lightkube's async
client. In a pod it uses the ServiceAccount (in-cluster config), else ``--kubeconfig`` or $KUBECONFIG.

The only place lightkube and its errors are seen: NotFound is None, anything else a domain error
(BackendUnavailable when the API server cannot be reached or answers 5xx/429, BackendFailure naming the RBAC
rule when it answers 401/403). Every read is bounded by ``timeout_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.resources.core_v1 import Node, PersistentVolumeClaim
from lightkube.resources.storage_v1 import CSINode

from shared.errors import BackendFailure, BackendUnavailable, InvalidRequest

DEFAULT_TIMEOUT_S = 10.0
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def in_cluster() -> bool:
    """True in a pod whose ServiceAccount token is mounted (in-cluster configuration available)."""
    return SERVICE_ACCOUNT_TOKEN.is_file()


@dataclass(frozen=True)
class NodeObject:
    """What the driver reads of a Node: its labels (set by the XO cloud controller manager) and providerID."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    provider_id: str = ""


class KubeReader:
    """Reads of the Kubernetes API; ``close()`` when done. Construct with ``from_config``."""

    def __init__(self, client: AsyncClient, *, source: str) -> None:
        self._client = client
        self.source = source  # where the configuration came from, for messages

    @classmethod
    def from_config(cls, kubeconfig: Path | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> KubeReader:
        """From ``kubeconfig``, else in-cluster (the pod's ServiceAccount), else $KUBECONFIG or ~/.kube/config.
        InvalidRequest when none is usable (no I/O happens before the first read)."""
        try:
            config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        except (ConfigError, OSError, ValueError) as exc:
            where = f"--kubeconfig {kubeconfig}" if kubeconfig else "the pod's ServiceAccount (in-cluster), $KUBECONFIG"
            raise InvalidRequest(f"no usable Kubernetes API configuration from {where}: {exc}") from exc
        client = AsyncClient(config=config, timeout=httpx.Timeout(timeout_s), trust_env=False)
        return cls(client, source=str(kubeconfig) if kubeconfig else "in-cluster or $KUBECONFIG")

    async def close(self) -> None:
        await self._client.close()

    async def node(self, name: str) -> NodeObject | None:
        """The Node ``name`` (RBAC: get nodes); None when it does not exist."""
        found = await self._get(Node, name, None, "get nodes")
        if found is None:
            return None
        meta, spec = found.metadata, found.spec
        return NodeObject(name=name, labels=dict(meta.labels or {}) if meta else {},
                          provider_id=(spec.providerID or "") if spec else "")

    async def pvc_annotations(self, namespace: str, name: str) -> dict[str, str] | None:
        """The annotations of PVC ``namespace/name`` (RBAC: get persistentvolumeclaims); None when absent."""
        found = await self._get(PersistentVolumeClaim, name, namespace, "get persistentvolumeclaims")
        if found is None:
            return None
        return dict(found.metadata.annotations or {}) if found.metadata else {}

    async def csi_node_id(self, node_name: str, driver: str) -> str | None:
        """The node id ``driver`` registered on Node ``node_name`` (its CSINode entry; RBAC: get csinodes); None
        when the CSINode or the driver's entry does not exist."""
        found = await self._get(CSINode, node_name, None, "get csinodes")
        drivers = found.spec.drivers if found is not None and found.spec is not None else []
        return next((entry.nodeID for entry in drivers or [] if entry.name == driver), None)

    async def _get(self, kind: Any, name: str, namespace: str | None, rbac: str) -> Any:
        what = f"{kind.__name__} {namespace + '/' if namespace else ''}{name}"
        try:
            return await self._client.get(kind, name=name, namespace=namespace)
        except httpx.HTTPStatusError as exc:  # lightkube's ApiError, or a non-JSON error page (a proxy's)
            code = exc.response.status_code
            if code == 404:
                return None
            said = exc.status.message if isinstance(exc, ApiError) else exc.response.reason_phrase
            if code in (401, 403):
                raise BackendFailure(f"the Kubernetes API refused to read {what} ({code}: {said}); "
                                     f"the ServiceAccount needs RBAC `{rbac}`") from exc
            raise BackendUnavailable(f"the Kubernetes API answered {code} reading {what}; retry") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"the Kubernetes API ({self.source}) cannot be reached reading {what}: "
                                     f"{type(exc).__name__}") from exc
