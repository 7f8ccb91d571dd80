"""Prediction heads: next-item prediction and whole-session tasks.

A head sees only tensors. The model gathers the hidden states of the positions
that carry a target and hands them over flattened to ``[N, D]``; the head turns
them into a scalar loss in training and into scores at inference.

Item ids follow the feature pipeline: ``0`` padding, ``1`` missing,
``2 .. first_item_id - 1`` out-of-vocabulary buckets, ``first_item_id ..
num_items - 1`` real items. Only real items are ever scored as candidates or
used as negatives; the special ids score ``-inf`` in :meth:`NextItemHead.item_scores`.

Three next-item losses (``NextItemConfig.loss``):

* ``"full"``: softmax cross-entropy over every real item.
* ``"sampled"``: sampled softmax. ``K`` negatives are drawn once per call from a
  proposal ``Q`` over real items and shared by all rows; every candidate logit
  is corrected by ``- log Q(item)`` (log-Q correction), a negative equal to the
  row's positive (accidental hit) is masked out. Never builds ``[N, num_items]``.
* ``"bce"``: SASRec's binary cross-entropy. Each positive gets ``K`` uniform
  negatives (never the positive itself); the loss of a row is
  ``-log s(pos) - mean_k log(1 - s(neg_k))`` with ``s`` the sigmoid, averaged
  over rows. With ``K = 1`` this is SASRec's "mean positive term + mean
  negative term".

Logits are ``(h . w_item + b_item) / temperature``; the log-Q correction is
applied after the temperature, to the logit the softmax sees.

>>> emb = nn.Embedding(6, 4)
>>> head = NextItemHead(4, 6, first_item_id=3, config=NextItemConfig(), item_embedding=emb)
>>> scores = head.item_scores(torch.randn(2, 4))
>>> scores.shape, bool(torch.isinf(scores[:, :3]).all()), bool(scores[:, 3:].isfinite().all())
(torch.Size([2, 6]), True, True)
>>> head.loss(torch.randn(2, 4), torch.tensor([3, 5])).shape
torch.Size([])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config_base import ConfigError, from_dict

__all__ = [
    "NextItemConfig",
    "NextItemHead",
    "SequenceTaskConfig",
    "SequenceTaskHead",
    "combine_losses",
    "sample_proposal",
    "uniform_negatives_excluding",
]

LOSSES = ("full", "sampled", "bce")
SAMPLERS = ("uniform", "popularity")
TASK_KINDS = ("binary", "regression")


# --- pure sampling functions ---------------------------------------------------------------


def sample_proposal(
    num_samples: int,
    first_item_id: int,
    num_items: int,
    probs: Tensor | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``num_samples`` real item ids drawn with replacement from ``Q``: uniform, or ``probs``.

    ``probs`` is ``[num_items - first_item_id]`` over the real items (need not
    sum to one); the ids returned are absolute (offset by ``first_item_id``).

    >>> g = torch.Generator().manual_seed(0)
    >>> ids = sample_proposal(100, 3, 6, generator=g)
    >>> ids.shape, int(ids.min()) >= 3, int(ids.max()) <= 5
    (torch.Size([100]), True, True)
    >>> sample_proposal(4, 3, 6, probs=torch.tensor([0.0, 0.0, 1.0])).tolist()
    [5, 5, 5, 5]
    """
    if probs is None:
        return torch.randint(
            first_item_id, num_items, (num_samples,), device=device, generator=generator
        )
    idx = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # [K]
    return idx + first_item_id


def uniform_negatives_excluding(
    targets: Tensor,
    first_item_id: int,
    num_items: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``[N, K]`` ids uniform over the real items other than each row's target.

    Draws from the ``R - 1`` non-target real items directly (no resampling):
    a draw ``>= target`` is shifted up by one, which skips the target exactly.

    >>> t = torch.tensor([3, 4, 5])
    >>> neg = uniform_negatives_excluding(t, 3, 6, 50, generator=torch.Generator().manual_seed(0))
    >>> neg.shape, bool((neg != t[:, None]).all()), int(neg.min()) >= 3, int(neg.max()) <= 5
    (torch.Size([3, 50]), True, True, True)
    """
    if num_items - first_item_id < 2:
        raise ValueError("need at least 2 real items to draw a negative that is not the target")
    shape = (targets.shape[0], num_negatives)
    draws = torch.randint(
        first_item_id, num_items - 1, shape, device=targets.device, generator=generator
    )  # [N, K]
    return draws + (draws >= targets[:, None]).long()  # [N, K]


def _zero_with_graph(t: Tensor) -> Tensor:
    """A scalar ``0.0`` connected to ``t`` (zero gradient), so ``backward()`` still works."""
    return t.new_zeros(()) + t.sum() * 0.0  # new_zeros first: +0.0, never -0.0


# --- next-item head ------------------------------------------------------------------------


@dataclass(frozen=True)
class NextItemConfig:
    """Next-item prediction head.

    Attributes:
        loss: ``"full"`` softmax over the catalogue, ``"sampled"`` sampled softmax with
            log-Q correction (large catalogues), ``"bce"`` SASRec's binary cross-entropy.
        weight_tying: score items with the input item-embedding table (T4Rec/SASRec default).
        temperature: logits are divided by it; ``> 0``.
        label_smoothing: in ``[0, 1)``; only with ``loss="full"``.
        num_negatives: ``"sampled"``: negatives per call, shared by all rows;
            ``"bce"``: negatives per positive (SASRec uses 1). ``>= 1``.
        sampler: proposal ``Q`` of ``"sampled"``: ``"uniform"`` over real items or
            ``"popularity"`` (proportional to the ``item_counts`` given to the head).
        bias: a learned per-item output bias.

    >>> NextItemConfig.from_dict({"loss": "bce", "num_negatives": 1}).loss
    'bce'
    >>> NextItemConfig.from_dict({"loss": "bce", "label_smoothing": 0.1})
    Traceback (most recent call last):
    ...
    model.config_base.ConfigError: NextItemConfig: label_smoothing=0.1 applies only to loss='full' (got loss='bce'); set it to 0.0 or use loss='full'
    """

    loss: str = "full"
    weight_tying: bool = True
    temperature: float = 1.0
    label_smoothing: float = 0.0
    num_negatives: int = 256
    sampler: str = "uniform"
    bias: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler={self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature={self.temperature!r} must be a number > 0")
        if not (0.0 <= self.label_smoothing < 1.0):
            raise ConfigError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        if self.label_smoothing > 0 and self.loss != "full":
            raise ConfigError(
                f"label_smoothing={self.label_smoothing} applies only to loss='full' "
                f"(got loss={self.loss!r}); set it to 0.0 or use loss='full'"
            )
        if isinstance(self.num_negatives, bool) or not isinstance(self.num_negatives, int):
            raise ConfigError(f"num_negatives={self.num_negatives!r} must be an int")
        if self.num_negatives < 1:
            raise ConfigError(f"num_negatives={self.num_negatives} must be >= 1")
        if self.sampler != "uniform" and self.loss != "sampled":
            raise ConfigError(
                f"sampler={self.sampler!r} applies only to loss='sampled' "
                f"(got loss={self.loss!r}); remove it or use loss='sampled'"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> NextItemConfig:
        """Build from a plain dict; unknown keys and invalid values raise ``ConfigError``."""
        return from_dict(cls, d)


class NextItemHead(nn.Module):
    """Scores the catalogue from a hidden state; full, sampled-softmax or BCE loss.

    Args:
        d_model: width ``D`` of the hidden states.
        num_items: cardinality of the item-id feature; ids are in ``[0, num_items)``.
        first_item_id: the smallest real item id; lower ids are never scored or predicted.
        config: see :class:`NextItemConfig`.
        item_embedding: the input item table ``[num_items, E]``, required with weight
            tying and used as the output matrix (shared, not copied). With ``E != D``
            the hidden state is first projected by ``Linear(D, E)``.
        item_counts: ``[num_items]`` training frequencies, required by the popularity
            sampler (unused otherwise). Items with count 0 are treated as count 1 so
            that every real item can be drawn and ``log Q`` stays finite.
    """

    def __init__(
        self,
        d_model: int,
        num_items: int,
        first_item_id: int,
        config: NextItemConfig,
        item_embedding: nn.Embedding | None = None,
        item_counts: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 0 < first_item_id < num_items:
            raise ValueError(
                f"need 0 < first_item_id < num_items, got first_item_id={first_item_id}, "
                f"num_items={num_items}: the catalogue must hold at least one real item"
            )
        if config.loss == "bce" and num_items - first_item_id < 2:
            raise ValueError("loss='bce' needs at least 2 real items (a negative != the positive)")
        self.d_model = d_model
        self.num_items = num_items
        self.first_item_id = first_item_id
        self.config = config

        if config.weight_tying:
            if item_embedding is None:
                raise ValueError(
                    "weight_tying=True needs the input item embedding: pass item_embedding="
                    "<the input block's item nn.Embedding>, or set weight_tying=False"
                )
            if item_embedding.num_embeddings != num_items:
                raise ValueError(
                    f"item_embedding has {item_embedding.num_embeddings} rows, expected "
                    f"num_items={num_items}"
                )
            self.item_embedding: nn.Embedding | None = item_embedding  # shared, not copied
            dim = item_embedding.embedding_dim
            self.proj: nn.Linear | None = nn.Linear(d_model, dim) if dim != d_model else None
            self.output_weight: nn.Parameter | None = None
        else:
            if item_embedding is not None:
                raise ValueError(
                    "item_embedding was given but weight_tying=False; pass item_embedding=None "
                    "or set weight_tying=True"
                )
            self.item_embedding = None
            self.proj = None
            self.output_weight = nn.Parameter(torch.empty(num_items, d_model))
            nn.init.normal_(self.output_weight, std=0.02)
        self.output_bias = nn.Parameter(torch.zeros(num_items)) if config.bias else None

        # Proposal of the sampled softmax over the real items; not persistent: it comes from
        # this run's counts, a loaded checkpoint must not overwrite them.
        self.sampler_probs: Tensor | None
        if config.sampler == "popularity":
            if item_counts is None:
                raise ValueError(
                    "sampler='popularity' needs item_counts=<[num_items] training frequencies>"
                )
            if item_counts.shape != (num_items,):
                raise ValueError(
                    f"item_counts has shape {tuple(item_counts.shape)}, expected ({num_items},)"
                )
            counts = item_counts[first_item_id:].double()  # [R]
            if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
                raise ValueError("item_counts must be finite and >= 0")
            probs = counts.clamp_min(1.0)
            self.register_buffer("sampler_probs", (probs / probs.sum()).float(), persistent=False)
        else:
            self.sampler_probs = None

    # -- building blocks

    @property
    def num_real_items(self) -> int:
        """``R = num_items - first_item_id``, the number of real (scorable) items."""
        return self.num_items - self.first_item_id

    def _weight(self) -> Tensor:
        """The output matrix ``[num_items, E]`` (the input table when tied)."""
        if self.item_embedding is not None:
            return self.item_embedding.weight
        assert self.output_weight is not None
        return self.output_weight

    def _query(self, hidden: Tensor) -> Tensor:
        """``[N, D] -> [N, E]``: the vector dotted with the item rows."""
        if hidden.ndim != 2 or hidden.shape[1] != self.d_model:
            raise ValueError(
                f"hidden must be [N, {self.d_model}], got {tuple(hidden.shape)}; gather the "
                "target positions and flatten them to [N, D] first"
            )
        return self.proj(hidden) if self.proj is not None else hidden

    def _check_targets(self, hidden: Tensor, targets: Tensor) -> None:
        if targets.dtype != torch.long or targets.shape != (hidden.shape[0],):
            raise ValueError(
                f"targets must be int64 [N={hidden.shape[0]}], got {targets.dtype} "
                f"{tuple(targets.shape)}"
            )
        if bool(((targets < self.first_item_id) | (targets >= self.num_items)).any()):
            raise ValueError(
                f"targets must be real item ids in [{self.first_item_id}, {self.num_items}); "
                "drop padding/missing/OOV targets (ids < first_item_id) before calling loss"
            )

    def _finish(self, dots: Tensor, ids: Tensor | slice) -> Tensor:
        """``(dots + bias[ids]) / temperature``; ``ids`` index the last dim of ``dots``."""
        bias = self.output_bias
        return (dots if bias is None else dots + bias[ids]) / self.config.temperature

    def real_item_logits(self, hidden: Tensor) -> Tensor:
        """``[N, D] -> [N, R]`` logits of the real items (column ``j`` is id ``first_item_id + j``)."""
        real = slice(self.first_item_id, None)
        return self._finish(self._query(hidden) @ self._weight()[real].T, real)  # [N, R]

    def item_scores(self, hidden: Tensor) -> Tensor:
        """``[N, D] -> [N, num_items]`` logits over the catalogue; special ids are ``-inf``."""
        real = self.real_item_logits(hidden)  # [N, R]
        special = real.new_full((real.shape[0], self.first_item_id), float("-inf"))  # [N, F]
        return torch.cat([special, real], dim=1)  # [N, num_items]

    # -- losses

    def full_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Softmax cross-entropy over the real items (label smoothing spread over them only)."""
        self._check_targets(hidden, targets)
        logits = self.real_item_logits(hidden)  # [N, R]
        return F.cross_entropy(
            logits, targets - self.first_item_id, label_smoothing=self.config.label_smoothing
        )

    def draw_shared_negatives(
        self, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``[K]`` ids from the proposal ``Q`` of the sampled softmax (with replacement)."""
        k, first, n = self.config.num_negatives, self.first_item_id, self.num_items
        return sample_proposal(k, first, n, self.sampler_probs, device, generator)

    def log_q(self, ids: Tensor) -> Tensor:
        """``log Q(id)`` of the sampled-softmax proposal, same shape as ``ids``."""
        if self.sampler_probs is None:
            return torch.full(ids.shape, -math.log(self.num_real_items), device=ids.device)
        return self.sampler_probs[ids - self.first_item_id].log()

    def sampled_logits(self, hidden: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
        """``[N, 1 + K]``: column 0 the positive, then the shared negatives ``[K]``.

        Each logit is ``(h . w + b) / temperature - log Q(item)``; a negative equal
        to the row's positive is ``-inf``.
        """
        self._check_targets(hidden, targets)
        query = self._query(hidden)  # [N, E]
        w = self._weight()
        pos = self._finish((query * w[targets]).sum(-1), targets)  # [N]
        neg = self._finish(query @ w[negatives].T, negatives)  # [N, K], negatives shared
        logits = torch.cat([(pos - self.log_q(targets))[:, None], neg - self.log_q(negatives)], 1)
        hit = negatives[None, :] == targets[:, None]  # [N, K] accidental hits
        hit = torch.cat([torch.zeros_like(hit[:, :1]), hit], dim=1)  # [N, 1+K]
        return logits.masked_fill(hit, float("-inf"))

    def sampled_softmax_loss(self, hidden: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
        """Cross-entropy of :meth:`sampled_logits` with the positive at index 0."""
        logits = self.sampled_logits(hidden, targets, negatives)  # [N, 1+K]
        zeros = torch.zeros(targets.shape[0], dtype=torch.long, device=targets.device)
        return F.cross_entropy(logits, zeros)

    def bce_loss(self, hidden: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
        """``mean_n [ -log s(pos_n) - mean_k log(1 - s(neg_nk)) ]`` for ``negatives [N, K]``."""
        self._check_targets(hidden, targets)
        query = self._query(hidden)  # [N, E]
        w = self._weight()
        pos = self._finish((query * w[targets]).sum(-1), targets)  # [N]
        neg = self._finish(torch.einsum("ne,nke->nk", query, w[negatives]), negatives)  # [N, K]
        per_row = -F.logsigmoid(pos) - F.logsigmoid(-neg).mean(dim=1)  # [N]
        return per_row.mean()

    def loss(
        self, hidden: Tensor, targets: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scalar mean loss of ``hidden [N, D]`` for real item ids ``targets [N]``.

        Negatives (``"sampled"``, ``"bce"``) are drawn on ``hidden``'s device from
        ``generator`` (same device) when given. ``N = 0`` gives a zero loss that
        still has a graph.
        """
        if targets.numel() == 0:
            self._check_targets(hidden, targets)
            return _zero_with_graph(hidden)
        if self.config.loss == "full":
            return self.full_loss(hidden, targets)
        if self.config.loss == "sampled":
            negatives = self.draw_shared_negatives(hidden.device, generator)  # [K]
            return self.sampled_softmax_loss(hidden, targets, negatives)
        negatives = uniform_negatives_excluding(
            targets, self.first_item_id, self.num_items, self.config.num_negatives, generator
        )  # [N, K]
        return self.bce_loss(hidden, targets, negatives)


# --- sequence-level tasks ------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceTaskConfig:
    """A binary-classification or regression task on the whole session.

    Attributes:
        kind: ``"binary"`` (one logit, BCE) or ``"regression"`` (one value, MSE).
        target: name of the per-session ``[B]`` target tensor the loss reads.
        weight: multi-task loss weight, ``>= 0``.
        hidden: widths of the MLP hidden layers (ReLU, dropout) before the output unit.
        dropout: dropout after each hidden layer, in ``[0, 1)``.

    >>> SequenceTaskConfig.from_dict({"kind": "binary", "target": "purchased", "hidden": [8]})
    SequenceTaskConfig(kind='binary', target='purchased', weight=1.0, hidden=(8,), dropout=0.0)
    """

    kind: str
    target: str
    weight: float = 1.0
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"kind={self.kind!r}; choose one of {', '.join(TASK_KINDS)}")
        if not isinstance(self.target, str) or not self.target:
            raise ConfigError(f"target={self.target!r} must name a per-session target tensor")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)):
            raise ConfigError(f"weight={self.weight!r} must be a finite number")
        if self.weight < 0:
            raise ConfigError(f"weight={self.weight} must be >= 0")
        widths = tuple(self.hidden)  # JSON gives a list
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(f"hidden={self.hidden!r} must be positive ints")
        object.__setattr__(self, "hidden", widths)
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SequenceTaskConfig:
        """Build from a plain dict; unknown keys and invalid values raise ``ConfigError``."""
        return from_dict(cls, d)


class SequenceTaskHead(nn.Module):
    """MLP on the pooled session representation ``[B, D]`` to one logit or value per session.

    >>> head = SequenceTaskHead(4, SequenceTaskConfig(kind="binary", target="purchased"))
    >>> p = head.predict(torch.randn(3, 4))
    >>> p.shape, bool(((p >= 0) & (p <= 1)).all())
    (torch.Size([3]), True)
    >>> head.loss(torch.randn(2, 4), torch.tensor([float("nan"), float("nan")])).item()
    0.0
    """

    def __init__(self, d_model: int, config: SequenceTaskConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = d_model
        for w in config.hidden:
            layers += [nn.Linear(width, w), nn.ReLU(), nn.Dropout(config.dropout)]
            width = w
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, pooled: Tensor) -> Tensor:
        """``[B, D] -> [B]`` logits (binary) or values (regression)."""
        if pooled.ndim != 2:
            raise ValueError(f"pooled must be [B, D], got {tuple(pooled.shape)}")
        return self.mlp(pooled).squeeze(-1)  # [B, 1] -> [B]

    def loss(self, pooled: Tensor, target: Tensor) -> Tensor:
        """Mean BCE-with-logits or MSE over the rows whose ``target [B]`` is not NaN.

        All targets NaN gives ``0`` that still has a graph (the batch contributes nothing).
        """
        out = self(pooled)  # [B]
        if target.shape != out.shape:
            raise ValueError(
                f"target {self.config.target!r} must be [B={out.shape[0]}], "
                f"got {tuple(target.shape)}"
            )
        target = target.to(out.dtype)
        valid = ~torch.isnan(target)  # [B]
        if not bool(valid.any()):
            return _zero_with_graph(out)
        out, target = out[valid], target[valid]
        if self.config.kind == "binary":
            if bool(((target < 0) | (target > 1)).any()):
                raise ValueError(
                    f"binary target {self.config.target!r} must be in [0, 1] (or NaN for missing)"
                )
            return F.binary_cross_entropy_with_logits(out, target)
        return F.mse_loss(out, target)

    def predict(self, pooled: Tensor) -> Tensor:
        """``[B]`` probabilities (binary, sigmoid of the logit) or values (regression)."""
        out = self(pooled)  # [B]
        return torch.sigmoid(out) if self.config.kind == "binary" else out


def combine_losses(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Weighted sum of the task losses; every loss needs a weight and every weight a loss.

    >>> combine_losses({"next": torch.tensor(2.0), "buy": torch.tensor(1.0)},
    ...                {"next": 1.0, "buy": 0.5})
    tensor(2.5000)
    >>> combine_losses({"next": torch.tensor(2.0)}, {"next": 1.0, "buy": 0.5})
    Traceback (most recent call last):
    ...
    ValueError: weight without a loss: 'buy'; compute that task's loss or drop its weight
    """
    if not losses:
        raise ValueError("no losses to combine")
    missing = [k for k in losses if k not in weights]
    if missing:
        raise ValueError(f"loss without a weight: {missing[0]!r}; give it a weight (0 to disable)")
    extra = [k for k in weights if k not in losses]
    if extra:
        raise ValueError(
            f"weight without a loss: {extra[0]!r}; compute that task's loss or drop its weight"
        )
    total: Tensor | None = None
    for name, value in losses.items():
        term = value * weights[name]
        total = term if total is None else total + term
    assert total is not None
    return total
