"""A live streamrec pipeline scraped by a real Prometheus, for the observability tests.

What :class:`LivePipeline` starts, each as a real process through the CLI and
configured by ``STREAMREC_*`` environment variables:

- ``streamrec ingest sessions`` and ``streamrec ingest archive`` (the archive
  flushes after one second);
- ``streamrec serve`` with a tiny SASRec champion trained here on the first
  half hour of a simulated hour of clicks and published to a fresh registry;
- ``streamrec monitor`` (its item alarms held back until the history has been
  read, so that they fire on live traffic, after the archive holds the
  history);
- ``streamrec retrain --schedule`` with a cron that does not fire during the
  test: its run is started by the monitor's drift alarm on Redis, reads the
  archived hour, fine-tunes and (margin 1) promotes; the server hot-swaps;
- Prometheus (``/usr/bin/prometheus``) scraping the five metrics endpoints
  every second with the job names of ``deploy/prometheus/prometheus.yml`` and
  evaluating the repository's rule files.

Traffic: the simulated hour is sent to the topic as fast as the broker takes
it, with duplicates and six malformed messages (six dead-letter reasons), then
a background thread keeps live sessions going until the pipeline stops: each
round sends the next click of a dozen sessions with wall-clock timestamps
(mostly through the Kafka producer, every third round through
``POST /v1/events``), waits until the session store has them, asks
``POST /v1/recommendations`` for each of those sessions (so the monitor scores
the next click against the answer), asks for an unknown session (a popularity
fallback), and now and then sends a malformed message. One burst of
concurrent requests against a short queue is shed with 503s.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pyarrow as pa
import redis

from ingest.kafka import ensure_topics, make_producer
from ingest.replay import EVENT_SCHEMA, send_events
from ingest.settings import KafkaSettings
from ingest.simulator import Simulator, SimulatorConfig
from ingest.store import SessionStore, StoreConfig
from streamrec.stack import LocalStack

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
HOUR_MS = 3_600_000
PROMETHEUS = "/usr/bin/prometheus"

#: job name -> which process it scrapes (the names of deploy/prometheus/prometheus.yml)
JOBS = {
    "streamrec-sessions": "sessions",
    "streamrec-archive": "archive",
    "streamrec-serving": "serving",
    "streamrec-monitor": "monitor",
    "streamrec-retrain": "retrain",
}

# The simulated world: a small catalogue with new items arriving, so live
# traffic carries items the champion never saw (OOV) and drifts from its
# training half hour.
SIMULATION = {"seed": 11, "n_items": 60, "n_topics": 4, "n_successors": 3,
              "sessions_per_hour": 300.0, "mean_session_length": 4.0, "mean_gap_s": 20.0,
              "p_follow": 0.7, "p_topic": 0.2, "new_items_per_hour": 40.0}
LIVE_SESSIONS = 12  # sessions advanced per traffic round
DUPLICATES = 15  # history messages sent twice (a producer retry)



def _malformed(now_ms: int) -> list[tuple[str, bytes, bytes]]:
    """(dead-letter reason, key, value) of six broken messages (docs/events.md)."""
    good = {"event_id": f"bad-{uuid.uuid4().hex[:8]}", "session_id": "s-bad", "item_id": "i1",
            "ts": now_ms}
    enc = msgspec.json.encode
    return [
        ("invalid_json", b"s-bad", b"{not json"),
        ("missing_field", b"s-bad", enc({k: v for k, v in good.items() if k != "item_id"})),
        ("wrong_type", b"s-bad", enc({**good, "ts": str(now_ms)})),
        ("ts_too_old", b"s-bad", enc({**good, "ts": now_ms // 1000})),
        ("invalid_event_type", b"s-bad", enc({**good, "event_type": "hover"})),
        ("key_mismatch", b"someone-else", enc(good)),
    ]


def free_port() -> int:
    """A TCP port free right now on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2,
             alive: Callable[[], str | None] = lambda: None) -> Any:
    """Poll ``check`` until it returns something truthy; ``alive`` names a dead process."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        dead = alive()
        if dead:
            raise RuntimeError(f"waiting for {what}: {dead}")
        try:
            value = check()
            if value:
                return value
        except (OSError, httpx.HTTPError, redis.RedisError) as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s" + (f" (last error: {last})"
                                                               if last else ""))


class Process:
    """A child process whose output goes to a log file; stopped by SIGTERM, then SIGKILL."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(list(args), env=env, stdout=out,
                                          stderr=subprocess.STDOUT, cwd=log_dir,
                                          preexec_fn=_die_with_parent)

    def dead(self) -> str | None:
        code = self.popen.poll()
        return None if code is None else f"{self.name} exited with {code}:\n{self.tail()}"

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; waits for the exit either way."""
        self.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# -------------------------------------------------------------------------- the world


@dataclass
class World:
    """The simulated clicks split at ``now_ms``: the past hour and the live pool."""

    now_ms: int
    history: list[dict[str, Any]]
    live: dict[str, list[dict[str, Any]]]  # session -> its clicks after now, in order
    history_counts: Counter[str] = field(default_factory=Counter)  # session -> stored clicks


def simulate(now_ms: int) -> World:
    cfg = SimulatorConfig(**SIMULATION, start_ms=now_ms - HOUR_MS, duration_hours=2.0)
    history, live = [], defaultdict(list)
    for ev in Simulator(cfg).events():
        if ev["ts"] < now_ms:
            history.append(ev)
        else:
            live[ev["session_id"]].append(ev)
    return World(now_ms, history, dict(live), Counter(e["session_id"] for e in history))


def train_champion(world: World, directory: Path) -> str:
    """A tiny SASRec fitted on the first half hour of the history; published and promoted."""
    import torch

    from features.schema import Feature, Kind, Schema, Tag
    from features.sequences import write_sequences
    from features.workflow import Workflow
    from model.checkpoint import save_checkpoint
    from model.data import Sequences
    from model.drift import SESSION_LENGTHS_INFO_KEY, length_counts
    from model.model import ModelConfig, SessionModel
    from model.registry import ModelRegistry
    from model.trainer import TrainConfig, Trainer

    cut = world.now_ms - HOUR_MS // 2
    rows = [e for e in world.history if e["ts"] < cut]
    table = pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)
    schema = Schema([
        Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID}, transform={"op": "categorify"}),
        Feature("category", Kind.CATEGORICAL, tags={Tag.ITEM_FEATURE},
                transform={"op": "categorify"}),
    ])
    wf = Workflow(schema, max_len=12).fit(table)
    write_sequences(table, wf, directory / "train.parquet", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = SessionModel(wf.schema, ModelConfig.from_dict(
            {"block": {"name": "sasrec", "d_model": 16, "n_heads": 2, "n_layers": 1,
                       "max_len": 12}}))
        Trainer(model, TrainConfig(epochs=3, lr=5e-3, batch_size=64, progress=False),
                Sequences.from_parquet(directory / "train.parquet")).fit()
    finally:
        torch.set_num_threads(threads)
    lengths = Counter(e["session_id"] for e in rows).values()
    saved = save_checkpoint(directory / "champion", model, wf,
                            info={SESSION_LENGTHS_INFO_KEY: length_counts(lengths)})
    registry = ModelRegistry(directory / "models")
    name = registry.publish(saved, name="v0-champion")
    registry.promote(name)
    return name


# -------------------------------------------------------------------------- Prometheus


def prometheus_config(ports: dict[str, int], rule_files: Sequence[Path]) -> dict[str, Any]:
    """Scrape every second, evaluate rules every second (JSON is valid YAML)."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{ports[role]}"]}]}
            for job, role in JOBS.items()
        ],
    }


class Prometheus:
    """The HTTP API of a running Prometheus."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def get(self, path: str, **params: Any) -> Any:
        r = self.http.get(path, params=params)
        doc = r.json()
        if doc.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> Any:
        return self.get("/api/v1/query_range", query=expr, start=start, end=end, step=step)

    def ready(self) -> bool:
        return self.http.get("/-/ready").status_code == 200

    def targets_up(self) -> dict[str, str]:
        """job -> health of its (only) target."""
        active = self.get("/api/v1/targets", state="active")["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active}

    def close(self) -> None:
        self.http.close()


class PrometheusError(RuntimeError):
    pass


def finite_samples(data: dict[str, Any]) -> int:
    """Samples of an instant-query result whose value is a finite number."""
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        values = [result[1]]
    elif kind == "vector":
        values = [s["value"][1] for s in result]
    elif kind == "matrix":
        values = [v[1] for s in result for v in s["values"]]
    else:
        return 0
    return sum(1 for v in values if v not in ("NaN", "+Inf", "-Inf"))


# -------------------------------------------------------------------------- the pipeline


class LivePipeline:
    """Everything above, started by ``__enter__`` and stopped (no orphans) by ``__exit__``."""

    def __init__(self, stack: LocalStack, root: Path):
        self.stack = stack
        self.root = root
        uid = uuid.uuid4().hex[:8]
        self.uid = uid
        self.topic, self.dlq = f"obs-{uid}.events", f"obs-{uid}.dlq"
        self.prefix = f"obs{uid}"
        self.alarm_channel = f"obs-{uid}:drift-alarm"
        self.notify_channel = f"obs-{uid}:models"
        self.ports = {role: free_port() for role in (*JOBS.values(), "prometheus")}
        self.processes: dict[str, Process] = {}
        self.prometheus_process: Process | None = None
        self.prometheus: Prometheus | None = None
        self.serving_url = f"http://127.0.0.1:{self.ports['serving']}"
        self.kafka: KafkaSettings = stack.kafka.model_copy(
            update={"events_topic": self.topic, "dlq_topic": self.dlq, "partitions": 2})
        self.redis = redis.Redis.from_url(stack.redis.url or "", socket_timeout=5)
        self.store = SessionStore(self.redis, StoreConfig(prefix=self.prefix))
        self.world: World | None = None
        self.champion = ""
        self.started_at = time.time()
        self.traffic: Traffic | None = None
        self.timings: dict[str, float] = {}
        self._t0 = time.monotonic()

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> LivePipeline:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _mark(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self._t0, 1)
        logger.info("observability pipeline: %s after %.1fs", what, self.timings[what])

    def _start(self) -> None:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.prometheus_process = self._start_prometheus()
        ensure_topics(self.kafka)
        self.world = simulate(int(time.time() * 1000))
        env = self.env()
        cli = [sys.executable, "-m", "streamrec.cli"]
        for name, args in (
            ("sessions", ["ingest", "sessions"]),
            ("archive", ["ingest", "archive"]),
            ("serving", ["serve"]),
            ("monitor", ["monitor"]),
            ("retrain", ["retrain", "--schedule", "0 0 1 1 *"]),  # cron: not during the test
        ):
            self.processes[name] = Process(name, [*cli, *args], env, self.root / "logs")
        # While they start (importing torch takes seconds): the champion they wait for.
        self.champion = train_champion(self.world, self.root)
        self._mark("champion trained")
        self._wait_ready()
        self._mark("processes ready")
        self._send_history()
        self._mark("history ingested and archived")
        self.traffic = Traffic(self)
        self.traffic.start()

    def close(self) -> None:
        try:
            if self.traffic is not None:
                self.traffic.stop()
        finally:
            procs = [*self.processes.values(), *filter(None, [self.prometheus_process])]
            for proc in procs:  # all at once: they shut down in parallel
                proc.terminate()
            for proc in procs:
                proc.stop()
            if self.prometheus is not None:
                self.prometheus.close()
            self.redis.close()

    def dead(self) -> str | None:
        """The first process that exited, with its log's tail."""
        procs = [*self.processes.values(), *filter(None, [self.prometheus_process])]
        return next((d for p in procs if (d := p.dead())), None)

    # -- processes --------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Settings of every streamrec process (one set: each reads its own section)."""
        p = self.ports
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
        env.update(self.stack.env())
        models = str(self.root / "models")
        world = self.world
        assert world is not None
        # The monitor's item alarms wait for this many items: the whole history
        # (duplicates included) plus a few live clicks.
        history_items = len(world.history) + DUPLICATES
        env.update({
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "STREAMREC_LOG_LEVEL": "INFO",
            "STREAMREC_KAFKA_EVENTS_TOPIC": self.topic, "STREAMREC_KAFKA_DLQ_TOPIC": self.dlq,
            "STREAMREC_KAFKA_PARTITIONS": "2",
            "STREAMREC_REDIS_KEY_PREFIX": self.prefix,
            # ingest
            "STREAMREC_INGEST_SESSIONS_GROUP": f"obs-{self.uid}-sessions",
            "STREAMREC_INGEST_ARCHIVE_GROUP": f"obs-{self.uid}-archive",
            "STREAMREC_INGEST_POLL_TIMEOUT_S": "0.2",
            "STREAMREC_INGEST_ARCHIVE_ROOT": str(self.root / "archive"),
            "STREAMREC_INGEST_ARCHIVE_MAX_AGE_S": "1",
            "STREAMREC_INGEST_SESSIONS_METRICS_PORT": str(p["sessions"]),
            "STREAMREC_INGEST_ARCHIVE_METRICS_PORT": str(p["archive"]),
            # serving
            "STREAMREC_SERVING_HOST": "127.0.0.1", "STREAMREC_SERVING_PORT": str(p["serving"]),
            "STREAMREC_SERVING_MODELS_ROOT": models, "STREAMREC_SERVING_DEVICE": "cpu",
            "STREAMREC_SERVING_REGISTRY_POLL_S": "1",
            "STREAMREC_SERVING_NOTIFY_CHANNEL": self.notify_channel,
            "STREAMREC_SERVING_POPULARITY_REFRESH_S": "1",
            "STREAMREC_SERVING_MAX_QUEUE": "8",  # a burst of concurrent requests is shed
            "STREAMREC_SERVING_LATENCY_BUDGET_MS": "10000",  # ... but a slow machine is not
            # monitor
            "STREAMREC_MONITOR_GROUP": f"obs-{self.uid}-monitor",
            "STREAMREC_MONITOR_FROM_BEGINNING": "true",
            "STREAMREC_MONITOR_POLL_TIMEOUT_S": "0.2",
            "STREAMREC_MONITOR_METRICS_PORT": str(p["monitor"]),
            "STREAMREC_MONITOR_REGISTRY_POLL_S": "1",
            "STREAMREC_MONITOR_ALARM_CHANNEL": self.alarm_channel,
            "STREAMREC_MONITOR_ITEM_MIN_SAMPLES": str(history_items + 20),
            "STREAMREC_MONITOR_ITEM_WINDOW": str(history_items + 5000),
            "STREAMREC_MONITOR_PSI_THRESHOLD": "0.001",
            "STREAMREC_MONITOR_JS_THRESHOLD": "0.0001",
            "STREAMREC_MONITOR_OOV_THRESHOLD": "0.01",
            "STREAMREC_MONITOR_SESSION_GAP_S": "5",
            "STREAMREC_MONITOR_LENGTH_MIN_SAMPLES": "1000",  # no length alarm
            # retrain
            "STREAMREC_RETRAIN_ARCHIVE_ROOT": str(self.root / "archive"),
            "STREAMREC_RETRAIN_MODELS_ROOT": models,
            "STREAMREC_RETRAIN_STATE_DIR": str(self.root / "retrain"),
            "STREAMREC_RETRAIN_WINDOW_HOURS": "1.5", "STREAMREC_RETRAIN_REPLAY_HOURS": "1",
            "STREAMREC_RETRAIN_LAG_S": "0", "STREAMREC_RETRAIN_MIN_SESSIONS": "10",
            "STREAMREC_RETRAIN_EPOCHS": "1", "STREAMREC_RETRAIN_BATCH_SIZE": "64",
            "STREAMREC_RETRAIN_MARGIN": "1",  # promote whatever the held-out says
            "STREAMREC_RETRAIN_DEVICE": "cpu", "STREAMREC_RETRAIN_PROGRESS": "false",
            "STREAMREC_RETRAIN_LOCK": "file",
            "STREAMREC_RETRAIN_METRICS_PORT": str(p["retrain"]),
            "STREAMREC_RETRAIN_ALARM_CHANNEL": self.alarm_channel,
            "STREAMREC_RETRAIN_NOTIFY_CHANNEL": self.notify_channel,
        })
        return env

    def _start_prometheus(self) -> Process:
        rules = sorted(RULES_DIR.glob("*.yml")) + sorted(RULES_DIR.glob("*.yaml"))
        config = self.root / "prometheus.yml"
        config.write_text(json.dumps(prometheus_config(self.ports, rules), indent=2))
        proc = Process("prometheus", [
            PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}", "--log.level=warn",
        ], dict(os.environ), self.root / "logs")
        self.prometheus = Prometheus(f"http://127.0.0.1:{self.ports['prometheus']}")
        return proc

    def _metrics_up(self, role: str) -> bool:
        return httpx.get(f"http://127.0.0.1:{self.ports[role]}/metrics", timeout=2).is_success

    def _wait_ready(self) -> None:
        assert self.prometheus is not None
        prometheus = self.prometheus
        checks: list[tuple[str, Callable[[], Any]]] = [
            ("Prometheus ready", prometheus.ready),
            *[(f"{role} metrics", lambda r=role: self._metrics_up(r))
              for role in ("sessions", "archive", "monitor", "retrain")],
            ("monitor's champion",
             lambda: self.metric("monitor", "streamrec_drift_champion_info") >= 1),
            ("serving ready", lambda: httpx.get(f"{self.serving_url}/readyz",
                                                timeout=2).is_success),
            # The scheduler hears alarms only once subscribed (pub/sub keeps nothing).
            ("retrain subscribed",
             lambda: self.redis.pubsub_numsub(self.alarm_channel)[0][1] >= 1),
            ("targets up", lambda: set(prometheus.targets_up().values()) == {"up"}),
        ]
        for what, check in checks:
            wait_for(what, check, 120, alive=self.dead)
            self._mark(what)

    def _send_history(self) -> None:
        """The past hour (as fast as possible), duplicates and malformed messages."""
        world = self.world
        assert world is not None
        producer = make_producer(self.kafka)
        try:
            send_events(world.history, producer, self.topic, progress=False)
            encode = msgspec.json.Encoder().encode
            for ev in world.history[-DUPLICATES:]:
                producer.produce(self.topic, encode(ev), key=ev["session_id"].encode())
            for _, key, value in _malformed(int(time.time() * 1000)):
                producer.produce(self.topic, value, key=key)
            assert producer.flush(30) == 0
        finally:
            producer.close()
        sample = list(world.history_counts)[-20:]
        wait_for("the session store holds the history", lambda: all(
            len(events) >= min(world.history_counts[sid], 50)
            for sid, events in self.store.sessions(sample).items()), 60, alive=self.dead)
        wait_for("the archive holds the history", self._archived_history, 60, alive=self.dead)

    def _archived_history(self) -> bool:
        from ingest.archive import read_window

        world = self.world
        assert world is not None
        table = read_window(self.root / "archive", world.now_ms - 2 * HOUR_MS,
                            world.now_ms + HOUR_MS, columns=["event_id"])
        return table.num_rows >= len(world.history)

    # -- reading ----------------------------------------------------------------------

    def metric(self, role: str, name: str) -> float:
        """Sum of the samples called ``name`` on a process's /metrics (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        path = f"http://127.0.0.1:{self.ports[role]}/metrics"
        total = 0.0
        for family in text_string_to_metric_families(httpx.get(path, timeout=5).text):
            total += sum(s.value for s in family.samples if s.name == name)
        return total


class Traffic(threading.Thread):
    """Live sessions: clicks with wall-clock timestamps and a recommendation after each."""

    def __init__(self, pipeline: LivePipeline):
        super().__init__(name="observability-traffic", daemon=True)
        self.p = pipeline
        self._halt = threading.Event()
        self.rounds = 0
        self.errors: list[str] = []
        self.answers: Counter[str] = Counter()  # "model" / fallback reason / "shed"
        self.shed = False

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def _sessions(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """The live pool's sessions; once used up, again under fresh ids."""
        world = self.p.world
        assert world is not None
        for lap in itertools.count():
            for sid, events in world.live.items():
                if lap == 0:
                    yield sid, events
                else:
                    tag = f"lap{lap}-"
                    yield tag + sid, [{**e, "session_id": tag + sid,
                                       "event_id": tag + e["event_id"]} for e in events]

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # reported by the test, never a silent stop
            logger.exception("traffic stopped")
            self.errors.append(f"{type(e).__name__}: {e}")

    def _run(self) -> None:
        world = self.p.world
        assert world is not None
        pool = self._sessions()
        active: dict[str, list[dict[str, Any]]] = {}
        stored = Counter(world.history_counts)  # events the store should hold per session
        producer = make_producer(self.p.kafka)
        bad = itertools.cycle(range(6))
        http = httpx.Client(base_url=self.p.serving_url, timeout=30)
        try:
            with ThreadPoolExecutor(4) as requests:
                while not self._halt.is_set():
                    while len(active) < LIVE_SESSIONS:
                        sid, events = next(pool)
                        active[sid] = list(events)
                    batch = [active[sid].pop(0) for sid in list(active)]
                    for sid in [s for s, rest in active.items() if not rest]:
                        del active[sid]
                    self._send(batch, producer, http)
                    if self.rounds % 4 == 3:
                        _, key, value = _malformed(int(time.time() * 1000))[next(bad)]
                        producer.produce(self.p.topic, value, key=key)
                        producer.flush(10)
                    for ev in batch:
                        stored[ev["session_id"]] += 1
                    self._wait_stored({ev["session_id"]: stored[ev["session_id"]]
                                       for ev in batch})
                    sids = [ev["session_id"] for ev in batch]
                    for outcome in requests.map(lambda s: self._recommend(http, s),
                                                [*sids, f"unknown-{uuid.uuid4().hex[:6]}"]):
                        self.answers[outcome] += 1
                    if not self.shed and self.answers["model"] >= 20:
                        self.shed = asyncio.run(self._burst(sids))
                    self.rounds += 1
                    self._halt.wait(0.25)
        finally:
            http.close()
            producer.close()

    def _send(self, batch: list[dict[str, Any]], producer: Any, http: httpx.Client) -> None:
        if self.rounds % 3 == 2:  # through the API, as a client without a Kafka producer
            now = int(time.time() * 1000)
            r = http.post("/v1/events", json=[{**e, "ts": now} for e in batch])
            if r.status_code != 202:
                self.errors.append(f"POST /v1/events: {r.status_code} {r.text[:200]}")
        else:
            send_events(batch, producer, self.p.topic, live_timestamps=True, progress=False)

    def _wait_stored(self, want: dict[str, int]) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not self._halt.is_set():
            got = self.p.store.sessions(want)
            if all(len(got[s]) >= min(n, 50) for s, n in want.items()):
                return
            time.sleep(0.05)

    def _recommend(self, http: httpx.Client, sid: str) -> str:
        r = http.post("/v1/recommendations", json={"session_id": sid, "k": 10})
        if r.status_code == 503:
            return "shed"
        if r.status_code != 200:
            self.errors.append(f"POST /v1/recommendations: {r.status_code} {r.text[:200]}")
            return "error"
        return r.json().get("fallback_reason") or "model"

    async def _burst(self, sids: list[str], n: int = 64) -> bool:
        """Many requests at once against a queue of 8: some are shed (503)."""
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=self.p.serving_url, timeout=30,
                                     limits=limits) as client:
            for _ in range(5):
                rs = await asyncio.gather(*(
                    client.post("/v1/recommendations", json={"session_id": sids[i % len(sids)],
                                                             "k": 10}) for i in range(n)),
                    return_exceptions=True)
                shed = sum(1 for r in rs if isinstance(r, httpx.Response) and r.status_code == 503)
                self.answers["shed"] += shed
                if shed:
                    return True
        return False
