"""Training loop: AdamW, warm-up + decay, clipping, AMP, early stopping, resumable, DDP.

:class:`Trainer` fits a :class:`~model.model.SessionModel` on in-memory
:class:`~model.data.Sequences` and selects the epoch on the validation
queries (never on test). It runs the same under ``torchrun``: with
``WORLD_SIZE > 1`` in the environment the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU), each rank trains on its
slice of every global batch (:meth:`Sequences.batches` shards them so that the
ranks together see exactly the single-process batch of ``batch_size *
world_size``), validation is sharded and all-reduced, and only rank 0 writes
files and shows progress.

Resuming: with a ``state_dir``, the trainer writes, after every epoch, the
weights, the best weights so far, the optimizer and scheduler state, the RNG
states and the history (safetensors + JSON, never pickle), atomically;
``fit(resume=True)`` continues after the last finished epoch and ends where
an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.config_base import ConfigError, from_dict
from model.data import Sequences
from model.evaluation import evaluate
from model.model import SessionModel

__all__ = ["TrainConfig", "TrainResult", "Trainer", "distributed_context", "local_device"]

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "linear", "cosine")
STATE_FILE = "state.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a model is trained and selected.

    Fields:
        epochs: passes over the training sequences (the most; early stopping may end sooner).
        batch_size: sessions per step and rank.
        lr, weight_decay, betas: AdamW; weight decay applies to matrices only (not to
            biases and norm weights).
        warmup_steps: linear warm-up from 0 to ``lr``.
        schedule: after warm-up: ``constant``, ``linear`` or ``cosine`` decay to
            ``min_lr_ratio * lr`` at the last step.
        clip_grad_norm: global gradient-norm clipping (``None`` = off).
        amp: bfloat16 autocast on CUDA (ignored on CPU).
        compile: ``torch.compile`` the model on CUDA (ignored on CPU).
        eval_every: validate every this many epochs (and after the last).
        patience: stop after this many validations without improvement (``None`` = never).
        select_metric: the validation metric that picks the epoch (higher is better).
        eval_batch_size, ks, exclude_seen, sampled_negatives: validation, see
            :func:`model.evaluation.evaluate`.
        max_steps_per_epoch: cut epochs short (quick runs, tests).
        seed: weights are initialised by the caller; this seeds shuffling, masking
            and dropout.
        progress: a progress bar per epoch (rank 0 only).
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = 1.0
    amp: bool = True
    compile: bool = False
    eval_every: int = 1
    patience: int | None = 5
    select_metric: str = "ndcg@10"
    eval_batch_size: int = 256
    ks: tuple[int, ...] = (10, 20)
    exclude_seen: bool = True
    sampled_negatives: int | None = None
    max_steps_per_epoch: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "ks", tuple(self.ks))
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("lr must be > 0, weight_decay and warmup_steps >= 0")
        if self.select_metric.split("@")[0] not in ("ndcg", "hr", "recall", "mrr", "map"):
            raise ConfigError(f"select_metric {self.select_metric!r}: use e.g. 'ndcg@10'")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainConfig:
        return from_dict(cls, data)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a training run did: selection, history and cost.

    Fields:
        best_epoch: the epoch (1-based) whose weights the model holds after ``fit``.
        best_valid: validation metrics of that epoch.
        history: one dict per epoch (loss, lr, validation metrics when validated).
        epochs_run: epochs trained in total (across resumes).
        stopped_early: patience ran out before ``epochs``.
        train_seconds: wall time of the epochs this call ran (validation included).
        samples_per_second: training sessions per second over those epochs (all ranks).
        peak_memory_mb: peak RSS of this process, or peak CUDA memory allocated on a GPU.
    """

    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, Any]]
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    samples_per_second: float
    peak_memory_mb: float


def distributed_context(device: torch.device | str | None = None) -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group when ``torchrun`` started us.

    The backend follows ``device``: NCCL for CUDA, gloo for the CPU (a CPU run on a
    GPU machine must not get NCCL, which cannot reduce CPU tensors). Without a
    device: NCCL whenever CUDA is available.

    >>> distributed_context("cpu")  # not under torchrun
    (0, 1)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = (torch.device(device).type == "cuda" if device is not None
                else torch.cuda.is_available())
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: torch.device | str) -> torch.device:
    """``device`` for this process: a bare ``"cuda"`` is ``cuda:LOCAL_RANK`` under ``torchrun``.

    >>> local_device("cpu"), local_device("cuda:1")
    (device(type='cpu'), device(type='cuda', index=1))
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of ``lr`` at optimizer step ``step`` (0-based) of ``total``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases or norm weights)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _better(value: float, best: float | None) -> bool:
    return best is None or value > best


class Trainer:
    """Fits ``model`` on ``train``; selects on ``valid`` = (histories, next-item targets).

    Args:
        model: an initialised model (its weights are trained in place; after
            :meth:`fit` it holds the selected epoch's weights).
        config: the training config.
        train: training sequences (every position predicts under CLM, etc.).
        valid: validation queries; ``None`` trains all epochs without selection.
        device: where to train.
        state_dir: where resumable training state is written (rank 0); ``None`` = nowhere.
    """

    def __init__(self, model: SessionModel, config: TrainConfig, train: Sequences,
                 valid: tuple[Sequences, torch.Tensor] | None = None, *,
                 device: torch.device | str = "cpu", state_dir: str | os.PathLike[str] | None = None):
        self.model = model
        self.config = config
        self.train_data = train
        self.valid = valid
        self.device = local_device(device)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.rank, self.world_size = distributed_context(self.device)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
            weight_decay=config.weight_decay)
        steps = train.num_batches(config.batch_size, self.world_size)
        if config.max_steps_per_epoch is not None:
            steps = min(steps, config.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.total_steps = steps * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _lr_factor(s, self.total_steps, config))
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + self.rank)
        torch.manual_seed(config.seed + self.rank)  # dropout
        cuda = self.device.type == "cuda"
        self._amp = config.amp and cuda
        net: torch.nn.Module = model
        if self.world_size > 1:
            net = DistributedDataParallel(model, device_ids=[self.device] if cuda else None)
        self._net = torch.compile(net) if config.compile and cuda else net
        self._history: list[dict[str, Any]] = []
        self._best: tuple[float, int, dict[str, float]] | None = None  # (value, epoch, metrics)
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._stale = 0
        self._epoch = 0
        self._stopped = False

    # -- the loop --------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        """Train, validate, stop early; the model ends with the best validated weights."""
        cfg = self.config
        if resume:
            self._load_state()
        start, samples = time.perf_counter(), 0
        stopped = self._stopped  # a resumed run that had stopped early trains no more
        while self._epoch < cfg.epochs and not stopped:
            epoch = self._epoch + 1
            loss, n = self._train_epoch(epoch)
            samples += n
            row: dict[str, Any] = {"epoch": epoch, "loss": loss,
                                   "lr": self.scheduler.get_last_lr()[0]}
            if self.valid is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                metrics = self.validate()
                row["valid"] = metrics
                value = metrics[cfg.select_metric]
                if _better(value, self._best[0] if self._best else None):
                    self._best = (value, epoch, metrics)
                    self._best_weights = {k: v.detach().clone()
                                          for k, v in self.model.state_dict().items()}
                    self._stale = 0
                else:
                    self._stale += 1
                stopped = cfg.patience is not None and self._stale >= cfg.patience
                logger.info("epoch %d loss %.4f valid %s=%.4f (best %.4f @ %d)", epoch, loss,
                            cfg.select_metric, value, self._best[0], self._best[1])
            else:
                logger.info("epoch %d loss %.4f", epoch, loss)
            self._history.append(row)
            self._epoch = epoch
            self._save_state(stopped)
        seconds = time.perf_counter() - start
        if self._best_weights is not None:
            self.model.load_state_dict(self._best_weights)
        best_epoch, best_valid = ((self._best[1], self._best[2]) if self._best
                                  else (self._epoch, {}))
        return TrainResult(
            best_epoch=best_epoch, best_valid=best_valid, history=list(self._history),
            epochs_run=self._epoch, stopped_early=stopped, train_seconds=seconds,
            samples_per_second=samples * self.world_size / seconds if seconds > 0 else 0.0,
            peak_memory_mb=self._peak_memory_mb())

    def _train_epoch(self, epoch: int) -> tuple[float, int]:
        cfg = self.config
        self.model.train()
        batches = self.train_data.batches(
            cfg.batch_size, self.model.config.max_len, shuffle=True, seed=cfg.seed,
            epoch=epoch, rank=self.rank, world_size=self.world_size)
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}", unit="batch",
                   disable=not cfg.progress or self.rank != 0, leave=False)
        total, count, samples = 0.0, 0, 0
        for step, batch in enumerate(batches):
            if step >= self.steps_per_epoch:
                break
            b = batch.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
                out = self._net(b.features, b.mask, generator=self.generator)
            value = float(out.loss.detach())
            if not math.isfinite(value):  # before the step: the weights stay the last good ones
                raise FloatingPointError(
                    f"epoch {epoch} step {step}: loss is {value}; lower lr or enable clipping")
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            total, count, samples = total + value, count + 1, samples + b.batch_size
            bar.update()
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        return total / max(count, 1), samples

    def validate(self) -> dict[str, float]:
        """Validation metrics of the current weights (sharded and all-reduced under DDP)."""
        if self.valid is None:
            raise ValueError("no validation queries were given")
        cfg = self.config
        return evaluate(self.model, *self.valid, batch_size=cfg.eval_batch_size, ks=cfg.ks,
                        exclude_seen=cfg.exclude_seen, sampled_negatives=cfg.sampled_negatives,
                        device=self.device, rank=self.rank, world_size=self.world_size,
                        seed=cfg.seed)

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    # -- resumable state -------------------------------------------------------------

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states as ``rng.<name>.<rank>`` (gathered to all ranks under DDP).

        Each rank draws its own dropout and masking randomness, so resuming
        must give each rank back its own streams, not rank 0's.
        """
        local = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            local["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world_size == 1:
            return {f"rng.{name}.0": state for name, state in local.items()}
        out = {}
        for name, state in local.items():  # same name order and sizes on every rank
            mine = state.to(self.device)
            parts = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(parts, mine)
            out.update({f"rng.{name}.{r}": part.cpu() for r, part in enumerate(parts)})
        return out

    def _save_state(self, stopped: bool) -> None:
        if self.state_dir is None:
            return
        rng = self._rng_states()  # a collective: every rank takes part
        if self.rank != 0:
            return
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.state_dir.name}.", dir=self.state_dir.parent))
        save_model(self.model, str(tmp / "model.safetensors"))
        if self._best_weights is not None:  # clones: tied tensors are stored twice, unshared
            save_file(self._best_weights, str(tmp / "best.safetensors"))
        opt = self.optimizer.state_dict()
        tensors = {f"opt.{i}.{k}": v for i, st in opt["state"].items()
                   for k, v in st.items() if isinstance(v, torch.Tensor)}
        tensors.update(rng)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        doc = {"epoch": self._epoch, "stale": self._stale, "stopped": stopped,
               "best": list(self._best) if self._best else None, "history": self._history,
               "param_groups": opt["param_groups"],
               "scheduler": self.scheduler.state_dict(), "config": dataclasses.asdict(self.config)}
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        old = self.state_dir.with_name(self.state_dir.name + ".old")
        if self.state_dir.exists():
            os.replace(self.state_dir, old)
        os.replace(tmp, self.state_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _load_state(self) -> None:
        if self.state_dir is None or not (self.state_dir / STATE_FILE).exists():
            logger.info("no training state to resume from; starting at epoch 1")
            return
        doc = json.loads((self.state_dir / STATE_FILE).read_text(encoding="utf-8"))
        load_model(self.model, str(self.state_dir / "model.safetensors"), device=str(self.device))
        tensors = load_file(str(self.state_dir / "optimizer.safetensors"), device="cpu")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
        self.scheduler.load_state_dict(doc["scheduler"])
        if f"rng.torch.{self.rank}" in tensors:
            torch.set_rng_state(tensors[f"rng.torch.{self.rank}"])
            self.generator.set_state(tensors[f"rng.generator.{self.rank}"])
            if f"rng.cuda.{self.rank}" in tensors and self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{self.rank}"], self.device)
        else:
            logger.warning("the state was saved with fewer ranks: rank %d's random streams "
                           "start again from the seed (the run will not match one without "
                           "the restart)", self.rank)
        best_path = self.state_dir / "best.safetensors"
        if best_path.exists():
            best = load_file(str(best_path), device=str(self.device))
            self._best_weights = {k: best[k] for k in self.model.state_dict()}
        self._best = tuple(doc["best"]) if doc["best"] else None  # type: ignore[assignment]
        self._history = doc["history"]
        self._stale = doc["stale"]
        self._epoch = doc["epoch"]
        self._stopped = doc["stopped"]
        logger.info("resumed after epoch %d", self._epoch)

