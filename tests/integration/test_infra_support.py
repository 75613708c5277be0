"""The test-support helpers themselves: `eventually` and `service_process` (readiness, log capture, stopping,
and never leaking a process)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from dev import brokers
from dev.process import ServiceExited, ServiceProcess
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

ServiceLauncher = Callable[..., AbstractAsyncContextManager[ServiceProcess]]

# A stand-in service: prints a ready line, starts a grandchild, and exits 0 on SIGTERM.
SERVICE = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"child {child.pid}")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("listening on 127.0.0.1:1234")
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    return state == "Z"


async def test_eventually_returns_the_truthy_value_and_accepts_asserts() -> None:
    calls: list[int] = []

    def predicate() -> int:
        calls.append(1)
        assert len(calls) >= 3, "not yet"
        return len(calls)

    assert await eventually(predicate, timeout_s=5) == 3


async def test_eventually_times_out_with_the_last_result() -> None:
    async def never() -> str:
        return ""

    with pytest.raises(AssertionError, match=r"within 0.05 s .*never.*last result: ''"):
        await eventually(never, timeout_s=0.05)


async def test_service_process_waits_for_ready_line_and_ends_the_group(service_process: ServiceLauncher) -> None:
    async with service_process([sys.executable, "-c", SERVICE], ready_line_regex=r"^listening on ") as proc:
        child_pid = int(proc.log_text().split()[1])
        assert not _gone(proc.pid) and not _gone(child_pid)
    assert proc.returncode == 0  # clean exit on SIGTERM
    assert "listening on" in proc.log_path.read_text()
    await eventually(lambda: _gone(child_pid), timeout_s=5)  # the grandchild went with the process group


async def test_service_process_kills_after_grace(service_process: ServiceLauncher) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up'); time.sleep(600)"
    async with service_process([sys.executable, "-c", stubborn], ready_line_regex="up", grace_s=0.2) as proc:
        pass
    assert proc.returncode == -signal.SIGKILL


async def test_service_process_fails_fast_when_the_service_exits(
    service_process: ServiceLauncher, capsys: pytest.CaptureFixture[str]
) -> None:
    crashing = "import sys; print('bad config: CSI_ENDPOINT'); sys.exit(3)"
    with pytest.raises(ServiceExited, match="exited with 3"):
        async with service_process([sys.executable, "-c", crashing], ready_line_regex="never", timeout_s=30):
            pass
    assert "bad config: CSI_ENDPOINT" in capsys.readouterr().out  # the log tail is shown


async def test_service_process_ready_callable(service_process: ServiceLauncher) -> None:
    checks: list[int] = []

    async def ready() -> bool:
        checks.append(1)
        return len(checks) >= 2

    async with service_process([sys.executable, "-c", "import time; time.sleep(600)"], ready=ready) as proc:
        assert proc.returncode is None and len(checks) == 2


def test_a_port_once_picked_is_never_picked_again_by_the_same_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """RabbitMQ's four ports and Redis's are picked before any of them binds, then started in parallel: were the
    same free port handed out twice, one of the servers would fail to listen (a demo that stops before its story)."""
    offered = iter([24001, 24001, 24001, 24002])
    monkeypatch.setattr("dev.brokers.random.randrange", lambda *_: next(offered))
    monkeypatch.setattr(brokers, "_PICKED", set())
    monkeypatch.setattr(brokers, "_port_is_free", lambda port: True)

    assert [brokers.pick_free_port(), brokers.pick_free_port()] == [24001, 24002]
