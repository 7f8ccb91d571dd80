"""model.trainer: learning, early stopping, schedules, clipping, exact resume, NaN guard, config.

The data is a deterministic chain: every session walks a fixed random
permutation of the catalogue (the next item is a function of the previous
one), so a one-layer SASRec learns it in a few epochs and a random model
cannot guess it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from features.schema import Feature, Kind, Schema, Tag
from model.config_base import ConfigError
from model.data import Sequences, leave_one_out
from model.evaluation import evaluate
from model.model import ModelConfig, SessionModel
from model.trainer import TrainConfig, Trainer, _lr_factor

N_ITEMS = 24  # real items
FIRST = 3  # categorify: 0 padding, 1 missing, 2 the OOV bucket
SCHEMA = Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                         transform={"op": "categorify"}, cardinality=FIRST + N_ITEMS)])


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: threads only add overhead on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chain_sessions(n_sessions: int = 48, length: int = 8, seed: int = 0) -> Sequences:
    """Sessions that follow one permutation of the items from a random start."""
    gen = torch.Generator().manual_seed(seed)
    step = torch.randperm(N_ITEMS, generator=gen)  # item i -> item step[i]
    starts = torch.randint(N_ITEMS, (n_sessions,), generator=gen)
    sessions = []
    for x in starts.tolist():
        seq = []
        for _ in range(length):
            seq.append(FIRST + x)
            x = int(step[x])
        sessions.append(seq)
    return Sequences.from_lists({"item_id": sessions})


SPLIT = leave_one_out(chain_sessions())


def tiny_model(dropout: float = 0.0, seed: int = 0) -> SessionModel:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({"block": {"name": "sasrec", "d_model": 16, "n_heads": 1,
                                           "n_layers": 1, "max_len": 8, "dropout": dropout}})
    return SessionModel(SCHEMA, cfg)


def config(**kw: object) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 16, "lr": 3e-2, "patience": None, "progress": False}
    return TrainConfig.from_dict({**base, **kw})


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- learning ---------------------------------------------------------------------------


def test_training_learns_a_deterministic_transition() -> None:
    model = tiny_model()
    before = evaluate(model, *SPLIT.valid)["ndcg@10"]
    result = Trainer(model, config(epochs=8), SPLIT.train, SPLIT.valid).fit()
    after = result.best_valid["ndcg@10"]
    # 24 candidates minus the 5 seen ones: chance NDCG@10 is ~0.25
    assert before < 0.4
    assert after > 0.8 and after > before + 0.4
    valid = [row["valid"]["ndcg@10"] for row in result.history]
    assert result.best_epoch == 1 + valid.index(max(valid))
    assert result.epochs_run == 8 and not result.stopped_early
    assert result.samples_per_second > 0 and result.peak_memory_mb > 0
    assert all(math.isfinite(row["loss"]) for row in result.history)


# -- early stopping and selection -----------------------------------------------------


class ScriptedValidation(Trainer):
    """Validation returns scripted values and snapshots the weights it "validated"."""

    def __init__(self, values: list[float], *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.values = list(values)
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def validate(self) -> dict[str, float]:
        self.snapshots.append(weights(self.model))
        return {"ndcg@10": self.values[len(self.snapshots) - 1]}


def test_early_stopping_restores_the_best_validated_epoch() -> None:
    model = tiny_model()
    trainer = ScriptedValidation([0.3, 0.5, 0.4, 0.5, 0.9], model, config(epochs=5, patience=2),
                                 SPLIT.train, SPLIT.valid)
    result = trainer.fit()
    # 0.4 and then a tie with 0.5 are two validations without improvement: stop after epoch 4
    assert (result.best_epoch, result.epochs_run, result.stopped_early) == (2, 4, True)
    assert result.best_valid == {"ndcg@10": 0.5}
    assert [row["valid"]["ndcg@10"] for row in result.history] == [0.3, 0.5, 0.4, 0.5]
    assert same_weights(weights(model), trainer.snapshots[1])
    assert not same_weights(weights(model), trainer.snapshots[3])


def test_a_model_that_cannot_improve_stops_after_patience(tmp_path: Path) -> None:
    model = tiny_model()
    cfg = config(epochs=6, lr=1e-9, patience=1)
    result = Trainer(model, cfg, SPLIT.train, SPLIT.valid, state_dir=tmp_path / "s").fit()
    assert (result.best_epoch, result.epochs_run, result.stopped_early) == (1, 2, True)
    assert evaluate(model, *SPLIT.valid) == result.best_valid  # the model holds epoch 1
    with safe_open(tmp_path / "s" / "best.safetensors", "pt") as f:
        best = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert same_weights(weights(model), best)

    # resuming a run that stopped early trains no more and reports the same
    again = Trainer(tiny_model(seed=5), cfg, SPLIT.train, SPLIT.valid, state_dir=tmp_path / "s")
    resumed = again.fit(resume=True)
    assert (resumed.best_epoch, resumed.epochs_run, resumed.stopped_early) == (1, 2, True)
    assert resumed.history == result.history and same_weights(weights(again.model), best)


def test_eval_every_validates_on_its_epochs_and_the_last() -> None:
    result = Trainer(tiny_model(), config(epochs=5, eval_every=2), SPLIT.train,
                     SPLIT.valid).fit()
    assert [("valid" in row) for row in result.history] == [False, True, False, True, True]


# -- schedules and clipping -----------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "min_ratio", "expected"),
    [
        ("constant", 0.0, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        # warm-up 2 of 10 steps, then over 8 steps: progress 0, 1/4, 1/2, 1 (and past the end)
        ("linear", 0.0, [0.5, 1.0, 1.0, 0.75, 0.5, 0.0]),
        ("linear", 0.1, [0.5, 1.0, 1.0, 0.775, 0.55, 0.1]),
        ("cosine", 0.0, [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0]),
    ],
)
def test_lr_factor_warms_up_then_decays(schedule: str, min_ratio: float,
                                        expected: list[float]) -> None:
    cfg = TrainConfig(warmup_steps=2, schedule=schedule, min_lr_ratio=min_ratio)
    got = [_lr_factor(step, 10, cfg) for step in (0, 1, 2, 4, 6, 10)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert _lr_factor(12, 10, cfg) == pytest.approx(expected[-1])  # clamped after the end


def test_the_optimizer_follows_the_schedule() -> None:
    # 32 sessions / 16 = 2 steps per epoch, 3 epochs = 6 steps, linear decay without warm-up
    train = SPLIT.train.select(torch.arange(32))
    result = Trainer(tiny_model(), config(epochs=3, lr=0.6, schedule="linear"), train).fit()
    assert [row["lr"] for row in result.history] == pytest.approx([0.4, 0.2, 0.0])


def _grad_norms_at_step(clip: float | None, lr: float = 1e-2) -> tuple[list[float], Trainer]:
    model = tiny_model()
    trainer = Trainer(model, config(epochs=2, lr=lr, clip_grad_norm=clip), SPLIT.train)
    norms: list[float] = []

    def record(*_: object) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    trainer.optimizer.register_step_pre_hook(record)
    trainer.fit()
    return norms, trainer


def test_gradient_clipping_bounds_the_norm_the_optimizer_sees() -> None:
    clipped, _ = _grad_norms_at_step(clip=0.05)
    free, _ = _grad_norms_at_step(clip=None)
    assert len(clipped) == 6 and max(clipped) <= 0.05 + 1e-6
    assert min(free) > 0.05  # without clipping the same steps have larger gradients


def test_a_huge_learning_rate_with_clipping_stays_finite() -> None:
    norms, trainer = _grad_norms_at_step(clip=1.0, lr=10.0)
    assert all(math.isfinite(n) for n in norms)
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


# -- resume -----------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class CrashesInEpoch3(Trainer):
    """Dies after training epoch 3, before its state is written (the weights moved on)."""

    def validate(self) -> dict[str, float]:
        if self.scheduler.last_epoch == 3 * self.steps_per_epoch:
            raise Interrupted
        return super().validate()


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path: Path) -> None:
    # dropout > 0 and a warm-up + cosine schedule: RNG, scheduler and optimizer must come back
    cfg = config(epochs=4, warmup_steps=3, schedule="cosine", lr=1e-2)
    model = tiny_model(dropout=0.3)
    straight = Trainer(model, cfg, SPLIT.train, SPLIT.valid).fit()

    first = tiny_model(dropout=0.3)
    with pytest.raises(Interrupted):
        CrashesInEpoch3(first, cfg, SPLIT.train, SPLIT.valid, state_dir=tmp_path / "s").fit()
    saved = json.loads((tmp_path / "s" / "state.json").read_text())
    assert saved["epoch"] == 2

    fresh = tiny_model(dropout=0.3, seed=99)  # other initial weights: all must be loaded
    resumed = Trainer(fresh, cfg, SPLIT.train, SPLIT.valid, state_dir=tmp_path / "s").fit(
        resume=True)
    assert same_weights(weights(fresh), weights(model))
    assert resumed.history == straight.history
    assert (resumed.best_epoch, resumed.epochs_run) == (straight.best_epoch, 4)


def test_state_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    state = tmp_path / "s"
    Trainer(tiny_model(), config(epochs=1), SPLIT.train, SPLIT.valid, state_dir=state).fit()
    files = sorted(p.name for p in state.iterdir())
    assert files == ["best.safetensors", "model.safetensors", "optimizer.safetensors",
                     "state.json"]
    assert not list(tmp_path.glob(".s.*")) and not (tmp_path / "s.old").exists()
    for name in files:  # each parses as what its name says: no pickle anywhere
        raw = (state / name).read_bytes()
        if name.endswith(".safetensors"):  # 8-byte little-endian length, then a JSON header
            raw = raw[8 : 8 + int.from_bytes(raw[:8], "little")]
        assert isinstance(json.loads(raw), dict)
    with safe_open(state / "optimizer.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"rng.torch.0", "rng.generator.0"} <= keys
    assert any(k.startswith("opt.") and k.endswith(".exp_avg") for k in keys)
    assert json.loads((state / "state.json").read_text())["epoch"] == 1


def test_resume_without_state_starts_at_epoch_one(tmp_path: Path) -> None:
    result = Trainer(tiny_model(), config(epochs=1), SPLIT.train, SPLIT.valid,
                     state_dir=tmp_path / "none").fit(resume=True)
    assert result.epochs_run == 1 and len(result.history) == 1


# -- failures ---------------------------------------------------------------------------


def test_a_nan_loss_stops_before_the_weights_are_touched() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.inputs.item_embedding.weight[FIRST:] = float("nan")  # every real item
    before = weights(model)
    with pytest.raises(FloatingPointError, match=r"epoch 1 step 0: loss is nan; lower lr"):
        Trainer(model, config(), SPLIT.train, SPLIT.valid).fit()
    torch.testing.assert_close(weights(model), before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"patiense": 2}, "unknown key 'patiense' (did you mean 'patience'?)"),
        ({"schedule": "cosin"}, "schedule 'cosin' is not one of constant, linear, cosine"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"select_metric": "auc"}, "select_metric 'auc'"),
    ],
)
def test_train_config_rejects_unknown_keys_and_bad_values(data: dict[str, object],
                                                          message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_dict(data)


# -- CUDA -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_with_bf16_autocast_learns_and_saves_cuda_rng(tmp_path: Path) -> None:
    model = tiny_model()
    cfg = config(epochs=8, amp=True)
    result = Trainer(model, cfg, SPLIT.train, SPLIT.valid, device="cuda",
                     state_dir=tmp_path / "s").fit()
    assert next(model.parameters()).device.type == "cuda"
    assert result.best_valid["ndcg@10"] > 0.8
    with safe_open(tmp_path / "s" / "optimizer.safetensors", "pt") as f:
        assert "rng.cuda.0" in set(f.keys())
    # the CUDA-trained weights score the same on the CPU
    cpu = evaluate(model.cpu(), *SPLIT.valid)
    assert cpu == pytest.approx(result.best_valid, abs=0.02)  # a near-tie may flip a rank
