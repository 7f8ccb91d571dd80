"""A real Redis Cluster for the local stack and the tests: N Valkey masters, no replicas.

Each node runs :func:`streamrec.stack.redis_binary` in cluster mode, with its own data
dir (AOF, ``nodes-<port>.conf``) and log under ``state_dir``, and a free cluster-bus port
(``--cluster-port``; port + 10000 may be taken or out of range). :meth:`~LocalRedisCluster.start`
joins them (CLUSTER MEET, then CLUSTER ADDSLOTSRANGE over the 16,384 slots) and waits for
``cluster_state:ok`` on every node: ~2 s, as a fresh master waits 2 s before saying ok.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Self

import redis

from ingest.settings import RedisSettings
from streamrec.settings import StackSettings
from streamrec.stack import ServerProcess, StackError, _tail, free_port, redis_binary

log = logging.getLogger(__name__)

SLOTS = 16_384
HOST = "127.0.0.1"


class LocalRedisCluster:
    """``nodes`` Valkey masters on free loopback ports, joined into one cluster.

    >>> c = LocalRedisCluster.external("redis://cache:7000/0")
    >>> c.redis_settings(RedisSettings()).cluster, c.url, c.nodes
    (True, 'redis://cache:7000/0', [])
    """

    def __init__(
        self, state_dir: Path, settings: StackSettings, *, nodes: int = 3, tie_to_parent: bool = True
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.state_dir = Path(state_dir).resolve()
        self.settings = settings
        self.n = nodes
        self.tie_to_parent = tie_to_parent
        self.nodes: list[ServerProcess] = []
        self.bus_ports: list[int] = []
        self._url: str | None = None

    @classmethod
    def external(cls, url: str) -> LocalRedisCluster:
        """A handle on a cluster run elsewhere: start/stop do nothing, no node to kill."""
        handle = cls(Path("."), StackSettings(), nodes=1)
        handle._url = url
        return handle

    @property
    def url(self) -> str:
        if self._url:
            return self._url
        if not self.nodes:
            raise StackError("the cluster is not started")
        return f"redis://{HOST}:{self.nodes[0].port}/0"

    def redis_settings(self, base: RedisSettings) -> RedisSettings:
        return base.model_copy(update={"url": self.url, "cluster": True})

    def start(self) -> Self:
        """Start and join a fresh cluster (old node dirs under ``state_dir`` are wiped)."""
        if self._url or self.nodes:
            return self
        t0 = time.monotonic()
        try:
            for i in range(self.n):
                self.nodes.append(self._make_node(i))
                self.nodes[i].start()
            for i in range(self.n):
                self._wait_ready(i)
            first = self.nodes[0].port
            for i in range(1, self.n):
                self._cmd(i, "CLUSTER", "MEET", HOST, first, self.bus_ports[0])
            for i in range(self.n):
                lo, hi = i * SLOTS // self.n, (i + 1) * SLOTS // self.n - 1
                self._cmd(i, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        log.info("redis cluster of %d nodes formed in %.2fs", self.n, time.monotonic() - t0)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        self.bus_ports.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self, i: int) -> None:
        """``kill -9`` node ``i``; the others mark it failed after the node timeout."""
        self._node(i).kill()

    def restart(self, i: int) -> None:
        """(Kill and) start node ``i`` again, same ports, data and node id; wait for ok."""
        self.kill(i)
        self._node(i).start()
        self._wait_ready(i)
        self.wait_ok()

    def wait_ok(self, timeout: float | None = None) -> None:
        """Wait until every node says ``cluster_state:ok`` and knows all the nodes."""
        if self._url:
            return
        timeout = self.settings.startup_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        infos: dict[int, str] = {}
        while True:
            for i in range(self.n):
                try:
                    infos[i] = self._cmd(i, "CLUSTER", "INFO")
                except redis.RedisError as e:
                    infos[i] = f"cluster_state:error ({e})"
            if all(self._formed(info) for info in infos.values()):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        keep = ("cluster_state", "cluster_slots_assigned", "cluster_known_nodes")
        report = "\n".join(
            f"--- node {i} (port {self.nodes[i].port}): "
            + " ".join(ln for ln in infos[i].splitlines() if ln.startswith(keep))
            + f"\n{_tail(self.nodes[i].log_path, 8)}"
            for i in range(self.n)
        )
        raise StackError(f"redis cluster did not form within {timeout:.0f}s:\n{report}")

    def _formed(self, info: str) -> bool:
        f = dict(ln.split(":", 1) for ln in info.splitlines() if ":" in ln)
        got = (f.get("cluster_state"), f.get("cluster_known_nodes"), f.get("cluster_slots_assigned"))
        return got == ("ok", str(self.n), str(SLOTS))

    def _node(self, i: int) -> ServerProcess:
        if not self.nodes:
            raise StackError("no local cluster nodes (not started, or an external cluster)")
        return self.nodes[i]

    def _make_node(self, i: int) -> ServerProcess:
        used = {n.port for n in self.nodes} | set(self.bus_ports)
        port, bus = free_port(), free_port()
        while bus == port or {port, bus} & used:
            port, bus = free_port(), free_port()
        self.bus_ports.append(bus)
        data = self.state_dir / f"node-{i}"
        shutil.rmtree(data, ignore_errors=True)  # old keys would claim slots of their own
        data.mkdir(parents=True)
        argv = [
            redis_binary(self.settings),
            "--port", str(port),
            "--bind", HOST,
            "--cluster-enabled", "yes",
            "--cluster-port", str(bus),
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", "2000",
            "--dir", str(data),
            "--appendonly", "yes",
            "--appendfsync", self.settings.redis_appendfsync,
            "--save", "",
        ]
        log_path = self.state_dir / f"redis-node-{i}.log"
        return ServerProcess(f"redis-node-{i}", argv, port, log_path, self.tie_to_parent)

    def _cmd(self, i: int, *args: str | int) -> str:
        client = redis.Redis(host=HOST, port=self.nodes[i].port, socket_timeout=2,
                             decode_responses=True, single_connection_client=True)
        with contextlib.closing(client):
            return client.execute_command(*args)

    def _wait_ready(self, i: int) -> None:
        """Listening, then PING answered (not LOADING while the AOF replays)."""
        node = self.nodes[i]
        node.wait_listening(self.settings.startup_timeout_s)
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while True:
            try:
                self._cmd(i, "PING")
                return
            except (redis.BusyLoadingError, redis.ConnectionError):
                if time.monotonic() > deadline or not node.alive():
                    raise StackError(
                        f"{node.name} did not answer PING; last log lines:\n{_tail(node.log_path)}"
                    ) from None
            time.sleep(0.05)
