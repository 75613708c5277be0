"""The upstream conformance suite, kubernetes-csi/csi-test's csi-sanity, against the frontend as it runs in
production: one frontend in mode all (controller + the node plugin of node-a1), the XO simulator in real data mode
(loop devices, real mkfs and mounts), a migrator, RabbitMQ and Redis, all separate processes (dev/stack.py).

Run twice: on the shared SR (``srsWithTag: k8s-shared``) and on the local SRs of a migrating class
(``srsWithTag: k8s-migrating``, ``migrating: "true"``), where a volume created on host A2's SR must migrate
before node-a1 can attach it. Every spec must pass; the failing ones are printed by name. The binary is
``../shared/tools/csi-sanity`` beside the repository (or ``$CSI_SANITY``); without it the test skips, saying so.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from shared.units import GiB
from tests.support.brokers import RedisEndpoint
from tests.support.e2e import sim_stats, stack_on_session_brokers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
SANITY_NODE = "node-a1"
RUN_TIMEOUT_S = 780.0
CLASSES = {
    "shared": {"srsWithTag": "k8s-shared"},
    "migrating": {"srsWithTag": "k8s-migrating", "migrating": "true"},
}


def sanity_binary() -> Path | None:
    """``$CSI_SANITY``, else ``../shared/tools/csi-sanity`` relative to the repository root; None when absent."""
    path = Path(os.environ.get("CSI_SANITY") or REPO_ROOT.parent / "shared" / "tools" / "csi-sanity")
    return path if path.is_file() and os.access(path, os.X_OK) else None


@dataclass
class Report:
    """What csi-sanity's JUnit report says."""

    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_junit(path: Path) -> Report:
    report = Report()
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            report.failed.append(name)
        elif case.find("skipped") is not None:
            report.skipped.append(name)
        else:
            report.passed.append(name)
    return report


async def run_sanity(binary: Path, socket: Path, work: Path, parameters: dict[str, str]) -> tuple[Report, str]:
    params = work / "parameters.yaml"
    params.write_text(yaml.safe_dump(parameters))
    junit, log = work / "junit.xml", work / "csi-sanity.log"
    argv = [str(binary), "-csi.endpoint", f"unix://{socket}", "-csi.mountdir", str(work / "mnt"),
            "-csi.stagingdir", str(work / "stage"), "-csi.testvolumeparameters", str(params),
            "-csi.testvolumesize", str(GiB), "-csi.testvolumeexpandsize", str(2 * GiB),
            "-ginkgo.junit-report", str(junit), "-ginkgo.no-color"]
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=asyncio.subprocess.STDOUT,
                                                       stdin=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    assert junit.exists(), f"csi-sanity wrote no report (exit {process.returncode}):\n{tail}"
    return read_junit(junit), tail


@pytest.mark.parametrize("storage_class", list(CLASSES))
async def test_csi_sanity_passes_every_spec(
    storage_class: str, tmp_path: Path, amqp_vhost: str, redis_server: RedisEndpoint, redis_prefix: str
) -> None:
    binary = sanity_binary()
    if binary is None:
        reason = "csi-sanity not found at ../shared/tools/csi-sanity (set CSI_SANITY to its path)"
        print(reason)
        pytest.skip(reason)
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        reason = "csi-sanity needs root and losetup: the simulator attaches loop devices and the node mounts them"
        print(reason)
        pytest.skip(reason)
    async with stack_on_session_brokers(tmp_path / "stack", amqp_vhost, redis_server, redis_prefix,
                                        migrators=1, all_in_one=SANITY_NODE) as stack:
        work = tmp_path / "sanity"
        work.mkdir()
        report, tail = await run_sanity(binary, stack.controller_socket, work, CLASSES[storage_class])
        leftovers = sorted(vdi.name_label for vdi in await stack.xo.find_vdis() if vdi.name_label.startswith("csi-"))
        migrations = sum((await sim_stats(stack))["migrations"].values())
    print(f"csi-sanity ({storage_class}): {len(report.passed)} passed, {len(report.failed)} failed, "
          f"{len(report.skipped)} skipped, {migrations} migrations")
    assert report.failed == [], "failed specs:\n  " + "\n  ".join(report.failed) + f"\n{tail}"
    assert len(report.passed) >= 50, f"csi-sanity ran only {len(report.passed)} specs:\n{tail}"
    assert leftovers == []  # every volume the suite made is gone from XO again
    if storage_class == "migrating":
        assert migrations > 0  # volumes made on host A2's SR reached node-a1 through the queue and the migrator
