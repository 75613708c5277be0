"""Local RabbitMQ and Redis servers for the demo, the tests and the soak: private nodes started with
scripts/rmq and scripts/redis on free 127.0.0.1 ports, with readiness probes, stop and restart.

Blocking API (subprocess + polling): call it from a thread inside an event loop.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from dev.wait import wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO_ROOT / "scripts"
READY_TIMEOUT_S = 90.0  # measured 6-10 s on 2 idle cores; CI machines may be busier
SCRIPT_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 40


class BrokerStartError(RuntimeError):
    """A broker did not come up before its deadline; the message carries its log tail."""


@dataclass(frozen=True)
class RabbitEndpoint:
    amqp_url: str  # default vhost "/"
    management_url: str  # http://host:port, no trailing slash
    user: str
    password: str
    host: str
    port: int
    mgmt_port: int
    base_dir: Path | None  # the node's state dir; None for a container

    def vhost_url(self, vhost: str) -> str:
        """The AMQP URL of `vhost` on this broker."""
        return f"amqp://{self.user}:{self.password}@{self.host}:{self.port}/{quote(vhost, safe='')}"


@dataclass(frozen=True)
class RedisEndpoint:
    url: str  # redis://host:port/0
    host: str
    port: int


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_PICKED: set[int] = set()  # every port this process handed out


def pick_free_port(exclude: frozenset[int] = frozenset()) -> int:
    """A free 127.0.0.1 port below the kernel's ephemeral range, so no outgoing connection can take it
    between the pick and the server's bind (or a restart). Never one this process handed out before: servers
    picked together and started in parallel (RabbitMQ's four ports and Redis's) cannot get the same free port."""
    low, _ = _ephemeral_port_range()
    for _ in range(200):
        port = random.randrange(20000, max(low, 20001))
        if port not in exclude and port not in _PICKED and _port_is_free(port):
            _PICKED.add(port)
            return port
    raise BrokerStartError(f"no free port found in 20000-{low}")


def unique_name(label: str, max_label_chars: int = 40) -> str:
    """`label` reduced to [A-Za-z0-9_-], cut, plus 8 random hex chars: a vhost name or key prefix."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")[:max_label_chars]
    return f"{clean}-{secrets.token_hex(4)}"


# ---------------------------------------------------------------------------------------------- probes


def amqp_ready(host: str, port: int) -> bool:
    """The broker answers the AMQP 0-9-1 protocol header with a Connection.Start frame. Stricter than a TCP
    connect, which a Docker port proxy accepts before the broker listens."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"  # frame type 1 = method frame
    except OSError:
        return False


def management_client(endpoint: RabbitEndpoint, timeout_s: float = 10.0) -> httpx.Client:
    """An httpx client for the management API. The URL is always plain http (we build it), so no SSL context
    is built: that alone costs ~80 ms per client here."""
    return httpx.Client(
        base_url=endpoint.management_url, auth=(endpoint.user, endpoint.password), timeout=timeout_s, verify=False
    )


def management_ready(endpoint: RabbitEndpoint) -> bool:
    try:
        with management_client(endpoint, timeout_s=2) as http:
            return http.get("/api/overview").status_code == 200
    except httpx.HTTPError:
        return False


def redis_ready(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def pid_files(base_dir: Path | None, *names: str) -> set[int]:
    pids = set()
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            pids.add(int((base_dir / name).read_text()) if base_dir else 0)
    return pids - {0}


def log_tail(paths: list[Path], lines: int = LOG_TAIL_LINES) -> str:
    parts = []
    for path in paths:
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(parts) or "(no log files)"


def run_script(*args: str, env: dict[str, str] | None = None) -> str:
    """Run a script under scripts/ and return its last stdout line; raise BrokerStartError with its output."""
    argv = ["bash", str(SCRIPTS_DIR / args[0]), *args[1:]]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise BrokerStartError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def stop_server(base_dir: Path | None, script: str, *, keep_state: bool, crash: bool) -> Path | None:
    """Run a server's stop script (SIGKILL with ``crash``; its state dir kept with ``keep_state``); the state
    dir the server keeps afterwards. Nothing to do when it is not running."""
    if base_dir is None:
        return None
    run_script(script, str(base_dir), *(["kill"] if crash else []), *(["keep"] if keep_state else []))
    return base_dir if keep_state else None


def wait_ready(check: Callable[[], bool], description: str, logs: Callable[[], str]) -> None:
    """Block until ``check()`` is true; BrokerStartError carrying ``logs()`` after READY_TIMEOUT_S."""
    try:
        wait_until(check, READY_TIMEOUT_S, description=description)
    except AssertionError as exc:
        raise BrokerStartError(f"{exc}\n{logs()}") from None


# ---------------------------------------------------------------------------------------------- local servers


class LocalRabbit:
    """A RabbitMQ node run by scripts/rmq/*.sh on free 127.0.0.1 ports (AMQP, management, distribution, and
    its own epmd, ended with the node).

    Blocking methods: call them from a thread (`asyncio.to_thread`) inside a test's event loop.
    """

    def __init__(self, *, extra_rabbit_config: str = "", user: str = "guest", password: str = "guest",
                 epmd_port: int | None = None, cookie: str | None = None) -> None:
        self.port = pick_free_port()
        self.mgmt_port = pick_free_port(frozenset({self.port}))
        self.dist_port = pick_free_port(frozenset({self.port, self.mgmt_port}))
        # Its own epmd unless given one (a cluster's nodes share theirs): a shared 4369 could be left to nobody
        # when nodes of several sessions overlap.
        self.epmd_port = epmd_port or pick_free_port(frozenset({self.port, self.mgmt_port, self.dist_port}))
        self.cookie = cookie
        self.extra_rabbit_config = extra_rabbit_config
        self.user, self.password = user, password
        self.base_dir: Path | None = None

    @property
    def node_name(self) -> str:
        """The Erlang node name scripts/rmq/start.sh gives it."""
        return f"rmq{self.port}@localhost"

    @property
    def endpoint(self) -> RabbitEndpoint:
        """Stable across restarts (same ports, same state dir)."""
        return RabbitEndpoint(
            amqp_url=f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/",
            management_url=f"http://127.0.0.1:{self.mgmt_port}",
            user=self.user,
            password=self.password,
            host="127.0.0.1",
            port=self.port,
            mgmt_port=self.mgmt_port,
            base_dir=self.base_dir,
        )

    def start(self) -> None:
        """Start the node (reusing its state dir after `stop(keep_state=True)`) and wait until both AMQP and
        the management API answer. Raises BrokerStartError with the log tail after READY_TIMEOUT_S."""
        env = {
            "RMQ_DIST_PORT": str(self.dist_port),
            "RMQ_EPMD_PORT": str(self.epmd_port),
            "RMQ_EXTRA_RABBIT": self.extra_rabbit_config,
            **({"RMQ_COOKIE": self.cookie} if self.cookie else {}),
        }
        if self.base_dir is not None:
            env["RMQ_BASE"] = str(self.base_dir)
        self.base_dir = Path(run_script("rmq/start.sh", str(self.port), str(self.mgmt_port), env=env))
        ep = self.endpoint
        wait_ready(lambda: self._alive() and amqp_ready(ep.host, ep.port), f"RabbitMQ AMQP on {ep.port}", self.logs)
        wait_ready(lambda: management_ready(ep), f"RabbitMQ management on {ep.mgmt_port}", self.logs)

    def stop(self, *, keep_state: bool = False, crash: bool = True) -> None:
        """Stop the node: SIGKILL with crash (1-2 s), else SIGTERM (a clean shutdown, ~8 s). With keep_state,
        keep its state dir (durable queues, vhosts) for `start()`; without, remove it and the epmd this node
        started. Idempotent."""
        self.base_dir = stop_server(self.base_dir, "rmq/stop.sh", keep_state=keep_state, crash=crash)

    def restart(self, *, crash: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with crash) and start again on the same ports with the state kept.

        Beware crash=True: a quorum queue declared shortly before the SIGKILL (RabbitMQ 3.10 measured: seconds
        before) comes back as a leaderless follower with an empty log (basic.get never answers), as Ra had not
        yet persisted its server registry. A queue that went through one clean restart survives later crashes.
        """
        self.stop(keep_state=True, crash=crash)
        self.start()

    def _alive(self) -> bool:
        """Raise BrokerStartError as soon as the node's launcher exits (a boot failure), not at the deadline."""
        assert self.base_dir is not None
        pid = int((self.base_dir / "launcher.pid").read_text())
        if not process_alive(pid):
            raise BrokerStartError(f"RabbitMQ exited during boot\n{self.logs()}")
        return True

    def pids(self) -> set[int]:
        """The node's launcher and beam PIDs while it runs (leak checks)."""
        return pid_files(self.base_dir, "launcher.pid", "rabbit.pid")

    def logs(self) -> str:
        return log_tail(sorted((self.base_dir / "log").glob("*.log"))) if self.base_dir else "(not started)"


class LocalRedis:
    """A redis-server run by scripts/redis/*.sh on a free 127.0.0.1 port, without persistence.

    Blocking methods: call them from a thread (`asyncio.to_thread`) inside a test's event loop.
    """

    def __init__(self, *, replica_of: RedisEndpoint | None = None) -> None:
        port = pick_free_port()
        self.base_dir: Path | None = None
        self.replica_of = replica_of
        self.endpoint = RedisEndpoint(url=f"redis://127.0.0.1:{port}/0", host="127.0.0.1", port=port)

    def start(self) -> None:
        """Start redis (loading the dump saved by `stop(keep_state=True)`; a replica of ``replica_of`` when given)
        and wait for PONG."""
        env = {"REDIS_BASE": str(self.base_dir)} if self.base_dir is not None else {}
        if self.replica_of is not None:
            env["REDIS_REPLICA_OF"] = f"{self.replica_of.host} {self.replica_of.port}"
        self.base_dir = Path(run_script("redis/start.sh", str(self.endpoint.port), env=env))
        ep = self.endpoint
        wait_ready(lambda: redis_ready(ep.host, ep.port), f"Redis on {ep.port}", self.logs)

    def stop(self, *, keep_state: bool = False, crash: bool = False) -> None:
        """SHUTDOWN (SAVE with keep_state, keeping the dir for `start()`), or SIGKILL with crash (unsaved
        data lost). Idempotent."""
        self.base_dir = stop_server(self.base_dir, "redis/stop.sh", keep_state=keep_state, crash=crash)

    def restart(self, *, keep_data: bool = True) -> None:
        """Restart on the same port: with keep_data a clean SHUTDOWN SAVE + start (data kept), else a crash
        (SIGKILL, empty on start)."""
        if keep_data:
            self.stop(keep_state=True)
        else:
            self.stop(crash=True)  # and drop the dir with any dump saved by an earlier restart
        self.start()

    def pids(self) -> set[int]:
        """The server's PID while it runs (leak checks)."""
        return pid_files(self.base_dir, "redis.pid")

    def logs(self) -> str:
        return log_tail([self.base_dir / "redis.log", self.base_dir / "launch.log"]) if self.base_dir else ""
