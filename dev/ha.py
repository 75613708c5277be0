"""Highly available brokers on loopback, for the HA tests (tests/ha/) and trials: a RabbitMQ cluster of three
nodes, and a Redis primary + replica watched by three sentinels. Built from dev/brokers.py's local servers.

Blocking API (subprocess + polling): call it from a thread inside an event loop. Every process started here is
stopped by ``stop()``, which then checks that none is left (``leftovers()``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import redis

from dev.brokers import (
    LocalRabbit,
    LocalRedis,
    RabbitEndpoint,
    RedisEndpoint,
    log_tail,
    management_client,
    pick_free_port,
    pid_files,
    process_alive,
    redis_ready,
    run_script,
    stop_server,
    wait_ready,
)
from dev.wait import wait_until

SENTINEL_MASTER = "xocsi"
# The management API under load (a 2-core machine, nodes booting): a vhost starts on every node before it answers.
API_TIMEOUT_S = 60.0
VHOST_WAIT_S = 180.0


class LocalRabbitCluster:
    """``size`` RabbitMQ nodes on 127.0.0.1 forming one cluster as they boot, all started at once.

    They share an Erlang cookie and an epmd (started here) and list each other in ``cluster_nodes`` (RabbitMQ's
    classic-config peer discovery): the first node to take the discovery lock initialises the cluster, the others
    join it during their own boot, so no node is booted twice (``join_cluster`` needs ``stop_app``/``start_app``
    after a full boot: seconds of CPU more per node on 2 cores). ``boot_s`` is the time from launch until every
    node answered AMQP and its management API.
    """

    def __init__(self, size: int = 3, *, extra_rabbit_config: str = "") -> None:
        self.epmd_port = pick_free_port()
        cookie = secrets.token_hex(16)
        self.nodes = [LocalRabbit(epmd_port=self.epmd_port, cookie=cookie) for _ in range(size)]
        names = ", ".join(f"'{node.node_name}'" for node in self.nodes)
        # One discovery try (RabbitMQ's default is 10, 500 ms apart): the node that takes the lock first finds no
        # peer up yet and initialises at once; the others wait for the lock, then join it.
        cluster = (f"{{cluster_nodes, {{[{names}], disc}}}}, "
                   "{cluster_formation, [{discovery_retry_limit, 1}, {discovery_retry_interval, 200}]}")
        for node in self.nodes:
            node.extra_rabbit_config = ", ".join(filter(None, [cluster, extra_rabbit_config]))
        self._epmd: subprocess.Popen[bytes] | None = None
        self._seen: set[int] = set()
        self.boot_s = 0.0

    def start(self) -> None:
        """Start epmd, then every node at once; return when all answer (BrokerStartError with the log tails)."""
        started = time.monotonic()
        self._start_epmd()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for done in [pool.submit(node.start) for node in self.nodes]:
                done.result()
        self.boot_s = time.monotonic() - started
        for node in self.nodes:
            self._seen |= node.pids()

    def _start_epmd(self) -> None:
        self._epmd = subprocess.Popen(["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        self._seen.add(self._epmd.pid)
        env = {**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)}

        def answers() -> bool:
            return subprocess.run(["epmd", "-names"], env=env, capture_output=True).returncode == 0
        wait_ready(answers, f"epmd on {self.epmd_port}", lambda: "(epmd logs nothing)")

    def kill(self, index: int) -> None:
        """kill -9 node ``index`` (its state dir is kept: ``restart(index)`` brings it back into the cluster)."""
        self._seen |= self.nodes[index].pids()
        self.nodes[index].stop(keep_state=True, crash=True)

    def restart(self, index: int) -> None:
        """Start a stopped node again on its ports with its state: it rejoins the cluster."""
        self.nodes[index].start()
        self._seen |= self.nodes[index].pids()

    def stop(self) -> None:
        """Stop every node (SIGKILL; state dirs removed) and epmd. Idempotent."""
        for node in self.nodes:
            self._seen |= node.pids()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(crash=True), self.nodes))
        if self._epmd is not None:
            self._epmd.kill()
            self._epmd.wait(timeout=10)
            self._epmd = None

    def leftovers(self) -> list[int]:
        """PIDs started here (beam, launchers, epmd) that still run: empty after ``stop()``."""
        return sorted(pid for pid in self._seen if process_alive(pid))

    def endpoint(self, index: int) -> RabbitEndpoint:
        return self.nodes[index].endpoint

    def amqp_url(self, vhost: str, indices: Iterator[int] | None = None) -> str:
        """AMQP_URL naming ``vhost`` on the nodes ``indices`` (default: all, in order), comma-separated."""
        chosen = list(indices) if indices is not None else range(len(self.nodes))
        return ",".join(self.nodes[index].endpoint.vhost_url(vhost) for index in chosen)

    def index_of(self, node_name: str) -> int:
        return next(index for index, node in enumerate(self.nodes) if node.node_name == node_name)

    def running_nodes(self, via: int) -> list[str]:
        """Names of the nodes the management API of node ``via`` reports running."""
        with management_client(self.endpoint(via), API_TIMEOUT_S) as http:
            response = http.get("/api/nodes")
            response.raise_for_status()
            return sorted(node["name"] for node in response.json() if node.get("running"))

    def queue(self, vhost: str, name: str, via: int) -> dict[str, object]:
        """The management API's view of a queue (for a quorum queue: ``members``, ``leader``, ``online``)."""
        with management_client(self.endpoint(via), API_TIMEOUT_S) as http:
            response = http.get(f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}")
            response.raise_for_status()
            return dict(response.json())

    def connections(self, vhost: str, via: int) -> dict[str, str]:
        """Client connection name -> node, of the connections to ``vhost`` the cluster lists."""
        with management_client(self.endpoint(via), API_TIMEOUT_S) as http:
            response = http.get(f"/api/vhosts/{quote(vhost, safe='')}/connections")
            response.raise_for_status()
            return {c.get("client_properties", {}).get("connection_name", c["name"]): c["node"]
                    for c in response.json()}

    def logs(self) -> str:
        return "\n".join(node.logs() for node in self.nodes)


@contextlib.contextmanager
def temporary_cluster_vhost(cluster: LocalRabbitCluster, vhost: str) -> Iterator[str]:
    """``vhost`` created on the cluster (through node 0) with the guest user's permissions; yields AMQP_URL over
    every node; deleted afterwards (through any node still answering)."""
    path = quote(vhost, safe="")

    def put(what: str, body: dict[str, str] | None = None) -> bool:
        """A PUT that may be retried (both are idempotent): a timeout or a 5xx is "not yet"."""
        try:
            with management_client(cluster.endpoint(0), timeout_s=API_TIMEOUT_S) as http:
                response = http.put(what, json=body)
        except httpx.TimeoutException as exc:
            raise AssertionError(f"PUT {what}: {exc!r}") from None
        assert response.status_code < 500, f"PUT {what}: {response.status_code} {response.text[:300]}"
        response.raise_for_status()
        return True

    # Measured on a busy machine (other suites writing to the same disk): the first vhost of a new cluster
    # took over 45 s (RabbitMQ answered 500 after starting it on every node), so retried up to VHOST_WAIT_S.
    wait_until(lambda: put(f"/api/vhosts/{path}"), VHOST_WAIT_S, 1.0, description=f"vhost {vhost} created")
    everything = {"configure": ".*", "write": ".*", "read": ".*"}
    wait_until(lambda: put(f"/api/permissions/{path}/guest", everything), VHOST_WAIT_S, 1.0,
               description=f"permissions on vhost {vhost}")
    try:
        yield cluster.amqp_url(vhost)
    finally:
        for node in cluster.nodes:
            with contextlib.suppress(httpx.HTTPError), management_client(node.endpoint, API_TIMEOUT_S) as http:
                if http.delete(f"/api/vhosts/{path}").status_code in (204, 404):
                    break


class LocalSentinel:
    """A Redis Sentinel run by scripts/redis/start_sentinel.sh on a free 127.0.0.1 port."""

    def __init__(self) -> None:
        self.port = pick_free_port()
        self.base_dir: Path | None = None

    def start(self, primary: RedisEndpoint, quorum: int, down_after_ms: int) -> None:
        env = {"REDIS_SENTINEL_DOWN_AFTER_MS": str(down_after_ms)}
        self.base_dir = Path(run_script("redis/start_sentinel.sh", str(self.port), SENTINEL_MASTER, primary.host,
                                         str(primary.port), str(quorum), env=env))
        wait_ready(lambda: redis_ready("127.0.0.1", self.port), f"Redis Sentinel on {self.port}", self.logs)

    def stop(self) -> None:
        self.base_dir = stop_server(self.base_dir, "redis/stop.sh", keep_state=False, crash=True)

    def pids(self) -> set[int]:
        return pid_files(self.base_dir, "redis.pid")

    def logs(self) -> str:
        return log_tail([self.base_dir / "redis.log"]) if self.base_dir else ""


class LocalRedisSentinel:
    """A Redis primary, one replica and three sentinels (quorum 2) on 127.0.0.1: the primary is deemed down
    after ``down_after_ms`` of silence and the replica promoted (measured: about 2 s after a kill -9 with 1 s).
    ``sentinels`` is REDIS_SENTINELS for the services; the master name is ``SENTINEL_MASTER``."""

    def __init__(self, *, down_after_ms: int = 1000) -> None:
        self.primary = LocalRedis()
        self.replica = LocalRedis(replica_of=self.primary.endpoint)
        self.watchers = [LocalSentinel() for _ in range(3)]
        self.down_after_ms = down_after_ms
        self._seen: set[int] = set()

    @property
    def servers(self) -> list[LocalRedis]:
        return [self.primary, self.replica]

    @property
    def sentinels(self) -> str:
        return ",".join(f"127.0.0.1:{watcher.port}" for watcher in self.watchers)

    def start(self) -> None:
        """Start both servers and the sentinels; return once the replica is in sync and every sentinel knows the
        replica and the two other sentinels (a failover can then happen)."""
        for server in self.servers:
            server.start()
        for watcher in self.watchers:
            watcher.start(self.primary.endpoint, quorum=2, down_after_ms=self.down_after_ms)
        self._seen |= self._pids()
        wait_ready(self._watching, "sentinels watching the primary, its replica and each other", self.logs)

    def _watching(self) -> bool:
        if self._info(self.replica.endpoint, "replication").get("master_link_status") != "up":
            return False
        for watcher in self.watchers:
            with redis.Redis(port=watcher.port, socket_timeout=5, decode_responses=True) as client:
                state = client.sentinel_master(SENTINEL_MASTER)
            if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < len(self.watchers) - 1:
                return False
        return True

    @staticmethod
    def _info(endpoint: RedisEndpoint, section: str) -> dict[str, object]:
        with redis.Redis(host=endpoint.host, port=endpoint.port, socket_timeout=5, decode_responses=True) as client:
            return dict(client.info(section))

    def master_address(self) -> tuple[str, int]:
        """Where the sentinels say the primary is now."""
        with redis.Redis(port=self.watchers[0].port, socket_timeout=5, decode_responses=True) as client:
            host, port = client.sentinel_get_master_addr_by_name(SENTINEL_MASTER)
        return str(host), int(port)

    def is_primary(self, server: LocalRedis) -> bool:
        return self._info(server.endpoint, "replication").get("role") == "master"

    def kill(self, server: LocalRedis) -> None:
        """kill -9 ``server`` (what it had not replicated is lost)."""
        self._seen |= server.pids()
        server.stop(crash=True)

    def pause(self, server: LocalRedis) -> None:
        """SIGSTOP ``server`` until ``resume`` (it answers nobody, the sentinels included)."""
        for pid in server.pids():
            os.kill(pid, signal.SIGSTOP)

    def cut_off_replica(self) -> None:
        """From now on the replica receives nothing of what the primary writes, as if replication lagged: it is
        paused (``resume`` it), then the primary drops its replication link, which the paused replica cannot
        re-open. (A pause alone is not enough: the stream keeps arriving in its socket buffer, read on resume.)"""
        self.pause(self.replica)
        with redis.Redis(port=self.primary.endpoint.port, socket_timeout=5) as client:
            client.client_kill_filter(_type="replica")

    def resume(self, server: LocalRedis) -> None:
        for pid in server.pids():
            os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop everything (SIGKILL; a paused server is resumed first). Idempotent."""
        self._seen |= self._pids()
        for server in self.servers:
            with contextlib.suppress(ProcessLookupError):
                self.resume(server)
            server.stop(crash=True)
        for watcher in self.watchers:
            watcher.stop()

    def _pids(self) -> set[int]:
        return set().union(*(server.pids() for server in self.servers), *(w.pids() for w in self.watchers))

    def leftovers(self) -> list[int]:
        """PIDs started here (servers, sentinels) that still run: empty after ``stop()``."""
        return sorted(pid for pid in self._seen if process_alive(pid))

    def logs(self) -> str:
        return "\n".join([*(server.logs() for server in self.servers), *(w.logs() for w in self.watchers)])
