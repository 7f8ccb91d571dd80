"""``make demo`` / ``streamrec demo``: the whole loop on the embedded stack, narrated.

1. The local stack: a real Valkey server and a real Kafka-compatible broker.
2. The services as ``streamrec run`` starts them, one process per role
   (:class:`streamrec.run.Supervisor`): session updater, archiver, API server,
   drift monitor; logs in ``<out>/logs``.
3. A simulated history (``--history-hours`` of clicks, with a few malformed
   messages that end in the dead-letter topic) produced as fast as possible.
4. A first model bootstrapped from the archived history by ``streamrec retrain
   --once`` (no champion yet: it trains one from scratch and promotes it).
5. The retrain scheduler joins (every minute, and on drift alarms).
6. Live clicks paced at ``--speedup`` x event time, stamped with the wall
   clock. Before each click of a session, the demo asks the API for that
   session's recommendations (as a client would), so the monitor scores every
   click against what was shown. Half-way (``--drift-after``) the simulated
   world changes abruptly: popularity and item-to-item transitions are redrawn.
   Online HR@10 drops, the retrainer fine-tunes on the recent window and
   promotes, and HR@10 recovers.
7. The summary (online HR@10 before the drift, after it, after retraining; the
   versions promoted) and a PNG of online HR@10 over time with the drift and
   the retrains marked (``<out>/online_hr.png``).

Ctrl-C at any point stops everything in order and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import os
import shutil
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from ingest.settings import KafkaSettings, RedisSettings
from streamrec.run import RunSettings, Supervisor
from streamrec.settings import StackSettings, load
from streamrec.signals import stop_on_signal
from streamrec.stack import LocalStack, free_port

# A few messages a real producer might get wrong: each ends in the DLQ.
_MALFORMED = [
    b"{not json",
    b'{"event_id":"bad-1","session_id":"s1","item_id":"i1","ts":1704067200}',  # ts in seconds
    b'{"event_id":"bad-2","session_id":"s1","ts":1704067200000}',  # no item_id
    b'{"event_id":"bad-3","session_id":"s1","item_id":"i1","ts":1704067200000,"event_type":"hover"}',
]
_K = 10  # the k of the online HR@k shown
_TIMELINE_S = 2.0  # the monitor's timeline interval in the demo


class DemoStopped(Exception):
    """Ctrl-C (or SIGTERM) during the demo."""


@dataclass(frozen=True)
class DemoConfig:
    history_hours: float = 2.0
    live_seconds: float = 240.0
    drift_after_s: float = 80.0
    speedup: float = 30.0
    sessions_per_hour: float = 600.0
    n_items: int = 200
    seed: int = 7
    out: Path = Path(".streamrec/demo")
    port: int = 8000
    retrain_schedule: str = "* * * * *"
    linger: bool = False

    @property
    def drift_at_hours(self) -> float:  # simulator time of the drift, hours from its start
        return self.history_hours + self.drift_after_s * self.speedup / 3600


@dataclass
class Ports:
    sessions: int = field(default_factory=free_port)
    archive: int = field(default_factory=free_port)
    monitor: int = field(default_factory=free_port)
    retrain: int = field(default_factory=free_port)
    api: int = 0


# ------------------------------------------------------------------------ small clients
def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on a metrics endpoint; {} when down."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def total(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items()
               if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


class Api:
    """A tiny keep-alive JSON client of the API, one connection per thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._local = threading.local()

    def post(self, path: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                     timeout=10)
            try:
                conn.request("POST", path, json.dumps(body),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, json.loads(data) if data else None
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None
        except OSError:
            return 0, None


# ------------------------------------------------------------------------ the demo
class Demo:
    def __init__(self, cfg: DemoConfig, stop: threading.Event) -> None:
        self.cfg, self.stop = cfg, stop
        self.out = cfg.out.resolve()
        self.ports = Ports()
        self.t0 = time.time()
        self.live_start: float | None = None
        self.drift_wall: float | None = None
        self.answers: dict[str, dict[str, Any]] = {}  # session -> last response
        self.answered = deque[str](maxlen=100)  # sessions answered, latest last
        self.sent = 0
        self.requests = deque[float](maxlen=2000)
        self.errors = 0

    # -- helpers -------------------------------------------------------------------
    def say(self, text: str) -> None:
        click.echo(text)

    def check(self) -> None:
        if self.stop.is_set():
            raise DemoStopped

    def wait_for(self, what: str, cond: Any, timeout: float, every: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.check()
            if time.monotonic() > deadline:
                raise click.ClickException(f"timed out after {timeout:.0f}s waiting for {what}; "
                                           f"the services' logs are in {self.out / 'logs'}")
            self.stop.wait(every)

    def env(self, stack: LocalStack) -> dict[str, str]:
        o, p = self.out, self.ports
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
        env.update(stack.env())
        env.update({
            "OMP_NUM_THREADS": "1",
            "STREAMREC_LOG_LEVEL": "INFO",
            "STREAMREC_INGEST_ARCHIVE_ROOT": str(o / "archive"),
            "STREAMREC_INGEST_ARCHIVE_MAX_AGE_S": "2",
            "STREAMREC_INGEST_SESSIONS_METRICS_PORT": str(p.sessions),
            "STREAMREC_INGEST_ARCHIVE_METRICS_PORT": str(p.archive),
            "STREAMREC_SERVING_HOST": "127.0.0.1",
            "STREAMREC_SERVING_PORT": str(p.api),
            "STREAMREC_SERVING_MODELS_ROOT": str(o / "models"),
            "STREAMREC_MONITOR_METRICS_PORT": str(p.monitor),
            "STREAMREC_MONITOR_METRIC_WINDOW": "300",
            "STREAMREC_MONITOR_TIMELINE_INTERVAL_S": str(_TIMELINE_S),
            "STREAMREC_MONITOR_PH_MIN_SAMPLES": "150",
            "STREAMREC_RETRAIN_ARCHIVE_ROOT": str(o / "archive"),
            "STREAMREC_RETRAIN_MODELS_ROOT": str(o / "models"),
            "STREAMREC_RETRAIN_STATE_DIR": str(o / "retrain"),
            "STREAMREC_RETRAIN_METRICS_PORT": str(p.retrain),
            "STREAMREC_RETRAIN_SCHEDULE": self.cfg.retrain_schedule,
            "STREAMREC_RETRAIN_WINDOW_HOURS": "0.04",
            "STREAMREC_RETRAIN_REPLAY_HOURS": "0.5",
            "STREAMREC_RETRAIN_REPLAY_SHARE": "0.1",
            "STREAMREC_RETRAIN_LAG_S": "3",
            "STREAMREC_RETRAIN_MIN_SESSIONS": "60",
            "STREAMREC_RETRAIN_EPOCHS": "10",
            "STREAMREC_RETRAIN_LR": "0.01",
            "STREAMREC_RETRAIN_BATCH_SIZE": "64",
            "STREAMREC_RETRAIN_COOLDOWN_S": "45",
            "STREAMREC_RETRAIN_MODEL_CONFIG_FILE": str(o / "model.json"),
            "STREAMREC_RETRAIN_BOOTSTRAP_EPOCHS": "12",
            "STREAMREC_RETRAIN_BOOTSTRAP_LR": "0.01",
            "STREAMREC_RETRAIN_PROGRESS": "false",
            "STREAMREC_RETRAIN_DEVICE": "cpu",
        })
        return env

    # -- the run -------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        if self.out.exists():  # every demo starts from nothing
            shutil.rmtree(self.out)
        (self.out / "logs").mkdir(parents=True)
        (self.out / "model.json").write_text(json.dumps({"block": {
            "name": "gru", "d_model": 64, "n_layers": 1, "max_len": 20, "dropout": 0.0}}))
        self.ports.api = cfg.port if cfg.port and _port_free(cfg.port) else free_port()
        self.say("== streamrec demo: the whole loop on this machine ==")
        self.say("1. local stack: a real Valkey server and a real Kafka-compatible broker")
        with LocalStack(load(StackSettings), load(KafkaSettings), load(RedisSettings),
                        state_dir=self.out / "stack") as stack:
            for k, v in stack.env().items():
                self.say(f"   {k}={v}")
            env = self.env(stack)
            sup = Supervisor(RunSettings(roles=["sessions", "archive", "serve", "monitor",
                                                "retrain"], grace_s=20,
                                         log_dir=self.out / "logs"), env=env)
            retrain = sup.children.pop("retrain")  # joins once there is a first model
            try:
                self._services(sup)
                self._history(stack)
                self._bootstrap(env)
                sup.children["retrain"] = retrain
                sup._spawn(retrain)
                self.say(f"5. retrain scheduler: cron {cfg.retrain_schedule!r} (UTC) and drift "
                         "alarms; each run fine-tunes the champion on the last 2.4 minutes of "
                         "the archive and promotes it if not worse on the newest slice")
                self._live(stack, sup)
                if cfg.linger:
                    self.say(f"the services keep running: open http://127.0.0.1:{self.ports.api}/ "
                             "and click around; Ctrl-C stops everything")
                    while not self.stop.wait(1.0):
                        sup.poll()
            except DemoStopped:
                self.say("\nCtrl-C: stopping")
            finally:
                self._finish(stack)
                self.say("stopping the services (API first, ingest last) and the stack")
                sup.stop()
        self.say("stopped cleanly")

    def _services(self, sup: Supervisor) -> None:
        p = self.ports
        self.say("2. services, one process per role as `streamrec run` starts them "
                 f"(logs: {self.out / 'logs'})")
        sup.start()
        self.wait_for("the services to start", lambda: all(
            scrape(port) for port in (p.sessions, p.archive, p.monitor))
            and Api(p.api).get("/healthz")[0] == 200, timeout=180)
        self.say(f"   demo page   http://127.0.0.1:{p.api}/   (API docs: /docs)")
        self.say(f"   metrics     API http://127.0.0.1:{p.api}/metrics, session updater :{p.sessions}"
                 f", archiver :{p.archive}, drift monitor :{p.monitor}, retrainer :{p.retrain}")
        self.say("   dashboards  deploy/grafana (Prometheus rules: deploy/prometheus); "
                 "`docker compose -f deploy/compose.yaml up` runs them with Grafana")

    def _simulator(self) -> Iterator[dict[str, Any]]:
        from ingest.simulator import Simulator, SimulatorConfig

        cfg = self.cfg
        start_ms = int((self.t0 - cfg.history_hours * 3600) * 1000)
        return Simulator(SimulatorConfig(
            seed=cfg.seed, n_items=cfg.n_items, n_topics=10, sessions_per_hour=cfg.sessions_per_hour,
            p_follow=0.75, p_topic=0.15, start_ms=start_ms, duration_hours=None,
            drift="abrupt", drift_at=cfg.drift_at_hours)).events()

    def _history(self, stack: LocalStack) -> None:
        from ingest.kafka import make_producer
        from ingest.replay import send_events

        cfg, p = self.cfg, self.ports
        self.events = self._simulator()
        now_ms = int(self.t0 * 1000)
        history: list[dict[str, Any]] = []
        for ev in self.events:
            if ev["ts"] >= now_ms:
                self.first_live = ev
                break
            history.append(ev)
        self.say(f"3. history: {len(history):,} simulated clicks of the last "
                 f"{cfg.history_hours:g} h into {stack.kafka.events_topic}, as fast as possible, "
                 f"with {len(_MALFORMED)} malformed messages mixed in")
        self.producer = make_producer(stack.kafka)
        send_events(history, self.producer, stack.kafka.events_topic, progress=False)
        for raw in _MALFORMED:
            self.producer.produce(stack.kafka.events_topic, raw, key=b"s1")
        self.producer.flush(30)
        n = len(history) + len(_MALFORMED)
        self.wait_for("the session updater", lambda: total(
            scrape(p.sessions), "streamrec_ingest_events_consumed_total") >= n, timeout=180)
        self.wait_for("the archiver", lambda: total(
            scrape(p.archive), "streamrec_ingest_events_applied_total") >= len(history), timeout=120)
        self._show_ingest()

    def _show_ingest(self) -> None:
        s, a = scrape(self.ports.sessions), scrape(self.ports.archive)
        self.say(f"   session updater: consumed "
                 f"{total(s, 'streamrec_ingest_events_consumed_total'):,.0f}, applied "
                 f"{total(s, 'streamrec_ingest_events_applied_total'):,.0f}, duplicates "
                 f"{total(s, 'streamrec_ingest_events_duplicate_total'):,.0f}, dead-lettered "
                 f"{total(s, 'streamrec_ingest_events_dead_lettered_total'):,.0f}; archiver wrote "
                 f"{total(a, 'streamrec_ingest_events_applied_total'):,.0f}")

    def _bootstrap(self, env: dict[str, str]) -> None:
        import subprocess

        self.say("4. first model: `streamrec retrain --once` finds no champion and bootstraps "
                 "one from the archived history (a GRU, trained from scratch on CPU)")
        boot = dict(env, STREAMREC_RETRAIN_WINDOW_HOURS=str(self.cfg.history_hours + 0.2),
                    STREAMREC_RETRAIN_LAG_S="0")
        for attempt in range(3):  # the archiver may still hold the last events in its buffer
            self.check()
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "retrain",
                 "--once"], env=boot, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True)
            try:
                while proc.poll() is None:
                    if self.stop.wait(0.5):
                        proc.terminate()
                        proc.wait(30)
                        raise DemoStopped
            finally:
                if proc.poll() is None:
                    proc.kill()
            out = (proc.stdout.read() if proc.stdout else "").strip()
            (self.out / "logs" / "bootstrap.log").write_text(out)
            last = out.splitlines()[-1] if out else ""
            if last.startswith("promoted"):
                run = self._runs()[-1]
                m = run.get("metrics", {}).get("challenger", {})
                self.say(f"   {last}; held-out NDCG@10 {m.get('ndcg@10', 0):.3f}, "
                         f"HR@10 {m.get('hr@10', 0):.3f} (offline, full catalogue)")
                break
            if attempt == 2 or not last.startswith("skipped"):
                raise click.ClickException(f"bootstrap failed: {last or out[-500:]}")
            self.stop.wait(3)
        api = Api(self.ports.api)
        self.wait_for("the server to load the first model",
                      lambda: (api.get("/readyz")[0] == 200), timeout=60)

    def _runs(self) -> list[dict[str, Any]]:
        runs = []
        for f in sorted((self.out / "retrain" / "runs").glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                runs.append(json.loads(f.read_text()))
        return sorted(runs, key=lambda r: r.get("started_at", 0))

    # -- live ----------------------------------------------------------------------
    def _live(self, stack: LocalStack, sup: Supervisor) -> None:
        cfg = self.cfg
        self.say(f"6. live clicks for {cfg.live_seconds:.0f}s at {cfg.speedup:g}x event time "
                 f"(~{cfg.sessions_per_hour * 8 * cfg.speedup / 3600:.0f} clicks/s); before each "
                 "click the demo asks the API what to show that session, and the monitor scores "
                 f"the click against it. The world drifts {cfg.drift_after_s:.0f}s in.")
        topic = stack.kafka.events_topic
        encode = msgspec.json.Encoder().encode
        api = Api(self.ports.api)
        seen: set[str] = set()
        ts0 = self.first_live["ts"]  # simulator time: the drift is at drift_ms
        drift_ms = int(self.t0 * 1000 + cfg.drift_after_s * cfg.speedup * 1000)
        self.live_start = wall0 = time.time()
        next_report = wall0 + 10
        pool = ThreadPoolExecutor(8, thread_name_prefix="demo-client")

        def click_(ev: dict[str, Any], ask: bool) -> None:
            sid = ev["session_id"]
            if ask:
                try:
                    status, body = api.post("/v1/recommendations", {"session_id": sid, "k": _K})
                    self.requests.append(time.time())
                    if status == 200:
                        self.answers[sid] = body
                        self.answered.append(sid)
                    else:
                        self.errors += 1
                except OSError:
                    self.errors += 1
            ev = {**ev, "ts": int(time.time() * 1000)}
            self.producer.produce(topic, encode(ev), key=sid.encode())

        try:
            for ev in itertools.chain([self.first_live], self.events):
                self.check()
                due = wall0 + (ev["ts"] - ts0) / 1000 / cfg.speedup
                if due - wall0 > cfg.live_seconds:
                    break
                while (delay := due - time.time()) > 0:
                    if self.stop.wait(min(delay, 0.5)):
                        raise DemoStopped
                if self.drift_wall is None and ev["ts"] >= drift_ms:
                    self.drift_wall = time.time()
                    self.say(f"   -- t={self.drift_wall - wall0:5.0f}s: the world drifts now "
                             "(popularity and item transitions redrawn) --")
                sid = ev["session_id"]
                pool.submit(click_, ev, sid in seen)
                seen.add(sid)
                self.sent += 1
                if time.time() >= next_report:
                    next_report += 10
                    sup.poll()
                    self._report(wall0, list(dict.fromkeys(reversed(self.answered)))[:2])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.producer.flush(30)

    def _timeline(self) -> list[dict[str, Any]]:
        code, body = Api(self.ports.api).get("/v1/timeline")
        return body["entries"] if code == 200 and isinstance(body, dict) else []

    def _report(self, wall0: float, watched: list[str]) -> None:
        now = time.time()
        points = [e for e in self._timeline() if e.get("kind") == "point"]
        hr = interval_hr(points, since=now - 20)
        rate = sum(1 for t in self.requests if t > now - 10) / 10
        hr_s = "-" if hr is None else f"{hr:.3f}"
        champion = points[-1]["model_version"] if points else None
        self.say(f"   t={now - wall0:5.0f}s  clicks sent {self.sent:,}  requests {rate:4.1f}/s  "
                 f"online HR@{_K} (last 20s) {hr_s}  champion {champion}")
        for run in self._runs():
            if run.get("run_id") in getattr(self, "_told", set()):
                continue
            self._told = getattr(self, "_told", set()) | {run.get("run_id")}
            d = run.get("decision") or {}
            detail = (f"challenger {d['metric']} {d['challenger']:.3f} vs champion "
                      f"{d['champion']:.3f}" if d else run.get("reason", ""))
            self.say(f"   retrain {run.get('run_id')} ({run.get('trigger')}): "
                     f"{run.get('outcome')} ({run.get('reason')}) {detail}")
        for sid in watched:
            ans = self.answers.get(sid)
            code, body = Api(self.ports.api).get(f"/v1/sessions/{sid}?limit=4")
            events = body.get("events", []) if code == 200 and isinstance(body, dict) else []
            trail = " -> ".join(e.get("item_id", "?") for e in events[-4:]) or "(none yet)"
            recs = ", ".join(i["item_id"] for i in (ans or {}).get("items", [])[:5]) or "-"
            by = (ans or {}).get("model_version") or (ans or {}).get("fallback") or "-"
            self.say(f"     session {sid}: {trail}  => last shown {recs} (by {by})")

    # -- the end -------------------------------------------------------------------
    def _finish(self, stack: LocalStack) -> None:
        if self.live_start is None:
            return
        with contextlib.suppress(Exception):
            self.producer.flush(10)
        time.sleep(3)  # the monitor's last timeline point
        timeline = self._timeline()
        points = [e for e in timeline if e.get("kind") == "point"]
        runs = self._runs()
        promoted = [r for r in runs if r.get("outcome") == "promoted"]
        self.say("7. summary")
        self._show_ingest()
        for line in summarize(points, self.live_start, self.drift_wall, time.time()):
            self.say("   " + line)
        self.say("   versions promoted: " + (", ".join(
            f"{r['version']} ({r['trigger']}, {r['reason']})" for r in promoted) or "none"))
        from streamrec.demo_plot import plot_online_hr

        path = self.out / "online_hr.png"
        if plot_online_hr(points, runs, self.drift_wall, self.live_start, path, k=_K):
            self.say(f"   plot: {path}")
        (self.out / "timeline.json").write_text(json.dumps(timeline))


def summarize(points: list[dict[str, Any]], start: float, drift: float | None,
              end: float, window_s: float = 20.0) -> list[str]:
    """The demo's verdict from the monitor's timeline: online HR@k before the drift, its low
    point after it (over ``window_s`` windows), at the end, and how long it took to get back to
    90% of the level before the drift."""
    from streamrec.demo_plot import hr_series

    span = max(1, round(window_s / _TIMELINE_S))
    before = interval_hr([p for p in points if start <= p["ts"] <= (drift or end)])
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"online HR@{_K} before the drift: {fmt(before)}"]
    if drift is None:
        return lines
    ts, hr = hr_series([p for p in points if p["ts"] >= drift], span=span)
    if not ts:
        return lines
    low = min(range(len(hr)), key=hr.__getitem__)
    lines.append(f"online HR@{_K} at its lowest after the drift ({window_s:.0f}s windows): "
                 f"{hr[low]:.3f}, {ts[low] - drift:.0f}s after it")
    last = interval_hr(points, since=end - 30)
    lines.append(f"online HR@{_K} over the last 30s: {fmt(last)}")
    if before:
        back = next((t for t, v in zip(ts[low:], hr[low:], strict=True) if v >= 0.9 * before),
                    None)
        lines.append("back to 90% of the level before the drift: " + (
            f"{back - drift:.0f}s after the drift" if back else "not within the demo"))
    return lines


def interval_hr(points: list[dict[str, Any]], since: float | None = None) -> float | None:
    """Online HR of the model answers between the first and last point (``since``: from the
    last point before it): the ratio of the differences of the cumulative counts."""
    pts = [p for p in points if p.get("scored") is not None]
    if since is not None:
        before = [p for p in pts if p["ts"] <= since]
        pts = ([before[-1]] if before else []) + [p for p in pts if p["ts"] > since]
    if len(pts) < 2:
        return None
    scored = pts[-1]["scored"] - pts[0]["scored"]
    return (pts[-1]["hits"] - pts[0]["hits"]) / scored if scored > 0 else None


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_demo(cfg: DemoConfig) -> None:
    # The narration says what starts and stops; their INFO lines would only repeat it.
    for name in ("streamrec.stack", "streamrec.run"):
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    with stop_on_signal() as stop:
        Demo(cfg, stop).run()
