"""WaitForFirstConsumer, without the ``host`` topology key: place a new disk near the node its pod was scheduled to.

external-provisioner (``--extra-create-metadata``) passes the claim's name and namespace in CreateVolume's
parameters. When the controller can read the Kubernetes API, the claim's ``volume.kubernetes.io/selected-node``
annotation names the Node, that Node's CSINode entry for this driver holds its node id (the VM UUID), and XO says
on which host that VM runs: the term ``{pool, host}`` is put first in the preference order, so the disk lands on an
SR usable from that host (a local SR of it, or a shared one of the pool). Host keys are NOT reported by the nodes
for that: they make node-driver-registrar crash-loop once a VM live-migrates (LANDSCAPE §2.1).

A hint only: without API access, without the annotation (Immediate binding), or when a read fails, CreateVolume
places as before (a warning is logged for a failed read).
"""

from __future__ import annotations

from collections.abc import Mapping

from shared import placement
from shared.errors import DomainError
from shared.kube import KubeReader
from shared.logging import get_logger
from shared.xo.inventory import Inventory

log = get_logger(__name__)

PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
SELECTED_NODE = "volume.kubernetes.io/selected-node"


class SelectedNode:
    """``terms(parameters)``: the preferred topology term of the claim's selected node, or none."""

    def __init__(self, kube: KubeReader, inventory: Inventory, driver_name: str) -> None:
        self._kube = kube
        self._inventory = inventory
        self._driver = driver_name

    async def terms(self, parameters: Mapping[str, str]) -> list[dict[str, str]]:
        """``[{pool, host}]`` of the VM behind the claim's selected node; ``[]`` when anything is unknown."""
        namespace, name = parameters.get(PVC_NAMESPACE), parameters.get(PVC_NAME)
        if not (namespace and name):
            return []  # no --extra-create-metadata, or not a claim (csi-sanity, xocsi)
        try:
            return await self._terms(namespace, name)
        except DomainError as exc:
            log.warning("selected_node_unknown", pvc=f"{namespace}/{name}", error=exc.message,
                        note="placing without the selected node's host")
            return []

    async def _terms(self, namespace: str, name: str) -> list[dict[str, str]]:
        annotations = await self._kube.pvc_annotations(namespace, name)
        node_name = (annotations or {}).get(SELECTED_NODE)
        if not node_name:
            return []  # Immediate binding: no pod, no node to be near
        vm_id = await self._kube.csi_node_id(node_name, self._driver)
        vm = await self._inventory.vm(vm_id) if vm_id else None
        if vm is None or not vm.container or vm.container == vm.pool_id:
            log.info("selected_node_not_placed", pvc=f"{namespace}/{name}", node=node_name, vm=vm_id,
                     reason="no CSINode entry for the driver" if not vm_id else "VM not resident on a host")
            return []
        log.debug("selected_node_found", pvc=f"{namespace}/{name}", node=node_name, vm=vm_id, host=vm.container)
        return [placement.node_segments(vm.pool_id, vm.container, host_topology=True)]
