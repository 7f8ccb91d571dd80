"""The retrain job (``streamrec retrain --once``): keep the champion right while the world changes.

One run, eight logged steps (``retrain <run> [i/8] ...``; ``docs/retrain.md``):

1. **champion**: load the version ``CURRENT`` names, with its fitted workflow.
2. **window**: read ``[end - window_hours, end)`` from the archive (``end = now - lag_s``)
   and split it by time: a session belongs to the slice its *last* event falls in,
   ``train | valid | held-out`` (the held-out slice is the most recent
   ``heldout_share`` of the window).
3. **vocabulary**: extend the champion's workflow on the training events
   (``Workflow.partial_fit``): new items get ids after the last one, no old id moves.
4. **sequences**: encode the slices (``write_sequences``, in the run's scratch dir),
   with a **replay sample** against forgetting: ``replay_share`` x (training
   sessions) sessions drawn at random from the archive's ``replay_hours`` before
   the window (the archive is the source, so nothing extra is kept with a version).
5. **challenger**: grow the champion to the extended schema (``model/growth.py``:
   old rows kept, new rows = mean row + noise) and fine-tune it on train + replay
   (epoch picked on valid).
6. **evaluate**: the challenger and the champion, grown the same way but not
   trained (old items score as the champion does), on the same held-out queries,
   full catalogue (NDCG@k / HR@k).
7. **decide**: promote iff ``challenger[metric] >= champion[metric] - margin``.
8. **publish**: save the version in scratch, ``ModelRegistry.publish`` it (copied
   under a temporary name, then renamed), and only then move ``CURRENT``; tell
   servers on Redis (``notify_channel``, the message is the version name).

A failed or interrupted run never touches the champion: before step 8 nothing
outside the run's scratch dir is written, and a run killed inside step 8 leaves
at most a complete, unpromoted version. Every run ends with a :class:`RunSummary`
(logged as one JSON line, written to ``state_dir/runs/<run>.json``) and
Prometheus metrics (:class:`RetrainMetrics`). Concurrency (single flight) is
the caller's: ``retrain/schedule.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway

from features.schema import Feature, Kind, Schema, Tag
from features.sequences import write_sequences
from features.workflow import Workflow
from ingest.archive import read_window
from ingest.failpoints import failpoint
from model.checkpoint import save_checkpoint
from model.data import Sequences, item_counts, next_item_split
from model.drift import SESSION_LENGTHS_INFO_KEY, length_counts
from model.evaluation import evaluate
from model.growth import GrowthConfig, grow_model
from model.model import ModelConfig, SessionModel
from model.registry import ModelRegistry, new_version_name
from model.trainer import TrainConfig, Trainer
from retrain.settings import RetrainSettings

__all__ = ["RUN_OUTCOMES", "TRIGGERS", "Decision", "FineTune", "RetrainMetrics", "RunSummary",
           "bootstrap_model_config", "bootstrap_schema", "decide", "fine_tune", "run_once",
           "session_parts", "split_cuts"]

logger = logging.getLogger(__name__)

STEPS = 8
HOUR_MS = 3_600_000
PARTS = ("train", "valid", "heldout")

#: ``(model, train, valid queries or None, config, device) -> JSON-able training report``;
#: trains ``model`` in place. Tests swap it to make a worse challenger or to crash mid-run.
FineTune = Callable[[SessionModel, Sequences, tuple[Sequences, torch.Tensor] | None,
                     TrainConfig, torch.device], Mapping[str, Any]]


# -- pure functions ---------------------------------------------------------------------


def split_cuts(start_ms: int, end_ms: int, valid_share: float,
               heldout_share: float) -> tuple[int, int]:
    """``(valid_cut, heldout_cut)``: train ``[start, valid_cut)``, valid up to ``heldout_cut``.

    >>> split_cuts(0, 1000, 0.1, 0.2)
    (700, 800)
    """
    span = end_ms - start_ms
    heldout_cut = end_ms - round(span * heldout_share)
    return heldout_cut - round(span * valid_share), heldout_cut


def session_parts(sessions: pa.Array | pa.ChunkedArray, ts: np.ndarray,
                  cuts: tuple[int, int]) -> np.ndarray:
    """Per event, its session's slice: 0 train, 1 valid, 2 held-out, by the session's last ``ts``.

    >>> session_parts(pa.array(["a", "b", "a", "c"]), np.array([1, 5, 9, 7]), (6, 8)).tolist()
    [2, 0, 2, 1]
    """
    if len(sessions) == 0:
        return np.zeros(0, np.int8)
    if isinstance(sessions, pa.ChunkedArray):  # one dictionary for all chunks
        sessions = sessions.combine_chunks()
    codes = pc.dictionary_encode(sessions).indices.to_numpy()  # [N]
    last = np.full(int(codes.max()) + 1, np.iinfo(np.int64).min)  # [S]
    np.maximum.at(last, codes, ts)
    return np.searchsorted(np.asarray(cuts), last, side="right").astype(np.int8)[codes]  # [N]


@dataclasses.dataclass(frozen=True)
class Decision:
    """Promote or not, and why (``reason``: ``not_worse`` or ``worse``)."""

    promote: bool
    reason: str
    metric: str
    challenger: float
    champion: float
    margin: float


def decide(challenger: Mapping[str, float], champion: Mapping[str, float], metric: str,
           margin: float) -> Decision:
    """Promote iff ``challenger[metric] >= champion[metric] - margin``.

    >>> decide({"ndcg@10": 0.29}, {"ndcg@10": 0.30}, "ndcg@10", 0.02).promote
    True
    >>> decide({"ndcg@10": 0.27}, {"ndcg@10": 0.30}, "ndcg@10", 0.02).reason
    'worse'
    """
    c, b = float(challenger[metric]), float(champion[metric])
    ok = math.isfinite(c) and c >= b - margin
    return Decision(ok, "not_worse" if ok else "worse", metric, c, b, margin)


# -- the run's record -------------------------------------------------------------------

#: What starts a run: the cron schedule, a drift alarm, or a person (``--once``).
TRIGGERS = ("schedule", "drift", "manual")
#: How a run ends, ``outcome -> its reasons``: the label values of
#: ``streamrec_retrain_runs_total`` besides ``trigger``.
RUN_OUTCOMES: dict[str, tuple[str, ...]] = {
    "promoted": ("not_worse", "bootstrap"),
    "rejected": ("worse", "champion_changed"),
    "skipped": ("not_enough_data", "no_heldout_queries"),
    "failed": ("error", "interrupted"),
}


@dataclasses.dataclass
class RunSummary:
    """What a run did. ``outcome``: promoted, rejected, skipped or failed; ``reason`` a short code."""

    run_id: str
    trigger: str
    started_at: float
    outcome: str = "failed"
    reason: str = "error"
    duration_s: float = 0.0
    champion: str | None = None
    version: str | None = None
    window: dict[str, int] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    decision: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    steps_s: dict[str, float] = dataclasses.field(default_factory=dict)
    notified: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RetrainMetrics:
    """Prometheus metrics of the retrainer, on their own registry (``streamrec_retrain_*``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        ns = "streamrec_retrain"
        self.runs = Counter(f"{ns}_runs", "Finished runs", ["trigger", "outcome", "reason"],
                            registry=r)
        self.last_end = Gauge(f"{ns}_last_run_timestamp_seconds", "End of the last run",
                              registry=r)
        self.last_duration = Gauge(f"{ns}_last_run_duration_seconds", "Wall time of the last run",
                                   registry=r)
        self.last_promoted = Gauge(f"{ns}_last_run_promoted", "1 if the last run promoted",
                                   registry=r)
        self.last_ok = Gauge(f"{ns}_last_success_timestamp_seconds",
                             "End of the last run that did not fail", registry=r)
        self.heldout = Gauge(f"{ns}_heldout_metric", "Held-out metrics of the last evaluated run",
                             ["model", "metric"], registry=r)
        self.counts = Gauge(f"{ns}_last_run_count", "Events, train / replay sessions, valid / "
                            "held-out queries, new items of the last run", ["what"], registry=r)
        self.step_seconds = Gauge(f"{ns}_step_seconds", "Time of each step of the last run",
                                  ["step"], registry=r)
        # Every runs series from 0: one that first appears with its first increment is
        # never seen to increase by rate() and increase().
        for trigger in TRIGGERS:
            for outcome, reasons in RUN_OUTCOMES.items():
                for reason in reasons:
                    self.runs.labels(trigger, outcome, reason)

    def observe(self, s: RunSummary) -> None:
        self.runs.labels(s.trigger, s.outcome, s.reason).inc()
        end = s.started_at + s.duration_s
        self.last_end.set(end)
        self.last_duration.set(s.duration_s)
        self.last_promoted.set(1.0 if s.outcome == "promoted" else 0.0)
        if s.outcome != "failed":
            self.last_ok.set(end)
        for model, values in s.metrics.items():
            for name, value in values.items():
                self.heldout.labels(model, name).set(value)
        for what, n in s.counts.items():
            self.counts.labels(what).set(n)
        for step, seconds in s.steps_s.items():
            self.step_seconds.labels(step).set(seconds)


def push_metrics(metrics: RetrainMetrics, gateway: str | None) -> None:
    """Push to a Prometheus Pushgateway (a ``--once`` run lives too briefly to be scraped)."""
    if gateway:
        try:
            push_to_gateway(gateway, job="streamrec-retrain", registry=metrics.registry)
        except OSError as e:
            logger.warning("could not push retrain metrics to %s: %s", gateway, e)


# -- steps ------------------------------------------------------------------------------


def bootstrap_schema(s: RetrainSettings) -> Schema:
    """The feature schema of a bootstrapped model: ``schema_file``, else item id + category."""
    if s.schema_file:
        return Schema.load(s.schema_file)
    return Schema([
        Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID}, transform={"op": "categorify"}),
        Feature("category", Kind.CATEGORICAL, transform={"op": "categorify"}),
    ])


def bootstrap_model_config(s: RetrainSettings) -> ModelConfig:
    """The architecture of a bootstrapped model: ``model_config_file``, else a small SASRec."""
    if s.model_config_file:
        return ModelConfig.from_dict(json.loads(Path(s.model_config_file).read_text()))
    return ModelConfig.from_dict({"block": {"name": "sasrec", "d_model": 64, "n_layers": 2,
                                            "n_heads": 2, "max_len": 20, "dropout": 0.2}})


def fine_tune(model: SessionModel, train: Sequences,
              valid: tuple[Sequences, torch.Tensor] | None, config: TrainConfig,
              device: torch.device) -> dict[str, Any]:
    """The default :data:`FineTune`: :class:`~model.trainer.Trainer` from the current weights."""
    return dataclasses.asdict(Trainer(model, config, train, valid, device=device).fit())


def _queries(data: Sequences, item: str, first_id: int) -> tuple[Sequences, torch.Tensor]:
    """Next-item queries whose target is a known item (OOV targets cannot be scored)."""
    history, targets = next_item_split(data, item)
    keep = targets >= first_id
    if not bool(keep.all()):
        logger.info("retrain: %d of %d queries with an unknown target item dropped",
                    int((~keep).sum()), keep.numel())
    return history.select(keep), targets[keep]


def _read(settings: RetrainSettings, start_ms: int, end_ms: int,
          columns: list[str]) -> pa.Table:
    table = read_window(settings.archive_root, start_ms, end_ms)
    return table.select([c for c in columns if c in table.column_names])


def _long_sessions(table: pa.Table, session_col: str) -> pa.Array:
    """Ids of the sessions with at least 2 events (the ones that become training sequences)."""
    counts = pc.value_counts(table[session_col].combine_chunks())
    return counts.field("values").filter(pc.greater_equal(counts.field("counts"), 2))


def _replay(settings: RetrainSettings, start_ms: int, n_train: int, wf: Workflow,
            columns: list[str]) -> pa.Table:
    """A seeded random sample of older sessions, ``replay_share * n_train`` of them."""
    want = round(settings.replay_share * n_train)
    if want == 0 or settings.replay_hours == 0:
        return _read(settings, start_ms, start_ms, columns)  # empty, same columns
    older = _read(settings, start_ms - round(settings.replay_hours * HOUR_MS), start_ms, columns)
    ids = _long_sessions(older, wf.session_col)
    if len(ids) == 0:
        logger.warning("retrain: no older sessions in the archive to replay")
        return older.slice(0, 0)
    gen = torch.Generator().manual_seed(settings.seed)
    pick = torch.randperm(len(ids), generator=gen)[: min(want, len(ids))].numpy()
    chosen = ids.take(pa.array(pick))
    return older.filter(pc.is_in(older[wf.session_col], value_set=chosen))


def _encode(table: pa.Table, wf: Workflow, path: Path, progress: bool) -> Sequences | None:
    if table.num_rows == 0 or write_sequences(table, wf, path, progress=progress) == 0:
        return None
    return Sequences.from_parquet(path)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _clean_scratch(base: Path, keep: Path) -> None:
    """Remove scratch dirs of runs whose process is gone (a SIGKILLed run leaves one)."""
    for d in base.glob("*.*"):
        pid = d.name.rsplit(".", 1)[-1]
        if d == keep or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            logger.info("retrain: removed scratch %s of a dead run", d)
        except PermissionError:
            pass  # alive, someone else's


def _write_summary(state_dir: Path, summary: RunSummary) -> None:
    runs = state_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    tmp = runs / f".{summary.run_id}.json.tmp"
    tmp.write_text(json.dumps(summary.to_dict(), indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, runs / f"{summary.run_id}.json")


# -- the run ----------------------------------------------------------------------------


class _Steps:
    """Logs ``[i/8] what`` as each step starts and records how long each took."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary, self.i, self.name, self.t0 = summary, 0, "", time.perf_counter()

    def __call__(self, name: str, what: str) -> None:
        self.close()
        self.i, self.name, self.t0 = self.i + 1, name, time.perf_counter()
        logger.info("retrain %s [%d/%d] %s", self.summary.run_id, self.i, STEPS, what)

    def close(self) -> None:
        if self.name:
            self.summary.steps_s[self.name] = round(time.perf_counter() - self.t0, 3)
            self.name = ""


def run_once(settings: RetrainSettings, *, trigger: str = "manual", now_ms: int | None = None,
             registry: ModelRegistry | None = None, redis: Any = None,
             metrics: RetrainMetrics | None = None,
             fine_tune_fn: FineTune | None = None) -> RunSummary:
    """One retrain run; see the module docstring. Never raises for a failed run: the
    summary says ``failed`` with the error (``KeyboardInterrupt`` is re-raised).

    Args:
        trigger: why it runs (``manual``, ``schedule``, ``drift``), recorded and exported.
        now_ms: the run's "now" (ms since epoch), default the wall clock.
        registry: default ``ModelRegistry(settings.models_root)``.
        redis: a Redis client to announce a promotion on; ``None`` = nobody is told
            (servers still see the pointer at their next poll).
        metrics: updated with the summary.
        fine_tune_fn: replaces :func:`fine_tune`.
    """
    started = time.time()
    now_ms = round(started * 1000) if now_ms is None else int(now_ms)
    run_id = new_version_name(started)
    summary = RunSummary(run_id=run_id, trigger=trigger, started_at=started)
    base = Path(settings.state_dir) / "scratch"
    scratch = base / f"{run_id}.{os.getpid()}"
    scratch.mkdir(parents=True)
    steps = _Steps(summary)
    try:
        _clean_scratch(base, scratch)
        _run(settings, summary, steps, now_ms, registry or ModelRegistry(settings.models_root),
             redis, fine_tune_fn or fine_tune, scratch)
    except Exception as e:
        summary.outcome, summary.reason, summary.error = "failed", "error", f"{type(e).__name__}: {e}"
        logger.exception("retrain %s failed; the champion is unchanged", run_id)
    except BaseException as e:
        summary.outcome, summary.reason, summary.error = "failed", "interrupted", type(e).__name__
        raise
    finally:
        steps.close()
        shutil.rmtree(scratch, ignore_errors=True)
        summary.duration_s = round(time.time() - started, 3)
        with contextlib.suppress(OSError, ValueError):
            _write_summary(Path(settings.state_dir), summary)
        if metrics is not None:
            metrics.observe(summary)
        brief = {k: v for k, v in summary.to_dict().items() if k not in ("train", "steps_s")}
        logger.info("retrain %s %s (%s) in %.1fs: %s", run_id, summary.outcome, summary.reason,
                    summary.duration_s, json.dumps(brief, default=str))
    return summary


def _run(s: RetrainSettings, summary: RunSummary, step: _Steps, now_ms: int,
         registry: ModelRegistry, redis: Any, tune: FineTune, scratch: Path) -> None:
    device = _device(s.device)
    step("champion", f"loading the champion from {registry.root}")
    champion_name = registry.current()
    if champion_name is None:
        if not s.bootstrap:
            raise RuntimeError(f"no champion in {registry.root} and bootstrap is off: train a "
                               "first model (`streamrec train`) and promote it (`streamrec "
                               "models publish --promote`), or set STREAMREC_RETRAIN_BOOTSTRAP")
        logger.info("retrain: no champion in %s; bootstrapping a first model from the window",
                    registry.root)
        model_config = bootstrap_model_config(s)
        wf = Workflow(bootstrap_schema(s), max_len=model_config.block.max_len)
        champion_model: SessionModel | None = None
    else:
        summary.champion = champion_name
        champion = registry.load(champion_name, device=device)
        wf = champion.workflow
        if wf is None:
            raise RuntimeError(f"champion {champion_name} was saved without its workflow; "
                               "retrain needs it to extend the vocabularies "
                               "(save_checkpoint(..., workflow))")
        champion_model = champion.model
    item = wf.schema.item_id_feature.name

    end = now_ms - round(s.lag_s * 1000)
    start = end - round(s.window_hours * HOUR_MS)
    cuts = split_cuts(start, end, s.valid_share, s.heldout_share)
    summary.window = {"start_ms": start, "valid_ms": cuts[0], "heldout_ms": cuts[1], "end_ms": end}
    step("window", f"reading [{start}, {end}) ms from {s.archive_root}")
    columns = list(dict.fromkeys([wf.session_col, *wf.event_columns]))
    table = _read(s, start, end, columns)
    parts = session_parts(table[wf.session_col], table[wf.ts_col].to_numpy(), cuts)
    slices = {name: table.filter(pa.array(parts == i)) for i, name in enumerate(PARTS)}
    n_train = len(_long_sessions(slices["train"], wf.session_col))
    summary.counts = {"events": table.num_rows, "train": n_train}
    if n_train < s.min_sessions:
        summary.outcome, summary.reason = "skipped", "not_enough_data"
        logger.warning("retrain: %d training sessions in the window, fewer than min_sessions=%d",
                       n_train, s.min_sessions)
        return

    if champion_model is None:
        step("vocabulary", f"fitting the workflow on {slices['train'].num_rows} events")
        wf.fit(slices["train"])
        summary.counts["new_items"] = wf.cardinalities[item]
    else:
        step("vocabulary", f"extending the workflow on {slices['train'].num_rows} events")
        old_items = wf.cardinalities[item]
        wf.partial_fit(slices["train"])
        summary.counts["new_items"] = wf.cardinalities[item] - old_items

    step("sequences", "encoding train / valid / held-out and the replay sample")
    replay = _replay(s, start, n_train, wf, columns)
    summary.counts["replay"] = len(_long_sessions(replay, wf.session_col))
    train_table = pa.concat_tables([slices["train"], replay], promote_options="permissive")
    train = _encode(train_table, wf, scratch / "train.parquet", s.progress)
    valid_seq = _encode(slices["valid"], wf, scratch / "valid.parquet", s.progress)
    heldout_seq = _encode(slices["heldout"], wf, scratch / "heldout.parquet", s.progress)
    if champion_model is None:
        torch.manual_seed(s.seed)
        challenger = SessionModel(wf.schema, model_config).to(device)
    first = (champion_model or challenger).first_item_id
    valid = _queries(valid_seq, item, first) if valid_seq is not None else None
    if valid is not None and len(valid[1]) == 0:
        valid = None
    heldout = _queries(heldout_seq, item, first) if heldout_seq is not None else None
    summary.counts["valid"] = 0 if valid is None else len(valid[1])
    summary.counts["heldout"] = 0 if heldout is None else len(heldout[1])
    if heldout is None or len(heldout[1]) == 0 or train is None:
        summary.outcome, summary.reason = "skipped", "no_heldout_queries"
        logger.warning("retrain: no held-out query to judge a challenger on; widen the window")
        return

    ks = tuple(sorted({10, 20, s.k}))
    if champion_model is None:
        step("challenger", f"training a first model from scratch on {len(train)} sessions")
        grown = None
        epochs, lr = s.bootstrap_epochs, s.bootstrap_lr
    else:
        step("challenger", f"growing the champion and fine-tuning on {len(train)} sessions")
        gen = torch.Generator(device=device).manual_seed(s.seed)
        counts = item_counts(train, wf.cardinalities[item], item)
        grown = grow_model(champion_model, wf.schema, GrowthConfig(noise=s.new_item_noise),
                           item_counts=counts, generator=gen)
        challenger = copy.deepcopy(grown)
        epochs, lr = s.epochs, s.lr
    config = TrainConfig(epochs=epochs, batch_size=s.batch_size, lr=lr, ks=ks, seed=s.seed,
                         select_metric=s.metric, progress=s.progress)
    summary.train = dict(tune(challenger, train, valid, config, device))
    failpoint("retrain.trained")

    judges = (("challenger", challenger),) if grown is None else (
        ("challenger", challenger), ("champion", grown))
    step("evaluate", f"{' and '.join(n for n, _ in judges)} on {len(heldout[1])} held-out queries")
    judged = {name: evaluate(m, *heldout, ks=ks, device=device, seed=s.seed) for name, m in judges}
    summary.metrics = judged

    if grown is None:
        step("decide", "bootstrap: the first model is promoted")
        reason = "bootstrap"
    else:
        step("decide", f"promote iff challenger {s.metric} >= champion - {s.margin}")
        decision = decide(judged["challenger"], judged["champion"], s.metric, s.margin)
        summary.decision = dataclasses.asdict(decision)
        logger.info("retrain: challenger %s=%.4f, champion %.4f: %s", s.metric,
                    decision.challenger, decision.champion,
                    "promote" if decision.promote else "keep the champion")
        if not decision.promote:
            summary.outcome, summary.reason = "rejected", decision.reason
            return
        reason = decision.reason

    step("publish", "saving, publishing, moving the pointer")
    lengths = pc.value_counts(slices["train"][wf.session_col].combine_chunks()).field("counts")
    info = {"retrain": {"run_id": summary.run_id, "parent": champion_name,
                        "trigger": summary.trigger, "window": summary.window,
                        "counts": summary.counts}, "data_cutoff_ms": end,
            SESSION_LENGTHS_INFO_KEY: length_counts(lengths.to_pylist())}
    version_metrics = {"select_metric": s.metric, "heldout": judged["challenger"],
                       "champion_heldout": judged.get("champion"), "train": summary.train}
    saved = save_checkpoint(scratch / "version", challenger, wf, version_metrics, info)
    failpoint("retrain.saved")
    version = registry.publish(saved, name=summary.run_id)
    summary.version = version
    failpoint("retrain.published")
    if registry.current() != champion_name:  # someone promoted meanwhile: theirs stands
        summary.outcome, summary.reason = "rejected", "champion_changed"
        logger.warning("retrain: CURRENT moved during the run; %s published, not promoted",
                       version)
        return
    registry.promote(version)
    summary.outcome, summary.reason = "promoted", reason
    if redis is not None:
        try:
            summary.notified = int(redis.publish(s.notify_channel, version))
        except Exception as e:  # servers poll the pointer anyway
            logger.warning("retrain: could not notify servers on %s: %s", s.notify_channel, e)
