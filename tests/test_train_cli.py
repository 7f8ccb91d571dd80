"""`streamrec train`: options, a leave-one-out run end to end, config errors, and DDP.

The DDP test runs the real command under ``torchrun`` with two CPU ranks (gloo)
and checks that it trains exactly what one process with the doubled batch
trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from features.schema import Feature, Kind, Schema, Tag
from features.sequences import write_sequences
from features.workflow import Workflow
from model.checkpoint import load_checkpoint
from model.data import Sequences, leave_one_out
from model.evaluation import evaluate
from streamrec.cli import cli

REPO = Path(__file__).resolve().parents[1]
N_ITEMS, LENGTH = 30, 8
MODEL = {"block": {"name": "sasrec", "d_model": 16, "n_heads": 1, "n_layers": 1,
                   "max_len": LENGTH, "dropout": 0.0}}
TRAIN = {"epochs": 3, "lr": 3e-3, "patience": None}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chain_events(n_sessions: int, seed: int) -> pa.Table:
    """Sessions of LENGTH events walking one permutation of the items (learnable)."""
    rng = np.random.default_rng(seed)
    step = np.random.default_rng(0).permutation(N_ITEMS)
    sid, items, ts = [], [], []
    for s in range(n_sessions):
        x = int(rng.integers(N_ITEMS))
        for t in range(LENGTH):
            sid.append(f"{seed}-{s}")
            items.append(f"i{x}")
            ts.append(t)
            x = int(step[x])
    return pa.table({"session_id": sid, "item_id": items, "ts": ts})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fitted workflow, train / valid sequences and config files in one folder."""
    root = tmp_path_factory.mktemp("train")
    schema = Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                             transform={"op": "categorify", "min_freq": 1})])
    events = chain_events(64, seed=1)
    workflow = Workflow(schema, max_len=LENGTH).fit(events)
    workflow.save(root / "workflow")
    write_sequences(events, workflow, root / "train.parquet", progress=False)
    write_sequences(chain_events(16, seed=2), workflow, root / "valid.parquet", progress=False)
    (root / "model.json").write_text(json.dumps(MODEL))
    (root / "train.json").write_text(json.dumps(TRAIN))
    return {"root": root, "workflow": root / "workflow", "sequences": root / "train.parquet",
            "valid": root / "valid.parquet", "model": root / "model.json",
            "train": root / "train.json"}


def train_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--sequences", str(inputs["sequences"]), "--workflow", str(inputs["workflow"]),
            "--model-config", str(inputs["model"]), "--train-config", str(inputs["train"]),
            "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def test_train_help_lists_every_option() -> None:
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--sequences", "--workflow", "--model-config", "--train-config", "--split",
                   "leave-one-out", "last-item", "--valid", "--out", "--device", "--epochs",
                   "--batch-size", "--seed", "--state-dir", "--resume", "--no-progress"):
        assert option in result.output, option
    documented = [p for p in cli.commands["train"].params if not p.help]
    assert documented == [], [p.name for p in documented]


def test_leave_one_out_run_writes_a_loadable_version(inputs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    out = tmp_path / "v1"
    args = train_args(inputs, out, "--batch-size", "16", "--seed", "3")
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 0, result.output
    assert f"saved  {out}" in result.output and "best epoch" in result.output

    ckpt = load_checkpoint(out)
    metrics, info = ckpt.metrics, ckpt.info
    assert {"ndcg@10", "hr@10"} <= set(metrics["valid"]) and {"ndcg@10", "hr@10"} <= set(
        metrics["test"])
    assert len(metrics["history"]) == metrics["epochs_run"] == 3
    valid = [row["valid"]["ndcg@10"] for row in metrics["history"]]
    assert metrics["best_epoch"] == 1 + valid.index(max(valid))
    assert metrics["valid"]["ndcg@10"] == max(valid)
    assert metrics["train_seconds"] > 0 and metrics["samples_per_second"] > 0
    assert metrics["peak_memory_mb"] > 0
    assert info["split"] == "leave-one-out" and info["world_size"] == 1 and info["seed"] == 3
    assert info["sequences"] == str(inputs["sequences"])
    assert info["train_config"]["batch_size"] == 16
    assert ckpt.workflow is not None

    # the saved weights are the selected ones: their test metrics are the reported ones
    split = leave_one_out(Sequences.from_parquet(inputs["sequences"]))
    assert evaluate(ckpt.model, *split.test) == pytest.approx(metrics["test"], abs=1e-9)
    assert evaluate(ckpt.model, *split.valid) == pytest.approx(metrics["valid"], abs=1e-9)


def test_last_item_split_validates_on_the_valid_file(inputs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "v2"
    args = train_args(inputs, out, "--split", "last-item", "--valid", str(inputs["valid"]),
                      "--epochs", "1")
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 0, result.output
    metrics = load_checkpoint(out).metrics
    assert metrics["test"] is None and metrics["epochs_run"] == 1
    assert "ndcg@10" in metrics["valid"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split", "last-item"], "--valid is needed with --split last-item"),
        (["--resume"], "--resume needs --state-dir"),
    ],
)
def test_inconsistent_options_are_usage_errors(inputs: dict[str, Path], tmp_path: Path,
                                               extra: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["train", *train_args(inputs, tmp_path / "v", *extra)])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    ("which", "doc", "message"),
    [
        ("model", {**MODEL, "maskng": "clm"}, "unknown key 'maskng' (did you mean 'masking'?)"),
        ("model", {"block": {**MODEL["block"], "n_layer": 2}}, "unknown key 'n_layer'"),
        ("train", {"learning_rate": 0.1}, "TrainConfig: unknown key 'learning_rate'"),
        ("train", {"schedule": "cosin"}, "schedule 'cosin' is not one of"),
    ],
)
def test_bad_config_exits_naming_the_key(inputs: dict[str, Path], tmp_path: Path, which: str,
                                         doc: dict[str, object], message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    args = train_args({**inputs, which: bad}, tmp_path / "v")
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 1, result.output
    assert message in result.output and str(bad) in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "v").exists()


def test_an_existing_out_dir_is_refused_before_training(inputs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    result = CliRunner().invoke(cli, ["train", *train_args(inputs, tmp_path / "v")])
    assert result.exit_code == 1 and "versions are immutable" in result.output
    assert "best epoch" not in result.output


# -- DDP ----------------------------------------------------------------------------------


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_two_rank_ddp_trains_what_one_process_with_the_double_batch_trains(
        inputs: dict[str, Path], tmp_path: Path) -> None:
    # Every training sequence has the same length (LENGTH - 2 after leave-one-out), so every
    # rank's batch holds the same number of CLM targets. DDP averages the ranks' gradients
    # with equal weights; that equals the gradient of the single process's mean loss over
    # both halves only when both halves have equally many targets (otherwise the targets of
    # the shorter half would weigh more). Dropout 0 and CLM with a full softmax draw no
    # random numbers, so the per-rank seeds of the trainer do not matter.
    b = 8
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one_process = train_args(inputs, single, "--batch-size", str(2 * b))
    result = CliRunner().invoke(cli, ["train", *one_process])  # in this process: faster
    assert result.exit_code == 0, result.output
    proc = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "streamrec", "train",
                 *train_args(inputs, ddp, "--batch-size", str(b), "--state-dir",
                             str(tmp_path / "state"))], tmp_path)
    assert proc.stdout.count("saved  ") == 1  # rank 0 alone prints and writes

    a, d = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert a.keys() == d.keys()
    # The key bias of SASRec's fused qkv projection cancels in the softmax: its true gradient
    # is 0, so it only receives rounding noise, which Adam's normalisation turns into steps
    # of size ~lr. It does not change the function; the scores are compared below instead.
    key_bias = slice(MODEL["block"]["d_model"], 2 * MODEL["block"]["d_model"])
    for name in a:
        x, y = a[name], d[name]
        if name.endswith("attn.qkv.bias"):
            x, y = torch.cat([x[: key_bias.start], x[key_bias.stop :]]), torch.cat(
                [y[: key_bias.start], y[key_bias.stop :]])
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=name)

    split = leave_one_out(Sequences.from_parquet(inputs["sequences"]))
    history, _ = split.test
    batch = next(history.batches(len(history), LENGTH))
    one, two = load_checkpoint(single).model, load_checkpoint(ddp).model
    with torch.no_grad():
        torch.testing.assert_close(one.score(batch.features, batch.mask),
                                   two.score(batch.features, batch.mask), rtol=0, atol=1e-5)

    m1 = json.loads((single / "metrics.json").read_text())
    m2 = json.loads((ddp / "metrics.json").read_text())
    assert m1["best_epoch"] == m2["best_epoch"]
    assert m2["valid"] == pytest.approx(m1["valid"], abs=1e-9)
    assert m2["test"] == pytest.approx(m1["test"], abs=1e-9)
    for r1, r2 in zip(m1["history"], m2["history"], strict=True):
        assert r2["valid"] == pytest.approx(r1["valid"], abs=1e-9)
    assert json.loads((ddp / "config.json").read_text())["info"]["world_size"] == 2

    # the resumable state keeps each rank's own random streams (seeded seed + rank)
    with safe_open(tmp_path / "state" / "optimizer.safetensors", "pt") as f:
        rng = [f.get_tensor(f"rng.torch.{r}") for r in (0, 1)]
    assert not torch.equal(rng[0], rng[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_writes_a_version_that_loads_on_the_cpu(inputs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    args = [a if a != "cpu" else "cuda" for a in train_args(inputs, out)]
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out, device="cpu")
    split = leave_one_out(Sequences.from_parquet(inputs["sequences"]))
    # bf16 autocast trained it; the CPU evaluates it in float32: close, not equal
    assert evaluate(ckpt.model, *split.test)["hr@10"] == pytest.approx(
        ckpt.metrics["test"]["hr@10"], abs=0.05)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(inputs: dict[str, Path], tmp_path: Path) -> None:
    args = [a if a != "cpu" else "cuda" for a in train_args(inputs, tmp_path / "v")]
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 1 and "no CUDA device here; use --device cpu" in result.output
