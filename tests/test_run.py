"""``streamrec run``: one process per role, restarts with back-off, ordered graceful stop.

The supervision tests give the roles small Python programs as their command
(the policy does not depend on what the child is); the last tests run the real
roles against the real local stack.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamrec.cli import cli
from streamrec.run import ROLES, STOP_ORDER, RunSettings, Supervisor
from streamrec.settings import SettingsError, load
from streamrec.stack import LocalStack, free_port

# A child that records its SIGTERM (with the time) and exits 0 when told.
_GRACEFUL = """
import signal, sys, time
path, role = sys.argv[1], sys.argv[2]
def bye(*_):
    with open(path, "a") as f:
        f.write(f"{role} {time.monotonic()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print(f"{role} ready", flush=True)
while True:
    time.sleep(0.05)
"""
_STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
            "print('ignoring', flush=True)\nwhile True: time.sleep(0.05)"


def _wait(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_roles_setting_accepts_lists_and_rejects_unknown_roles(monkeypatch) -> None:
    monkeypatch.setenv("STREAMREC_RUN_ROLES", "serve, sessions,serve")
    assert load(RunSettings).roles == ["serve", "sessions"]
    monkeypatch.setenv("STREAMREC_RUN_ROLES", '["archive"]')
    assert load(RunSettings).roles == ["archive"]
    monkeypatch.setenv("STREAMREC_RUN_ROLES", "sessions,scorer")
    with pytest.raises(SettingsError, match=r"unknown role\(s\) \['scorer'\].*valid roles"):
        load(RunSettings)
    assert set(STOP_ORDER) == set(ROLES)


def test_stop_is_ordered_api_first_ingest_last_and_kills_what_ignores_sigterm(
        tmp_path: Path) -> None:
    record = tmp_path / "stopped.txt"
    roles = ["sessions", "archive", "serve", "monitor", "retrain"]
    argv = {r: [sys.executable, "-c", _GRACEFUL, str(record), r] for r in roles}
    argv["monitor"] = [sys.executable, "-c", _STUBBORN]
    out = io.StringIO()
    sup = Supervisor(RunSettings(roles=roles, grace_s=1.0), argv=argv, out=out)
    sup.start()
    try:
        _wait(lambda: out.getvalue().count("ready") == 4 and "ignoring" in out.getvalue())
        pids = {r: c.pid for r, c in sup.children.items()}
    finally:
        t0 = time.monotonic()
        sup.stop()
    stopped = [line.split()[0] for line in record.read_text().splitlines()]
    assert stopped == [r for r in STOP_ORDER if r != "monitor"]
    assert time.monotonic() - t0 >= 1.0  # the stubborn one had its grace period, then SIGKILL
    assert sup.children["monitor"].proc.returncode == -signal.SIGKILL
    assert not any(_alive(p) for p in pids.values())
    assert "[serve] serve ready" in out.getvalue()  # output prefixed by role


def test_a_crashed_child_is_restarted_with_backoff_or_fails_the_run(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    crash = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
             "p.write_text(p.read_text() + 'x' if p.exists() else 'x'); sys.exit(3)")
    argv = {"archive": [sys.executable, "-c", crash, str(counter)]}
    now = [0.0]
    sup = Supervisor(RunSettings(roles=["archive"], backoff_max_s=2.0,
                                 log_dir=tmp_path / "logs"), argv=argv, clock=lambda: now[0])
    sup.start()
    child = sup.children["archive"]
    child.proc.wait(20)
    sup.poll()  # noticed: restart due in 1 s (back-off starts at 1 s)
    assert child.restart_at == 1.0 and counter.read_text() == "x"
    now[0] = 0.9
    sup.poll()
    assert child.restarts == 0
    now[0] = 1.0
    sup.poll()  # due: restarted
    assert child.restarts == 1
    child.proc.wait(20)
    sup.poll()  # crashed again right away: the back-off doubles, capped at backoff_max_s
    assert child.backoff_s == 2.0
    now[0] = 3.0
    sup.poll()
    child.proc.wait(20)
    sup.poll()
    assert child.backoff_s == 2.0 and child.restarts == 2 and counter.read_text() == "xxx"
    now[0] = 100.0  # after a long stable run the back-off starts afresh
    child.started_at = 30.0
    child.restart_at = None
    sup.poll()
    assert child.backoff_s == 1.0
    assert (tmp_path / "logs" / "archive.log").exists()

    # restart off: the first exit stops everything and the run fails
    fail = Supervisor(RunSettings(roles=["archive", "serve"], restart=False, grace_s=1.0),
                      argv={"archive": [sys.executable, "-c", "import sys; sys.exit(5)"],
                            "serve": [sys.executable, "-c", _STUBBORN]}, out=io.StringIO())
    stop = threading.Event()
    assert fail.run(stop, interval_s=0.05) == 1
    assert fail.failed == "archive exited with status 5"
    assert not fail.children["serve"].alive()


def test_run_command_needs_kafka_and_redis_and_has_help(tmp_path: Path, monkeypatch) -> None:
    for k in list(os.environ):
        if k.startswith("STREAMREC_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("STREAMREC_STACK_STATE_DIR", str(tmp_path))  # no `streamrec up` there
    runner = CliRunner()
    result = runner.invoke(cli, ["run", "--role", "sessions"])
    assert result.exit_code == 2 and "need Kafka and/or Redis" in result.output
    assert runner.invoke(cli, ["run", "--help"]).exit_code == 0


@pytest.mark.skipif(
    bool(os.environ.get("STREAMREC_REDIS_URL") or os.environ.get("STREAMREC_KAFKA_BOOTSTRAP")),
    reason="uses the fixture's embedded stack",
)
def test_real_roles_serve_metrics_and_stop_on_sigterm_or_die_with_the_supervisor(
        stack: LocalStack, tmp_path: Path) -> None:
    ports = {"sessions": free_port(), "serve": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(stack.env())
    env.update({
        "STREAMREC_INGEST_SESSIONS_METRICS_PORT": str(ports["sessions"]),
        "STREAMREC_SERVING_PORT": str(ports["serve"]),
        "STREAMREC_SERVING_HOST": "127.0.0.1",
        "STREAMREC_SERVING_MODELS_ROOT": str(tmp_path / "models"),
        "STREAMREC_INGEST_SESSIONS_GROUP": f"run-test-{time.time_ns()}",
        "OMP_NUM_THREADS": "1",
    })

    def start(*roles: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "streamrec.cli", "run", *(f"--role={r}" for r in roles)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)

    def up(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def children(pid: int) -> list[int]:
        kids = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(p))
                except (OSError, IndexError, ValueError):
                    continue
        return kids

    def ready(*urls: str) -> None:
        try:
            _wait(lambda: all(up(u) for u in urls), timeout=90)
        except AssertionError:
            sup.kill()
            raise AssertionError(sup.communicate()[0][-3000:]) from None

    sup = start("sessions", "serve")
    try:
        ready(f"http://127.0.0.1:{ports['sessions']}/metrics",
              f"http://127.0.0.1:{ports['serve']}/healthz")
        kids = children(sup.pid)
        assert len(kids) == 2
        sup.send_signal(signal.SIGTERM)
        out, _ = sup.communicate(timeout=60)
        assert sup.returncode == 0, out
        assert not any(_alive(p) for p in kids)
        assert "[sessions]" in out and "[serve]" in out
    finally:
        if sup.poll() is None:
            sup.kill()

    # kill -9 of the supervisor: the children get SIGTERM from the kernel and exit
    sup = start("sessions")
    try:
        ready(f"http://127.0.0.1:{ports['sessions']}/metrics")
        kids = children(sup.pid)
        assert len(kids) == 1
        sup.kill()
        sup.wait(10)
        _wait(lambda: not any(_alive(p) for p in kids), timeout=60)
    finally:
        if sup.poll() is None:
            sup.kill()
        sup.communicate()
