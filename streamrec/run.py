"""``streamrec run``: the long-running services of one host, one process per role.

A deployment on Kubernetes or Compose runs each role in its own container with
its own command (``deploy/``); on a single host (a VM, a laptop, ``make demo``)
:class:`Supervisor` starts them as child processes from the same settings:

========  ===============================  ===========================
role      command                          health / metrics
========  ===============================  ===========================
sessions  ``streamrec ingest sessions``    ingest ``sessions_metrics_port``
archive   ``streamrec ingest archive``     ingest ``archive_metrics_port``
serve     ``streamrec serve``              ``/healthz``, ``/readyz``, ``/metrics`` on the API port
monitor   ``streamrec monitor``            monitor ``metrics_port``
retrain   ``streamrec retrain --schedule`` retrain ``metrics_port``
========  ===============================  ===========================

Every child inherits the environment (so the ``STREAMREC_*`` settings and the
``--config`` file reach it), runs in its own process group (a terminal's Ctrl-C
reaches the supervisor only, which then stops the children in order: the API
first so no request meets a half-stopped pipeline, the ingest workers last so
they commit what they applied), and gets SIGTERM if the supervisor dies
without cleaning up (``PR_SET_PDEATHSIG``). A child that exits on its own is
restarted after a back-off that doubles up to ``backoff_max_s`` (reset after it
stayed up for a minute); with ``restart=False`` the supervisor stops everything
and exits non-zero instead. Output goes to the supervisor's stdout with a
``[role]`` prefix, or to ``<log_dir>/<role>.log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["ROLES", "STOP_ORDER", "Child", "RunSettings", "Supervisor"]

logger = logging.getLogger(__name__)

#: Role -> the CLI command that runs it (after ``python -m streamrec.cli``).
ROLES: dict[str, tuple[str, ...]] = {
    "sessions": ("ingest", "sessions"),
    "archive": ("ingest", "archive"),
    "serve": ("serve",),
    "monitor": ("monitor",),
    "retrain": ("retrain", "--schedule"),
}
#: Shutdown order: stop answering first, stop consuming last.
STOP_ORDER = ("serve", "monitor", "retrain", "archive", "sessions")
_STABLE_S = 60.0  # up this long: the next crash starts the back-off afresh
_PR_SET_PDEATHSIG = 1


class RunSettings(BaseSettings):
    """The single-host supervisor (`streamrec run`)."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_RUN_", frozen=True, extra="forbid")

    roles: Annotated[list[str], NoDecode] = Field(
        list(ROLES),
        description="roles to run, comma-separated or a JSON list: "
        + ", ".join(ROLES),
    )
    grace_s: float = Field(
        30.0, gt=0, le=3600,
        description="after SIGTERM, a child gets this long to drain before SIGKILL",
    )
    restart: bool = Field(
        True, description="restart a child that exits on its own (else stop all and fail)"
    )
    backoff_max_s: float = Field(
        60.0, gt=0, le=3600, description="longest wait before restarting a crashed child"
    )
    log_dir: Path | None = Field(
        None, description="write each role's output to <log_dir>/<role>.log (default: stdout)"
    )

    @field_validator("roles", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            if v.lstrip().startswith("["):
                return json.loads(v)
            return [r.strip() for r in v.split(",") if r.strip()]
        return v

    @field_validator("roles")
    @classmethod
    def _check_roles(cls, v: list[str]) -> list[str]:
        unknown = [r for r in v if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; valid roles: {', '.join(ROLES)}")
        if not v:
            raise ValueError(f"no role given; valid roles: {', '.join(ROLES)}")
        return list(dict.fromkeys(v))


def _term_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One role's process and its restart bookkeeping."""

    role: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None
    pump: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Start, watch, restart and stop one child process per role.

    Args:
        roles: which roles (keys of :data:`ROLES`), in start order.
        settings: grace period, restart policy, log directory.
        env: the children's environment (default: ours).
        argv: role -> full command line, to override :data:`ROLES` (tests, the demo).
        out: where prefixed child output goes when there is no ``log_dir``.
        clock: monotonic seconds (tests).
    """

    def __init__(self, settings: RunSettings, *, env: Mapping[str, str] | None = None,
                 argv: Mapping[str, Sequence[str]] | None = None, out: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.env = dict(os.environ if env is None else env)
        self.out = out or sys.stdout
        self.clock = clock
        self._out_lock = threading.Lock()
        argv = argv or {}
        self.children = {
            role: Child(role, list(argv.get(role) or
                                   [sys.executable, "-m", "streamrec.cli", *ROLES[role]]))
            for role in settings.roles
        }
        self.failed: str | None = None  # why the supervisor gave up (restart=False)

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        for child in self.children.values():
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        log_dir = self.settings.log_dir
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(log_dir) / f"{child.role}.log", "ab") as f:
                child.proc = self._popen(child, f)
        else:
            child.proc = self._popen(child, subprocess.PIPE)
            assert child.proc.stdout is not None
            child.pump = threading.Thread(target=self._pump, args=(child.role, child.proc.stdout),
                                          name=f"run-{child.role}-out", daemon=True)
            child.pump.start()
        child.started_at = self.clock()
        child.restart_at = None
        logger.info("run: started %s (pid %d): %s", child.role, child.proc.pid,
                    " ".join(child.argv))

    def _popen(self, child: Child, stdout: int | IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(child.argv, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_term_with_parent)

    def _pump(self, role: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self._out_lock:
                print(f"[{role}] {line}", file=self.out, flush=True)
        stream.close()

    def poll(self) -> None:
        """One supervision step: notice exits, schedule and perform restarts."""
        now = self.clock()
        for child in self.children.values():
            if child.proc is None or child.alive():
                continue
            if child.restart_at is None:  # just noticed
                code = child.proc.returncode
                if not self.settings.restart:
                    self.failed = f"{child.role} exited with status {code}"
                    logger.error("run: %s; stopping everything (restart is off)", self.failed)
                    return
                up = now - child.started_at
                child.backoff_s = 1.0 if up >= _STABLE_S or child.backoff_s == 0 else min(
                    child.backoff_s * 2, self.settings.backoff_max_s)
                child.restart_at = now + child.backoff_s
                logger.warning("run: %s exited with status %s after %.1fs; restarting in %.0fs",
                               child.role, code, up, child.backoff_s)
            elif now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> int:
        """Start every role, supervise until ``stop`` is set (or a child fails with
        ``restart=False``), then stop them all. Returns the exit status (0 or 1)."""
        self.start()
        try:
            while not stop.wait(interval_s):
                self.poll()
                if self.failed:
                    break
        finally:
            self.stop()
        return 1 if self.failed else 0

    def stop(self) -> None:
        """SIGTERM each child in :data:`STOP_ORDER`, wait up to ``grace_s`` for each,
        SIGKILL what is left."""
        order = [r for r in STOP_ORDER if r in self.children]
        for role in order:
            child = self.children[role]
            child.restart_at = None
            if not child.alive():
                continue
            assert child.proc is not None
            logger.info("run: stopping %s (pid %d)", role, child.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(self.settings.grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("run: %s did not stop within %.0fs; killing it", role,
                               self.settings.grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
        for child in self.children.values():
            if child.pump is not None:
                child.pump.join(timeout=5)
