"""The retrain job (``retrain/job.py``) on a simulated, drifting archive and a real registry.

One archive for the module: 8 hours of simulated clicks whose item transitions
change abruptly after hour 4 (``SimulatorConfig(drift="abrupt")``), with new
items arriving. The champion is trained on hours 0-4 only; every test copies
its registry, so each starts from the same champion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pytest
import redis
import torch
from click.testing import CliRunner

from features.schema import Feature, Kind, Schema, Tag
from features.sequences import write_sequences
from features.workflow import Workflow
from ingest.archive import ArchiveHandler, read_window
from ingest.kafka import Record
from ingest.simulator import Simulator, SimulatorConfig
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import Sequences
from model.drift import SESSION_LENGTHS_INFO_KEY
from model.model import ModelConfig, SessionModel
from model.registry import ModelRegistry
from model.trainer import TrainConfig, Trainer
from retrain.job import (
    RetrainMetrics,
    decide,
    fine_tune,
    run_once,
    session_parts,
    split_cuts,
)
from retrain.schedule import FileLock, once
from retrain.settings import RetrainSettings
from streamrec.cli import cli

H = 3_600_000
ROOT = Path(__file__).resolve().parents[2]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors: intra-op threads only add overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class World:
    archive: Path
    models: Path  # a registry whose CURRENT is the stale champion "v0"
    now_ms: int  # the end of the archive (drift at now - 4 h)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("retrain-world")
    now_ms = int(time.time() * 1000)  # wall-clock aligned, so `retrain --once` finds it too
    start = now_ms - 8 * H
    cfg = SimulatorConfig(seed=3, n_items=80, n_topics=4, n_successors=3, sessions_per_hour=200,
                          duration_hours=8, drift="abrupt", drift_at=4.0, new_items_per_hour=3,
                          p_follow=0.8, p_topic=0.1, start_ms=start)
    encode = msgspec.json.Encoder().encode
    handler = ArchiveHandler(root / "archive", max_buffer_events=10**7, fsync=False)
    handler.handle([Record("events", 0, i, e["session_id"].encode(), encode(e))
                    for i, e in enumerate(Simulator(cfg).events())])
    handler.flush()
    # The champion: trained on the first 4 hours (regime 0) only.
    old = read_window(root / "archive", start, start + 4 * H)
    schema = Schema([
        Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID}, transform={"op": "categorify"}),
        Feature("category", Kind.CATEGORICAL, transform={"op": "categorify"}),
    ])
    wf = Workflow(schema, max_len=12).fit(old)
    write_sequences(old, wf, root / "champion.parquet", progress=False)
    torch.manual_seed(0)
    model = SessionModel(wf.schema, ModelConfig.from_dict(
        {"block": {"name": "gru", "d_model": 32, "n_layers": 1, "max_len": 12, "dropout": 0.0}}))
    Trainer(model, TrainConfig(epochs=8, lr=5e-3, batch_size=64, progress=False),
            Sequences.from_parquet(root / "champion.parquet")).fit()
    registry = ModelRegistry(root / "models")
    registry.promote(registry.publish(save_checkpoint(root / "ck", model, wf), name="v0"))
    return World(root / "archive", root / "models", now_ms)


def settings(world: World, tmp_path: Path, **overrides: Any) -> RetrainSettings:
    """A fresh copy of the champion's registry and the job's settings for it."""
    models = tmp_path / "models"
    if not models.exists():
        shutil.copytree(world.models, models)
    values: dict[str, Any] = dict(
        archive_root=str(world.archive), models_root=str(models), state_dir=tmp_path / "state",
        window_hours=4, replay_hours=4, lag_s=0, epochs=4, lr=5e-3, batch_size=64,
        min_sessions=20, progress=False, lock="file")
    return RetrainSettings(**{**values, **overrides})


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (dot files too) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- pure parts -------------------------------------------------------------------------


def test_decision_rule_and_time_split_by_hand() -> None:
    m = "ndcg@10"
    assert decide({m: 0.30}, {m: 0.30}, m, 0.0).promote  # a tie is not worse
    assert decide({m: 0.281}, {m: 0.30}, m, 0.02).promote
    assert not decide({m: 0.279}, {m: 0.30}, m, 0.02).promote
    assert not decide({m: float("nan")}, {m: 0.0}, m, 1.0).promote
    assert split_cuts(1000, 2000, 0.0, 0.25) == (1750, 1750)
    # a session goes where its LAST event is, even if it began before the cut
    parts = session_parts(pa.chunked_array([["s", "t"], ["s", "u", "u"]]),
                          np.array([10, 40, 95, 60, 71]), (50, 90))
    assert parts.tolist() == [2, 0, 2, 1, 1]


# -- runs -------------------------------------------------------------------------------


def test_drifted_window_challenger_beats_stale_champion_and_is_promoted(
        world: World, tmp_path: Path, redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    channel = f"test-retrain-models-{time.monotonic_ns()}"
    s = settings(world, tmp_path, notify_channel=channel)
    heard: list[str] = []
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.1)
            if msg:
                heard.append(msg["data"].decode())

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    metrics = RetrainMetrics()
    caplog.set_level(logging.INFO, logger="retrain.job")
    try:
        summary = run_once(s, trigger="schedule", now_ms=world.now_ms, redis=redis_client,
                           metrics=metrics)
        deadline = time.monotonic() + 5
        while not heard and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        listener.join()
        pubsub.close()

    assert summary.outcome == "promoted", summary.error
    challenger, champion = summary.metrics["challenger"], summary.metrics["champion"]
    assert challenger["ndcg@10"] > champion["ndcg@10"] + 0.05  # measured: 0.42 vs 0.19
    assert challenger["hr@10"] > champion["hr@10"]
    assert summary.counts["new_items"] > 0 and summary.counts["replay"] > 0
    # the pointer moved to a complete version, and servers were told
    registry = ModelRegistry(s.models_root)
    assert registry.current() == summary.version
    assert set(registry.versions()) == {"v0", summary.version}
    assert heard == [summary.version] and summary.notified == 1
    path = registry.local_path(summary.version)
    for name in ("config.json", "model.safetensors", "metrics.json", "workflow/workflow.json"):
        assert (path / name).is_file(), name
    new, old = load_checkpoint(path), registry.load("v0")
    old_items = old.workflow.ops["item_id"].vocabulary.to_pylist()
    new_items = new.workflow.ops["item_id"].vocabulary.to_pylist()
    assert new_items[: len(old_items)] == old_items  # no old id moved
    assert len(new_items) == len(old_items) + summary.counts["new_items"]
    assert new.model.num_items == new.workflow.cardinalities["item_id"]
    assert new.info["retrain"]["parent"] == "v0" and new.info[SESSION_LENGTHS_INFO_KEY]
    assert new.metrics["heldout"] == challenger and new.metrics["champion_heldout"] == champion
    # every step was reported, the summary exported and written, the scratch space cleaned
    assert all(f"[{i}/8]" in caplog.text for i in range(1, 9))
    labels = {"trigger": "schedule", "outcome": "promoted", "reason": "not_worse"}
    assert metrics.registry.get_sample_value("streamrec_retrain_runs_total", labels) == 1
    assert metrics.registry.get_sample_value(
        "streamrec_retrain_heldout_metric", {"model": "champion", "metric": "ndcg@10"}
    ) == champion["ndcg@10"]
    written = json.loads((s.state_dir / "runs" / f"{summary.run_id}.json").read_text())
    assert written["outcome"] == "promoted" and written["version"] == summary.version
    assert list((s.state_dir / "scratch").iterdir()) == []


def test_worse_challenger_is_rejected_and_the_pointer_stays(world: World, tmp_path: Path) -> None:
    s = settings(world, tmp_path)
    before = tree(tmp_path / "models")

    def scramble(model: SessionModel, *_: Any) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return {"scrambled": True}

    summary = run_once(s, now_ms=world.now_ms, fine_tune_fn=scramble)
    assert (summary.outcome, summary.reason) == ("rejected", "worse")
    assert summary.metrics["challenger"]["ndcg@10"] < summary.metrics["champion"]["ndcg@10"]
    assert summary.version is None
    assert tree(tmp_path / "models") == before  # nothing published, CURRENT untouched
    assert ModelRegistry(s.models_root).current() == "v0"


def test_exception_mid_training_leaves_the_champion_untouched(world: World,
                                                              tmp_path: Path) -> None:
    s = settings(world, tmp_path)
    before = tree(tmp_path / "models")

    def crash(model: SessionModel, train: Sequences, valid: Any, config: TrainConfig,
              device: torch.device) -> dict[str, Any]:
        fine_tune(model, train, valid, dataclasses.replace(config, epochs=1), device)
        raise OSError("injected: disk full during training")

    metrics = RetrainMetrics()
    summary = run_once(s, now_ms=world.now_ms, fine_tune_fn=crash, metrics=metrics)
    assert (summary.outcome, summary.reason) == ("failed", "error")
    assert "injected" in (summary.error or "")
    assert tree(tmp_path / "models") == before
    assert ModelRegistry(s.models_root).versions() == ["v0"]
    assert list((s.state_dir / "scratch").iterdir()) == []
    labels = {"trigger": "manual", "outcome": "failed", "reason": "error"}
    assert metrics.registry.get_sample_value("streamrec_retrain_runs_total", labels) == 1

    def interrupt(*_: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_once(s, now_ms=world.now_ms, fine_tune_fn=interrupt)
    assert tree(tmp_path / "models") == before
    reasons = {json.loads(p.read_text())["reason"] for p in (s.state_dir / "runs").glob("*.json")}
    assert reasons == {"error", "interrupted"}


def test_sigkilled_retrain_leaves_the_champion_serving(world: World, tmp_path: Path) -> None:
    s = settings(world, tmp_path, epochs=2)
    before = tree(tmp_path / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update({f"STREAMREC_RETRAIN_{k.upper()}": str(v) for k, v in s.model_dump().items()
                if v is not None and k in {"archive_root", "models_root", "state_dir",
                                           "window_hours", "replay_hours", "lag_s", "epochs",
                                           "lr", "batch_size", "min_sessions", "lock"}})
    env.update({"STREAMREC_RETRAIN_PROGRESS": "false", "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
                # killed with the version complete in scratch, just before publishing
                "STREAMREC_FAILPOINT": "retrain.saved:1"})
    proc = subprocess.run([sys.executable, "-m", "streamrec", "retrain", "--once"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "[8/8]" in proc.stderr  # it died inside the publish step
    assert tree(tmp_path / "models") == before
    assert ModelRegistry(s.models_root).versions() == ["v0"]
    assert len(list((s.state_dir / "scratch").iterdir())) == 1  # the dead run's leftovers
    # The file lock died with the process; the next run cleans up and promotes.
    summary = once(s, now_ms=world.now_ms)
    assert summary is not None and summary.outcome == "promoted", summary
    assert list((s.state_dir / "scratch").iterdir()) == []


def test_empty_window_is_skipped_and_no_champion_is_a_clear_failure(
        world: World, tmp_path: Path) -> None:
    s = settings(world, tmp_path)
    before = tree(tmp_path / "models")
    summary = run_once(s, now_ms=world.now_ms + 48 * H)  # nothing archived in that window
    assert (summary.outcome, summary.reason) == ("skipped", "not_enough_data")
    assert summary.counts == {"events": 0, "train": 0}
    assert tree(tmp_path / "models") == before
    empty = s.model_copy(update={"models_root": str(tmp_path / "no-models"), "bootstrap": False})
    failed = run_once(empty, now_ms=world.now_ms)
    assert failed.outcome == "failed" and "streamrec train" in (failed.error or "")
    assert not (tmp_path / "no-models" / "CURRENT").exists()


def test_no_champion_bootstraps_a_first_model_from_the_window(world: World,
                                                              tmp_path: Path) -> None:
    """An empty registry: the run fits the workflow on the window, trains from scratch on it,
    and promotes the result, which then recommends (with ids mapped back)."""
    config = tmp_path / "gru.json"
    config.write_text(json.dumps({"block": {"name": "gru", "d_model": 32, "n_layers": 1,
                                            "max_len": 12, "dropout": 0.0}}))
    s = settings(world, tmp_path, models_root=str(tmp_path / "fresh"), model_config_file=str(config),
                 bootstrap_epochs=4, bootstrap_lr=5e-3, window_hours=8, replay_hours=0)
    summary = run_once(s, now_ms=world.now_ms, trigger="bootstrap")
    assert (summary.outcome, summary.reason) == ("promoted", "bootstrap"), summary.error
    assert summary.champion is None and summary.decision is None
    assert set(summary.metrics) == {"challenger"}
    registry = ModelRegistry(tmp_path / "fresh")
    assert registry.current() == summary.version
    loaded = registry.load(summary.version)
    assert loaded.workflow is not None and loaded.model.config.block.name == "gru"
    # every item of the window's training slice got an id, and the model learned the window:
    # far better than chance (1 / #items) on the held-out queries.
    items = loaded.workflow.cardinalities["item_id"]
    assert summary.counts["new_items"] == items == loaded.model.num_items > 50
    assert summary.metrics["challenger"]["hr@10"] > 5 * 10 / items
    # a second run finds that champion and fine-tunes it (no second bootstrap)
    again = run_once(s, now_ms=world.now_ms)
    assert again.champion == summary.version and again.outcome in ("promoted", "rejected")
    assert again.reason != "bootstrap"


@cuda
@pytest.mark.gpu
def test_retrain_on_cuda_promotes_and_judges_the_champion_as_on_cpu(world: World,
                                                                     tmp_path: Path) -> None:
    on_gpu = run_once(settings(world, tmp_path / "gpu", device="cuda"), now_ms=world.now_ms)
    on_cpu = run_once(settings(world, tmp_path / "cpu", device="cpu"), now_ms=world.now_ms)
    assert on_gpu.outcome == on_cpu.outcome == "promoted", on_gpu.error
    assert on_gpu.counts == on_cpu.counts
    # the untrained (grown) champion is float32 on both: equal up to ties and rounding
    for name in ("ndcg@10", "hr@10"):
        assert abs(on_gpu.metrics["champion"][name] - on_cpu.metrics["champion"][name]) < 0.02
    assert on_gpu.metrics["challenger"]["ndcg@10"] > on_gpu.metrics["champion"]["ndcg@10"]


def test_cli_retrain_once_reports_and_respects_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no `streamrec up` state here: no Redis is found
    runner = CliRunner()
    env = {"STREAMREC_RETRAIN_MODELS_ROOT": str(tmp_path / "models"),
           "STREAMREC_RETRAIN_STATE_DIR": str(tmp_path / "state"),
           "STREAMREC_RETRAIN_ARCHIVE_ROOT": str(tmp_path / "archive"),
           "STREAMREC_RETRAIN_LOCK": "file", "STREAMREC_RETRAIN_PROGRESS": "false",
           "STREAMREC_RETRAIN_BOOTSTRAP": "false"}
    assert "--schedule" in runner.invoke(cli, ["retrain", "--help"]).output
    r = runner.invoke(cli, ["retrain"], env=env)
    assert r.exit_code == 2 and "either --once or --schedule" in r.output
    r = runner.invoke(cli, ["retrain", "--schedule", "every hour"], env=env)
    assert r.exit_code == 1 and "STREAMREC_RETRAIN_SCHEDULE" in r.output
    r = runner.invoke(cli, ["retrain", "--once"], env=env)
    assert r.exit_code == 1 and "no champion" in r.output  # a failed run: exit status 1
    held = FileLock(tmp_path / "state" / "lock")
    assert held.acquire()
    try:
        r = runner.invoke(cli, ["retrain", "--once"], env=env)
    finally:
        held.release()
    assert r.exit_code == 0 and "holds the lock" in r.output
