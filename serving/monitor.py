"""The online drift monitor: live clicks -> online metrics, drift statistics, alarms.

``streamrec monitor`` runs a :class:`MonitorHandler` in an
:class:`ingest.worker.Worker` with its own consumer group on the events
topic. For every polled batch, in this order:

1. decode the events (invalid ones are skipped: the session updater
   dead-letters them) and keep the counted event types;
2. read the served record of the batch's sessions (``serving/online.py``),
   one pipelined Redis round trip;
3. :meth:`OnlineMonitor.observe` (no I/O) scores each click against the
   answer served before it, feeds the detectors (``model/drift.py``) and
   returns the alarms due;
4. publish the alarms on the Redis channel (best effort: a failed publish is
   counted and retried on the next batch or tick);
5. append to the drift timeline in Redis (:func:`write_timeline`, one
   pipelined round trip, best effort): a marker for each alarm and champion
   change, and every ``timeline_interval_s`` a point with the statistics;
6. return the batch's offsets for the worker to commit.

What the monitor holds is in-memory statistics, not durable effects: after a
restart it starts its windows afresh, and records re-delivered by a crash
are counted again (the timeline is a record for people and charts, not state
the monitor reads back). The champion is the registry's ``CURRENT`` version, read
every ``registry_poll_s``; when it moves the item and length references are
those of the new version and its alarms start afresh. Spec, thresholds,
metrics and the alarm contract: ``docs/drift.md``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.cluster import RedisCluster

from features.ops.categorical import Categorify
from features.workflow import Workflow
from ingest.events import ClickEvent, EventValidator
from ingest.kafka import Record, TopicPartition, ensure_topics, make_consumer
from ingest.metrics import ConsumerMetrics
from ingest.redis_conn import make_redis
from ingest.settings import KafkaSettings, RedisSettings
from ingest.worker import Offsets, TransientError, Worker, WorkerOptions, next_offsets
from model.checkpoint import CONFIG_FILE, WORKFLOW_DIR
from model.drift import (
    DETECTOR_NAMES,
    HR_PAGE_HINKLEY,
    ITEM_JS,
    ITEM_PSI,
    OOV_RATE,
    SESSION_LENGTH_KS,
    SESSION_LENGTHS_INFO_KEY,
    DistributionMonitor,
    DriftAlarm,
    ItemReference,
    LengthShift,
    PageHinkley,
    Prequential,
    rank_gain,
)
from model.registry import ModelRegistry
from serving.monitor_settings import MonitorSettings
from serving.online import ServedRecord, answer_before, decode_record, rank_of, served_key

__all__ = ["MonitorHandler", "MonitorMetrics", "OnlineMonitor", "Reference", "SessionTracker",
           "alarm_marker", "champion_marker", "load_reference", "monitor_worker",
           "publish_alarm", "read_served", "read_timeline", "timeline_key", "write_timeline"]

logger = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.exceptions.RedisError, OSError)
NO_VERSION = "none"  # model_version label of answers no model gave (fallbacks)
MAX_VERSIONS = 8  # served versions with live quality state; the least recent are dropped
INVALID_CLICK = "invalid"  # a record that is not a valid event
#: ``outcome`` of ``streamrec_drift_clicks_total`` (see MonitorMetrics.clicks).
CLICK_OUTCOMES = ("scored", "no_answer", "not_next", INVALID_CLICK)
#: ``answer`` of the online-quality series: a model's answer, or a popularity fallback.
MODEL_ANSWER, FALLBACK_ANSWER = "model", "fallback"


class MonitorMetrics:
    """Prometheus instruments of the monitor, all named ``streamrec_drift_*``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, "streamrec_drift"
        va = ["model_version", "answer"]
        self.clicks = Counter(f"{ns}_clicks", "Clicks seen, by outcome: scored, no_answer "
                              "(nothing served before it), not_next (its answer was already "
                              "followed by a click), invalid (not a valid event)", ["outcome"],
                              registry=r)
        self.scored = Counter(f"{ns}_online_scored", "Clicks scored against the answer "
                              "served before them", va, registry=r)
        self.hits = Counter(f"{ns}_online_hits", "Scored clicks on an item in the top k", va,
                            registry=r)
        self.ndcg_sum = Counter(f"{ns}_online_ndcg_sum", "Sum of per-click NDCG@k", va,
                                registry=r)
        self.hr = Gauge(f"{ns}_online_hr", "HR@k of the last metric_window scored clicks", va,
                        registry=r)
        self.ndcg = Gauge(f"{ns}_online_ndcg", "NDCG@k of the last metric_window scored clicks",
                          va, registry=r)
        self.k = Gauge(f"{ns}_online_k", "The k of the online metrics", registry=r)
        self.page_hinkley = Gauge(f"{ns}_page_hinkley", "Page-Hinkley statistic on the hits "
                                  "of a model version", ["model_version"], registry=r)
        stat = {"item_psi": "PSI of live items vs the training window, over popularity bins",
                "item_js": "Jensen-Shannon divergence (bits) of live vs training items",
                "oov_rate": "Share of live items outside the training vocabulary",
                "session_length_ks": "KS statistic of finished session lengths vs the reference",
                "session_length_mean_shift": "Live mean session length minus the reference's"}
        self.stats = {name: Gauge(f"{ns}_{name}", doc, ["model_version"], registry=r)
                      for name, doc in stat.items()}
        self.champion = Gauge(f"{ns}_champion_info", "1 for the champion the references come "
                              "from", ["model_version"], registry=r)
        self.alarms = Counter(f"{ns}_alarms", "Alarms raised (published or not)",
                              ["detector", "model_version"], registry=r)
        self.alarm_active = Gauge(f"{ns}_alarm_active", "1 while an alarm holds",
                                  ["detector", "model_version"], registry=r)
        self.publish_failures = Counter(f"{ns}_alarm_publish_failures", "Alarms whose publish "
                                        "failed (retried)", registry=r)
        self.timeline_points = Counter(f"{ns}_timeline_points", "Entries written to the drift "
                                       "timeline, by kind (point, alarm, champion)", ["kind"],
                                       registry=r)
        self.timeline_failures = Counter(f"{ns}_timeline_write_failures", "Drift timeline "
                                         "writes that failed (markers are retried)", registry=r)
        # Counter series known in advance start at 0: one that first appears with its
        # first increment is never seen to increase by rate() and increase(). Those of a
        # model version start when the version is first seen (:meth:`start_version`).
        for outcome in CLICK_OUTCOMES:
            self.clicks.labels(outcome)
        self._start_answer(NO_VERSION, FALLBACK_ANSWER)

    def _start_answer(self, version: str, answer: str) -> None:
        for counter in (self.scored, self.hits, self.ndcg_sum):
            counter.labels(version, answer)

    def start_version(self, version: str, champion: bool) -> None:
        """Start the counters of a model version at 0: its model answers' quality and
        its alarms (every detector for the champion; Page-Hinkley for any other)."""
        self._start_answer(version, MODEL_ANSWER)
        for detector in DETECTOR_NAMES if champion else (HR_PAGE_HINKLEY,):
            self.alarms.labels(detector, version)


@dataclass(frozen=True)
class Reference:
    """What the champion was trained on: its item distribution and session lengths."""

    version: str
    items: ItemReference | None
    lengths: list[int] | None  # training sessions by length (index = length)


def load_reference(registry: ModelRegistry, version: str, n_bins: int = 20) -> Reference:
    """The reference of ``version``: its workflow's item counts, its info's session lengths.

    Either part is ``None`` when the version lacks it (no workflow, a hashed
    item id, no ``info["session_lengths"]``); the monitor then skips the item
    statistics, or takes its first finished sessions as the length reference.
    """
    path = registry.local_path(version)
    info = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("info") or {}
    lengths = info.get(SESSION_LENGTHS_INFO_KEY)
    if not (isinstance(lengths, list) and lengths and sum(lengths) > 0):
        lengths = None
    items = None
    if (path / WORKFLOW_DIR).is_dir():
        workflow = Workflow.load(path / WORKFLOW_DIR)
        op = workflow.ops[workflow.schema.item_id_feature.name]
        if isinstance(op, Categorify) and len(op.counts) and op.counts.sum() > 0:
            items = ItemReference.from_counts(op.vocabulary.to_pylist(), op.counts, n_bins)
    if items is None:
        logger.warning("version %s has no item vocabulary with counts: no item drift "
                       "statistics for it", version)
    return Reference(version, items, lengths)


class SessionTracker:
    """Events seen per live session; a session idle ``gap_ms`` (event time) has finished.

    >>> t = SessionTracker(gap_ms=100, max_sessions=10)
    >>> t.add("a", 0), t.add("a", 50), t.add("b", 60), t.add("b", 200)
    ([], [], [], [2])
    >>> t.last_ts("b"), t.last_ts("a")
    (200, None)
    """

    def __init__(self, gap_ms: int, max_sessions: int) -> None:
        self.gap_ms = gap_ms
        self.max_sessions = max_sessions
        self._open: OrderedDict[str, tuple[int, int]] = OrderedDict()  # sid -> (events, last ts)
        self._watermark = 0

    def last_ts(self, session_id: str) -> int | None:
        state = self._open.get(session_id)
        return state[1] if state else None

    def add(self, session_id: str, ts: int) -> list[int]:
        """Count one event; returns the lengths of the sessions that finished meanwhile."""
        n, last = self._open.pop(session_id, (0, ts))
        self._open[session_id] = (n + 1, max(last, ts))  # now the most recent
        self._watermark = max(self._watermark, ts)
        done = []
        while self._open:
            sid, (count, last_ts) = next(iter(self._open.items()))
            if len(self._open) <= self.max_sessions and self._watermark - last_ts < self.gap_ms:
                break
            del self._open[sid]
            done.append(count)
        return done


class OnlineMonitor:
    """The monitor's state and step, without I/O: events and served answers in, alarms out.

    Args:
        settings: windows, thresholds, k.
        metrics: where statistics are exported; ``None`` = a private registry.
        clock: wall-clock seconds (alarm times and repeats).
    """

    def __init__(self, settings: MonitorSettings, metrics: MonitorMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.metrics = metrics or MonitorMetrics()
        self.metrics.k.set(settings.k)
        self._clock = clock
        self._types = settings.event_type_set
        self._quality: OrderedDict[tuple[str, str], Prequential] = OrderedDict()
        self._totals: dict[tuple[str, str], list[int]] = {}  # key -> [scored, hits]
        self._model_totals = [0, 0]  # [scored, hits] of every model answer since the start
        self._ph: dict[str, PageHinkley] = {}
        self._sessions = SessionTracker(int(settings.session_gap_s * 1000),
                                        settings.max_open_sessions)
        self.reference: Reference | None = None
        self._items: DistributionMonitor | None = None
        self._lengths: LengthShift | None = None
        self._length_sample: list[int] = []  # self-reference being collected
        self._last_alarm: dict[tuple[str, str], float] = {}  # (detector, version) -> time

    # -- the champion ------------------------------------------------------------------

    def set_reference(self, reference: Reference) -> None:
        """A new champion: compare with its training window; its alarms start afresh."""
        m, old = self.metrics, self.reference
        if old is not None:
            m.champion.remove(old.version)
            for gauge in m.stats.values():
                gauge.clear()
        for detector, version in self._last_alarm:
            m.alarm_active.labels(detector, version).set(0)
        self._last_alarm.clear()
        self.reference = reference
        m.champion.labels(reference.version).set(1)
        m.start_version(reference.version, champion=True)
        self._items = (DistributionMonitor(reference.items, self.settings.distribution())
                       if reference.items is not None else None)
        self._lengths = (LengthShift(reference.lengths, self.settings.length_shift())
                         if reference.lengths else None)
        self._length_sample = []

    # -- the step ----------------------------------------------------------------------

    def observe(self, events: Sequence[ClickEvent],
                served: Mapping[str, Sequence[ServedRecord]]) -> list[DriftAlarm]:
        """Score and count ``events`` (in stream order); returns the alarms to publish."""
        alarms: list[DriftAlarm] = []
        touched: set[tuple[str, str]] = set()
        outcomes = dict.fromkeys(CLICK_OUTCOMES, 0)
        for ev in events:
            if self._types and ev.event_type not in self._types:
                continue
            previous = self._sessions.last_ts(ev.session_id)
            outcome = self._score(ev, served.get(ev.session_id, ()), previous, touched, alarms)
            outcomes[outcome] += 1
            if self._items is not None:
                self._items.update(ev.item_id)
            for length in self._sessions.add(ev.session_id, ev.ts):
                self._add_length(length)
        for outcome, n in outcomes.items():
            if n:
                self.metrics.clicks.labels(outcome).inc(n)
        self._export_quality(touched)
        return alarms + self.check()

    def _score(self, ev: ClickEvent, records: Sequence[ServedRecord], previous: int | None,
               touched: set[tuple[str, str]], alarms: list[DriftAlarm]) -> str:
        answer = answer_before(records, ev.ts)
        if answer is None:
            return "no_answer"
        if previous is not None and previous >= answer.ts:
            return "not_next"  # an earlier click already answered this recommendation
        version = answer.model_version or NO_VERSION
        kind = MODEL_ANSWER if answer.fallback is None and answer.model_version else FALLBACK_ANSWER
        key = (version, kind)
        quality = self._quality.get(key)
        if quality is None:
            quality = self._quality[key] = Prequential(self.settings.k,
                                                       self.settings.metric_window)
        self._quality.move_to_end(key)
        rank = rank_of(answer, ev.item_id)
        quality.update(rank)
        touched.add(key)
        hit, gain = rank_gain(rank, self.settings.k)
        totals = self._totals.setdefault(key, [0, 0])
        totals[0] += 1
        totals[1] += int(hit)
        if kind == MODEL_ANSWER:
            self._model_totals[0] += 1
            self._model_totals[1] += int(hit)
        m = self.metrics
        m.scored.labels(*key).inc()
        m.hits.labels(*key).inc(hit)
        m.ndcg_sum.labels(*key).inc(gain)
        if kind == MODEL_ANSWER:
            ph = self._ph.get(version)
            if ph is None:
                ph = self._ph[version] = PageHinkley(self.settings.page_hinkley())
                champion = self.reference is not None and self.reference.version == version
                m.start_version(version, champion=champion)
            ph.update(hit)
            if ph.drift_detected:
                alarm = self._alarm(HR_PAGE_HINKLEY, ph.statistic, ph.config.threshold,
                                    version, ph.n)
                alarms += [alarm] if alarm else []
        return "scored"

    def _add_length(self, length: int) -> None:
        if self._lengths is not None:
            self._lengths.update(length)
            return
        if self.reference is None:
            return
        self._length_sample.append(length)
        if len(self._length_sample) >= self.settings.length_reference_size:
            counts = [0] * (self.settings.length_shift().max_length + 1)
            for n in self._length_sample:
                counts[min(n, len(counts) - 1)] += 1
            self._lengths = LengthShift(counts, self.settings.length_shift())
            self._length_sample = []
            logger.info("session-length reference of %s: its first %d finished sessions",
                        self.reference.version, sum(counts))

    def _export_quality(self, touched: Iterable[tuple[str, str]]) -> None:
        m = self.metrics
        for key in touched:
            q = self._quality[key]
            m.hr.labels(*key).set(q.hr or 0.0)
            m.ndcg.labels(*key).set(q.ndcg or 0.0)
            if key[1] == MODEL_ANSWER:
                m.page_hinkley.labels(key[0]).set(self._ph[key[0]].statistic)
        while len(self._quality) > MAX_VERSIONS:
            (version, kind), _ = self._quality.popitem(last=False)
            self._totals.pop((version, kind), None)
            for gauge in (m.hr, m.ndcg):
                gauge.remove(version, kind)
            if kind == MODEL_ANSWER:
                self._ph.pop(version, None)
                m.page_hinkley.remove(version)

    # -- the timeline ------------------------------------------------------------------

    def timeline_point(self, ts: float) -> dict[str, Any]:
        """The statistics now, as one drift timeline point (``docs/drift.md``, no I/O).

        ``hr``, ``ndcg`` and ``window`` are the champion's model answers over
        its last ``metric_window`` scored clicks (null before the first);
        ``scored`` and ``hits`` count every model answer scored since the
        monitor started, whatever its version (``versions`` has each pair).
        """
        ref = self.reference
        champion = ref.version if ref is not None else None
        quality = self._quality.get((champion, MODEL_ANSWER)) if champion is not None else None
        items = self._items.statistics() if self._items is not None else {}
        versions = []
        for (version, kind), q in self._quality.items():
            scored, hits = self._totals.get((version, kind), (0, 0))
            versions.append({"model_version": version, "answer": kind, "hr": _finite(q.hr),
                             "ndcg": _finite(q.ndcg), "window": q.n, "scored": scored,
                             "hits": hits})
        return {
            "kind": "point", "ts": round(ts, 3), "model_version": champion, "k": self.settings.k,
            "hr": _finite(quality.hr) if quality else None,
            "ndcg": _finite(quality.ndcg) if quality else None,
            "window": quality.n if quality else 0,
            "scored": self._model_totals[0], "hits": self._model_totals[1],
            "psi": _finite(items.get(ITEM_PSI)), "js": _finite(items.get(ITEM_JS)),
            "oov_rate": _finite(items.get(OOV_RATE)),
            "session_length_ks": _finite(self._lengths.ks) if self._lengths else None,
            "alarms": [{"detector": d, "model_version": v} for d, v in sorted(self._last_alarm)],
            "versions": versions,
        }

    # -- alarms ------------------------------------------------------------------------

    def check(self) -> list[DriftAlarm]:
        """Export the champion's drift statistics; the alarms of those over threshold."""
        ref = self.reference
        if ref is None:
            return []
        stats: dict[str, tuple[float | None, float, int, bool]] = {}
        if self._items is not None:
            items, limits = self._items, self._items.thresholds()
            over = set(items.triggered)
            for name, value in items.statistics().items():
                stats[name] = (value, limits[name], items.n, name in over)
        if self._lengths is not None:
            ls = self._lengths
            stats[SESSION_LENGTH_KS] = (ls.ks, ls.config.ks_threshold, ls.n, ls.drift_detected)
            self.metrics.stats["session_length_mean_shift"].labels(ref.version).set(
                ls.mean_shift or 0.0)
        alarms = []
        for name, (value, limit, n, over) in stats.items():
            if value is not None:
                self.metrics.stats[name].labels(ref.version).set(value)
            if over and value is not None:
                alarm = self._alarm(name, value, limit, ref.version, n)
                alarms += [alarm] if alarm else []
            elif (name, ref.version) in self._last_alarm:
                self.metrics.alarm_active.labels(name, ref.version).set(0)
                del self._last_alarm[(name, ref.version)]
        return alarms

    def _alarm(self, detector: str, value: float, limit: float, version: str,
               samples: int) -> DriftAlarm | None:
        """An alarm to publish, unless the same one went out less than ``alarm_repeat_s`` ago."""
        now, key = self._clock(), (detector, version)
        self.metrics.alarm_active.labels(detector, version).set(1)
        last = self._last_alarm.get(key)
        if last is not None and now - last < self.settings.alarm_repeat_s:
            return None
        self._last_alarm[key] = now
        self.metrics.alarms.labels(detector, version).inc()
        logger.warning("drift alarm: %s = %.4g > %.4g (model %s, %d samples)", detector, value,
                       limit, version, samples)
        return DriftAlarm(detector, float(value), float(limit), version, int(now * 1000),
                          samples)


# ---------------------------------------------------------------------- Redis adapters


def read_served(client: redis.Redis | RedisCluster, prefix: str,
                session_ids: Iterable[str]) -> dict[str, list[ServedRecord]]:
    """The served record of each session (newest first), one pipelined round trip.

    An entry that does not decode is skipped (logged): one bad entry must not
    stop the monitor.
    """
    sids = list(dict.fromkeys(session_ids))
    if not sids:
        return {}
    pipe = client.pipeline(transaction=False)
    for sid in sids:
        pipe.lrange(served_key(prefix, sid), 0, -1)
    out: dict[str, list[ServedRecord]] = {}
    for sid, raws in zip(sids, pipe.execute(), strict=True):
        records = []
        for raw in raws or ():
            try:
                records.append(decode_record(raw))
            except (ValueError, KeyError, TypeError) as e:
                logger.debug("undecodable served record of %r: %r", sid, e)
        out[sid] = records
    return out


def publish_alarm(client: redis.Redis | RedisCluster, channel: str, alarm: DriftAlarm) -> int:
    """Publish one alarm (``DriftAlarm.to_json``); returns how many subscribers heard it."""
    return int(client.publish(channel, alarm.to_json()))


def _finite(x: float | None) -> float | None:
    """``x`` as a JSON-safe number: ``None`` for missing, NaN or infinite values."""
    return float(x) if x is not None and math.isfinite(x) else None


def timeline_key(prefix: str) -> str:
    """The drift timeline's key (a sorted set scored by ``ts``; ``docs/drift.md``).

    >>> timeline_key("sr")
    'sr:{drift}:timeline'
    """
    return f"{prefix}:{{drift}}:timeline"


def alarm_marker(alarm: DriftAlarm, champion: str | None, ts: float) -> dict[str, Any]:
    """The timeline entry of one raised alarm.

    >>> a = DriftAlarm("oov_rate", 0.5, 0.2, "v1", 1_700_000_000_000, 300)
    >>> alarm_marker(a, "v1", 1_700_000_000.0)["alarm"]["detector"]
    'oov_rate'
    """
    return {"kind": "alarm", "ts": round(ts, 3), "model_version": champion,
            "alarm": {"detector": alarm.detector, "statistic": _finite(alarm.statistic),
                      "threshold": _finite(alarm.threshold),
                      "model_version": alarm.model_version, "samples": alarm.samples}}


def champion_marker(version: str, previous: str | None, ts: float) -> dict[str, Any]:
    """The timeline entry of a new champion (``previous``: the one before, if any)."""
    return {"kind": "champion", "ts": round(ts, 3), "model_version": version,
            "previous": previous}


def write_timeline(client: redis.Redis | RedisCluster, prefix: str,
                   entries: Sequence[Mapping[str, Any]], max_points: int) -> None:
    """Add timeline entries (each with a ``ts``) and keep the newest ``max_points``.

    One pipelined round trip: ``ZADD`` (member: the entry as compact JSON,
    score: its ``ts``) then ``ZREMRANGEBYRANK`` of the oldest beyond the cap.
    Raises Redis errors (the monitor counts them and goes on).
    """
    if not entries:
        return
    key = timeline_key(prefix)
    members = {json.dumps(e, separators=(",", ":"), allow_nan=False): float(e["ts"])
               for e in entries}
    pipe = client.pipeline(transaction=False)
    pipe.zadd(key, members)
    pipe.zremrangebyrank(key, 0, -(max_points + 1))
    pipe.execute()


def read_timeline(client: redis.Redis | RedisCluster, prefix: str, since: float | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """Timeline entries with ``ts > since`` (all without it), oldest first.

    ``limit`` keeps the newest ``limit`` of them. An entry that does not
    decode is skipped (logged at debug level).
    """
    key = timeline_key(prefix)
    low = "-inf" if since is None else f"({float(since)!r}"
    if limit is None:
        raws = client.zrangebyscore(key, low, "+inf")
    else:
        raws = client.zrevrangebyscore(key, "+inf", low, start=0, num=limit)[::-1]
    out = []
    for raw in raws:
        try:
            entry = json.loads(raw)
            if isinstance(entry, dict) and "ts" in entry and "kind" in entry:
                out.append(entry)
                continue
        except ValueError:
            pass
        logger.debug("undecodable drift timeline entry %r", raw[:80])
    return out


class MonitorHandler:
    """The worker's handler: decode, read served records, observe, publish; see the module doc.

    Args:
        monitor: the state and step.
        client: Redis (served records, alarms, timeline); closed by :meth:`close`.
        prefix: key prefix of the served records and the timeline.
        registry: where the champion pointer lives; ``None`` = keep the reference given.
        clock: monotonic seconds (registry polling, timeline interval).
        wall_clock: wall-clock seconds (the ``ts`` of timeline entries).
    """

    MAX_PENDING = 100  # alarms (and timeline markers) kept for a retry while Redis refuses

    def __init__(self, monitor: OnlineMonitor, client: redis.Redis | RedisCluster, prefix: str,
                 registry: ModelRegistry | None, validator: EventValidator | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.monitor = monitor
        self.client = client
        self.prefix = prefix
        self.registry = registry
        self.validator = validator or EventValidator()
        self._clock = clock
        self._wall_clock = wall_clock
        self._next_poll = 0.0
        self._pending: list[DriftAlarm] = []
        self._markers: list[dict[str, Any]] = []  # timeline markers not yet written
        self._next_point = float("-inf")

    def handle(self, records: list[Record]) -> Offsets:
        self.refresh_champion()
        events, rejected = self.validator.decode_batch(
            [r.value if r.value is not None else b"" for r in records], [r.key for r in records])
        if rejected:
            self.monitor.metrics.clicks.labels(INVALID_CLICK).inc(len(rejected))
        try:
            served = read_served(self.client, self.prefix, (e.session_id for e in events))
        except _REDIS_ERRORS as e:
            raise TransientError(f"redis unavailable: {e}") from e
        self._publish(self.monitor.observe(events, served))
        self._write_timeline()
        return next_offsets(records)

    def tick(self) -> Offsets:
        self.refresh_champion()
        self._publish(self.monitor.check())
        self._write_timeline()
        return {}

    def revoke(self, partitions: Sequence[TopicPartition]) -> Offsets:
        return {}  # nothing buffered: every handled batch was returned at once

    def close(self) -> None:
        self.client.close()

    def refresh_champion(self, force: bool = False) -> None:
        """Read ``CURRENT`` when due; load the new champion's reference when it moved."""
        now = self._clock()
        if self.registry is None or (now < self._next_poll and not force):
            return
        self._next_poll = now + self.monitor.settings.registry_poll_s
        try:
            version = self.registry.current()
            ref = self.monitor.reference
            if version is None or (ref is not None and ref.version == version):
                return
            reference = load_reference(self.registry, version, self.monitor.settings.item_bins)
        except Exception as e:  # an unreachable store or a broken version: keep the old one
            logger.warning("cannot read the champion from %s: %s", self.registry.root, e)
            return
        previous = self.monitor.reference.version if self.monitor.reference else None
        self.monitor.set_reference(reference)
        self._mark(champion_marker(reference.version, previous, self._wall_clock()))
        logger.info("monitoring against champion %s", reference.version)

    def _mark(self, marker: dict[str, Any]) -> None:
        if self.monitor.settings.timeline_interval_s > 0:
            self._markers = [*self._markers, marker][-self.MAX_PENDING:]

    def _write_timeline(self) -> None:
        """Write the pending markers, and a point when one is due; never raises."""
        settings = self.monitor.settings
        if settings.timeline_interval_s <= 0:
            return
        now = self._clock()
        entries = list(self._markers)
        if now >= self._next_point:
            self._next_point = now + settings.timeline_interval_s
            entries.append(self.monitor.timeline_point(self._wall_clock()))
        if not entries:
            return
        try:
            write_timeline(self.client, self.prefix, entries, settings.timeline_max_points)
        except (*_REDIS_ERRORS, ValueError) as e:
            self.monitor.metrics.timeline_failures.inc()
            logger.warning("drift timeline not written (markers retried later): %s", e)
            return
        self._markers = []
        for entry in entries:
            self.monitor.metrics.timeline_points.labels(entry["kind"]).inc()

    def _publish(self, alarms: list[DriftAlarm]) -> None:
        champion = self.monitor.reference.version if self.monitor.reference else None
        for alarm in alarms:
            self._mark(alarm_marker(alarm, champion, self._wall_clock()))
        todo, self._pending = [*self._pending, *alarms], []
        channel = self.monitor.settings.alarm_channel
        for i, alarm in enumerate(todo):
            try:
                publish_alarm(self.client, channel, alarm)
            except _REDIS_ERRORS as e:
                self.monitor.metrics.publish_failures.inc()
                self._pending = todo[i:][-self.MAX_PENDING:]
                logger.warning("drift alarm not published (retried later): %s", e)
                return


def monitor_worker(kafka: KafkaSettings, redis_settings: RedisSettings,
                   settings: MonitorSettings, models_root: str,
                   registry: CollectorRegistry | None = None) -> tuple[Worker, MonitorMetrics]:
    """The monitor as a consumer-group worker; its metrics share the worker's registry."""
    ensure_topics(kafka, [kafka.events_topic])
    consumer_metrics = ConsumerMetrics("monitor", registry)
    metrics = MonitorMetrics(consumer_metrics.registry)
    handler = MonitorHandler(OnlineMonitor(settings, metrics), make_redis(redis_settings),
                             redis_settings.key_prefix, ModelRegistry(models_root))
    handler.refresh_champion(force=True)
    consumer = make_consumer(kafka, settings.group, from_beginning=settings.from_beginning)
    options = WorkerOptions(batch_size=settings.batch_size, poll_timeout_s=settings.poll_timeout_s)
    worker = Worker(consumer, [kafka.events_topic], handler, consumer_metrics, options)
    return worker, metrics
