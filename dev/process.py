"""Run a project service as a separate process for e2e tests, as in production: output captured to a file,
readiness awaited, log tail printed on failure, and the whole process group ended on exit (never leaked).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dev.wait import eventually

LOG_TAIL_LINES = 60
_live_groups: set[int] = set()  # process groups started here and not yet ended


class ServiceExited(RuntimeError):
    """The service exited before it was ready."""


@dataclass
class ServiceProcess:
    """A running service. Its process group id is its pid (it leads a new session)."""

    argv: Sequence[str]
    process: asyncio.subprocess.Process
    log_path: Path
    ready_after_s: float = float("nan")  # from the spawn until it was found ready (start-up time)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- {self.log_path} (last {len(tail)} lines, rc={self.returncode})\n" + "\n".join(tail)

    def send_signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)

    async def stop(self, grace_s: float = 5.0) -> int:
        """SIGTERM the service; SIGKILL its whole process group if it has not exited after `grace_s`.
        Returns the exit code (negative: killed by that signal). Idempotent."""
        if self.process.returncode is None:
            self.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await self.process.wait()
            except TimeoutError:
                print(f"{self.argv[0]}: still running {grace_s} s after SIGTERM; sending SIGKILL")
        return await self.kill()

    async def kill(self) -> int:
        """SIGKILL the whole process group (a crash) and reap the service. Idempotent."""
        _kill_group(self.pid)
        return await self.process.wait()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    _live_groups.discard(pgid)


def kill_leftover_processes() -> None:
    """SIGKILL every process group still running (the backstop when a test's event loop died before the
    context manager could end its service, e.g. on a timeout)."""
    for pgid in list(_live_groups):
        _kill_group(pgid)


atexit.register(kill_leftover_processes)


def _log_file(log_dir: Path, name: str) -> Path:
    log_dir.mkdir(parents=True, exist_ok=True)
    path, n = log_dir / f"{name}.log", 1
    while path.exists():
        n += 1
        path = log_dir / f"{name}-{n}.log"
    return path


async def _wait_ready(
    service: ServiceProcess,
    ready_line_regex: str | None,
    ready: Callable[[], object | Awaitable[object]] | None,
    timeout_s: float,
) -> None:
    pattern = re.compile(ready_line_regex, re.MULTILINE) if ready_line_regex else None

    async def is_ready() -> bool:
        if service.returncode is not None:
            raise ServiceExited(f"{service.argv[0]} exited with {service.returncode} before it was ready")
        if pattern is not None and not pattern.search(service.log_text()):
            return False
        if ready is not None:
            result = ready()
            return bool(await result if inspect.isawaitable(result) else result)
        return True

    what = " and ".join(filter(None, [pattern and f"a line matching {ready_line_regex!r}", ready and "ready()"]))
    await eventually(is_ready, timeout_s, interval_s=0.02, description=f"{service.argv[0]}: {what or 'started'}")


@contextlib.asynccontextmanager
async def service_process(
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    ready_line_regex: str | None = None,
    ready: Callable[[], object | Awaitable[object]] | None = None,
    timeout_s: float = 30.0,
    grace_s: float = 5.0,
    name: str | None = None,
) -> AsyncIterator[ServiceProcess]:
    """Start `argv` (environment: ours + PYTHONUNBUFFERED=1 + `env`) in a new session with stdout and stderr
    going to `log_dir/<name>.log`, wait until its output matches `ready_line_regex` and/or `ready()` (sync or
    async) is truthy, and yield it.

    On exit: SIGTERM, SIGKILL to its process group after `grace_s`. The log tail is printed when startup
    fails (ServiceExited, AssertionError after `timeout_s`) or the body raises, so pytest shows it.
    """
    log_path = _log_file(log_dir, name or Path(argv[0]).name)
    spawned_s = time.perf_counter()
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
    _live_groups.add(process.pid)
    service = ServiceProcess(argv=argv, process=process, log_path=log_path)
    failed = True
    try:
        await _wait_ready(service, ready_line_regex, ready, timeout_s)
        service.ready_after_s = time.perf_counter() - spawned_s
        yield service
        failed = False
    finally:
        try:
            await service.stop(grace_s)
        finally:
            _kill_group(process.pid)  # also when the stop above was cancelled: never leak the group
            if failed:
                print(service.log_tail())
