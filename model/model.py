"""The session model: input block -> masking -> sequence block -> heads.

The Transformers4Rec meta-architecture in one readable module. The model sees
only tensors: ``features`` (``{name: [B, L]}``, right-padded) and ``mask``
(``[B, L]`` bool, True at real events) as :class:`~features.batch.FeatureBatch`
carries them. Two entry points, as in SASRec.pytorch:

- :meth:`SessionModel.forward` (training): builds targets with the masking
  scheme (a pure function of :mod:`model.masking`), runs the block and returns
  one :class:`TrainOutput` with the weighted loss and each head's loss;
- :meth:`SessionModel.score` / :meth:`SessionModel.predict` (inference): the
  next-item scores over the whole catalogue for each session, from the
  representation of "the position after the last event": the last real
  position under CLM; an appended ``[MASK]`` slot that sees only the past
  under MLM / PLM / RTD.

Nothing is stored on the module between calls, so one model serves concurrent
requests.

>>> from features.schema import Feature, Kind, Schema, Tag
>>> schema = Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
...                          transform={"op": "categorify"}, cardinality=12)])
>>> cfg = ModelConfig.from_dict({"block": {"name": "sasrec", "d_model": 16, "n_heads": 2,
...                                        "max_len": 8}, "masking": "clm"})
>>> model = SessionModel(schema, cfg)
>>> ids, mask = torch.tensor([[3, 4, 5, 0]]), torch.tensor([[True, True, True, False]])
>>> out = model({"item_id": ids}, mask)
>>> out.loss.shape, sorted(out.losses), out.num_targets
(torch.Size([]), ['next_item'], 2)
>>> model.predict({"item_id": ids}, mask, k=3).ids.shape
torch.Size([1, 3])
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from features.schema import Schema
from model import masking as masks
from model.blocks import BlockConfig, build_block
from model.config_base import ConfigError, from_dict, to_dict
from model.heads import (
    NextItemConfig,
    NextItemHead,
    SequenceTaskConfig,
    SequenceTaskHead,
    combine_losses,
)
from model.inputs import InputBlock, InputConfig

__all__ = ["ModelConfig", "SessionModel", "TopK", "TrainOutput", "exclude_items"]

NEXT_ITEM = "next_item"
RTD = "rtd"


@dataclasses.dataclass(frozen=True)
class TrainOutput:
    """What :meth:`SessionModel.forward` returns, in every configuration.

    Fields:
        loss: scalar, the weighted sum of ``losses`` (what the trainer minimises).
        losses: unweighted loss of each head: ``"next_item"``, ``"rtd"`` (the
            ELECTRA discriminator, RTD only) and one per sequence task.
        num_targets: next-item predictions the loss averaged over.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    num_targets: int


@dataclasses.dataclass(frozen=True)
class TopK:
    """Top-k next items per session: ``ids`` ``[B, k]`` (encoded item ids) and their ``scores``.

    Where exclusions leave a row fewer than ``k`` items, its remaining slots hold
    id ``0`` (padding: "no item") with score ``-inf``; every other id is a real item.
    """

    ids: torch.Tensor
    scores: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a session model's architecture and training objective.

    Fields:
        block: the sequence block (:class:`~model.blocks.BlockConfig`); its
            ``d_model`` is the model width and its ``max_len`` the longest input.
        inputs: the input block (:class:`~model.inputs.InputConfig`).
        masking: ``clm``, ``mlm``, ``plm`` or ``rtd`` (:data:`model.masking.VALID_BLOCKS`
            says which blocks each works with).
        mlm_probability: share of positions hidden by MLM / PLM / RTD.
        plm_max_span: longest span of consecutive targets under PLM.
        rtd_weight: weight of the discriminator loss under RTD (ELECTRA uses 50).
        next_item: the next-item head (:class:`~model.heads.NextItemConfig`).
        next_item_weight: weight of the next-item loss in the multi-task sum.
        tasks: sequence-level heads (binary / regression) by name.
        sse_probability: stochastic shared embeddings: while training, each
            input item id is replaced by a random item with this probability.
    """

    block: BlockConfig
    inputs: InputConfig = dataclasses.field(default_factory=InputConfig)
    masking: str = "clm"
    mlm_probability: float = 0.2
    plm_max_span: int = 3
    rtd_weight: float = 50.0
    next_item: NextItemConfig = dataclasses.field(default_factory=NextItemConfig)
    next_item_weight: float = 1.0
    tasks: Mapping[str, SequenceTaskConfig] = dataclasses.field(default_factory=dict)
    sse_probability: float = 0.0

    def __post_init__(self) -> None:
        masks.check_combination(self.masking, self.block.name)
        object.__setattr__(self, "tasks", dict(self.tasks))
        for name in (NEXT_ITEM, RTD):
            if name in self.tasks:
                raise ConfigError(f"task name {name!r} is reserved; choose another")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not 0.0 <= self.sse_probability < 1.0:
            raise ConfigError(f"sse_probability must be in [0, 1), got {self.sse_probability}")
        if self.rtd_weight < 0 or self.next_item_weight < 0:
            raise ConfigError("loss weights must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """From a JSON-able dict (``config.json``); nested configs are dicts too."""
        data = dict(data)
        if "block" not in data:
            raise ConfigError("ModelConfig: 'block' is required, e.g. {'name': 'sasrec'}")
        data["block"] = BlockConfig.from_dict(data["block"])
        data["inputs"] = InputConfig.from_dict(data.get("inputs"))
        data["next_item"] = NextItemConfig.from_dict(data.get("next_item"))
        data["tasks"] = {k: SequenceTaskConfig.from_dict(v)
                         for k, v in (data.get("tasks") or {}).items()}
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @property
    def d_model(self) -> int:
        return self.block.d_model

    @property
    def max_len(self) -> int:
        return self.block.max_len


def exclude_items(scores: torch.Tensor, rows_items: torch.Tensor) -> torch.Tensor:
    """``scores`` ``[B, V]`` with ``-inf`` at each ``(row, item)`` pair of ``rows_items`` ``[2, n]``.

    >>> exclude_items(torch.zeros(2, 3), torch.tensor([[0, 1], [2, 0]]))
    tensor([[0., 0., -inf],
            [-inf, 0., 0.]])
    """
    out = scores.clone()
    out[rows_items[0], rows_items[1]] = float("-inf")
    return out


def _last_real(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``h`` ``[B, L, D]`` at each row's last real position -> ``[B, D]`` (position 0 for empty rows)."""
    last = (mask.sum(1) - 1).clamp_min(0)  # [B]
    return h[torch.arange(h.shape[0], device=h.device), last]  # [B, D]


class SessionModel(nn.Module):
    """Input block, masking, sequence block and heads; see the module docstring.

    Args:
        schema: the fitted schema (``Workflow.schema``): cardinalities set.
        config: the architecture and objective.
        item_counts: ``[num_items]`` training frequency of each item id, for the
            popularity sampler of the sampled softmax (kept as a buffer).
    """

    def __init__(self, schema: Schema, config: ModelConfig,
                 item_counts: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.schema = schema
        d = config.d_model
        self.inputs = InputBlock(schema, config.inputs, d_model=d)
        self.item_feature = self.inputs.item_feature
        self.num_items = self.inputs.num_items
        self.first_item_id = self.inputs.first_item_id
        self.block = build_block(config.block)
        self.next_item = NextItemHead(
            d, self.num_items, self.first_item_id, config.next_item,
            item_embedding=self.inputs.item_embedding if config.next_item.weight_tying else None,
            item_counts=item_counts,
        )
        self.tasks = nn.ModuleDict({n: SequenceTaskHead(d, c) for n, c in config.tasks.items()})
        masked_scheme = config.masking != "clm"
        self.mask_embedding = nn.Parameter(torch.randn(d) * 0.02) if masked_scheme else None
        self.discriminator = nn.Linear(d, 1) if config.masking == RTD else None
        self._xlnet = config.block.name == "xlnet"
        self._weights = {NEXT_ITEM: config.next_item_weight,
                         **({RTD: config.rtd_weight} if config.masking == RTD else {}),
                         **{n: c.weight for n, c in config.tasks.items()}}

    # -- shared steps --------------------------------------------------------------

    def _check(self, features: Mapping[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        ids = features.get(self.item_feature)
        if ids is None:
            raise KeyError(f"batch lacks the item-id feature {self.item_feature!r}")
        if ids.shape != mask.shape or mask.dtype != torch.bool:
            raise ValueError(f"item ids {tuple(ids.shape)} and a bool mask of the same shape "
                             f"expected, got mask {tuple(mask.shape)} {mask.dtype}")
        if mask.shape[1] > self.config.max_len:
            raise ValueError(f"sequence length {mask.shape[1]} exceeds max_len "
                             f"{self.config.max_len}: truncate to the last max_len events")
        return ids

    def _encode(self, features: Mapping[str, torch.Tensor], mask: torch.Tensor,
                hidden: torch.Tensor | None, causal: bool,
                perm_mask: torch.Tensor | None) -> torch.Tensor:
        """Embed, put the [MASK] vector at ``hidden`` positions, run the block -> ``[B, L, D]``."""
        x = self.inputs(features)  # [B, L, D]
        if hidden is not None and self.mask_embedding is not None:
            x = torch.where(hidden[..., None], self.mask_embedding.to(x.dtype), x)
        if self._xlnet and causal:
            perm_mask, causal = masks.causal_perm_mask(mask), True
        return self.block(x, mask, causal=causal, perm_mask=perm_mask)

    def _next_item_loss(self, h: torch.Tensor, targets: torch.Tensor,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
        keep = targets >= self.first_item_id  # padding, missing and OOV ids are not learnable
        n = int(keep.sum())
        if n == 0:
            return h.sum() * 0.0, 0
        return self.next_item.loss(h[keep], targets[keep], generator=generator), n

    # -- training ------------------------------------------------------------------

    def forward(self, features: Mapping[str, torch.Tensor], mask: torch.Tensor,
                targets: Mapping[str, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> TrainOutput:
        """Training step: the losses of every head on one batch.

        Args:
            features: ``{name: [B, L]}``, right-padded.
            mask: ``[B, L]`` bool.
            targets: per-session targets ``{task target name: [B]}`` of the
                sequence tasks (the next-item targets come from the sequence).
            generator: randomness of the masking and samplers (reproducible runs).
        """
        ids = self._check(features, mask)
        cfg = self.config
        if self.training and cfg.sse_probability > 0:
            noisy = masks.stochastic_shared_embeddings(
                ids, mask, cfg.sse_probability, self.first_item_id, self.num_items, generator)
            features = {**features, self.item_feature: noisy}
        if cfg.masking == "clm":
            m = masks.clm(ids, mask)
        elif cfg.masking == "plm":
            m = masks.plm(ids, mask, cfg.mlm_probability, cfg.plm_max_span, generator=generator)
        else:  # mlm, rtd
            m = masks.mlm(ids, mask, cfg.mlm_probability, generator=generator)
        h = self._encode(features, mask, m.hidden, m.causal, m.perm_mask)  # [B, L, D]
        loss, n = self._next_item_loss(h, m.targets, generator)
        losses = {NEXT_ITEM: loss}
        if cfg.masking == RTD:
            losses[RTD] = self._rtd_loss(features, mask, ids, h, m.hidden, generator)
        if self.tasks:
            pooled = (_last_real(h, mask) if cfg.masking == "clm"
                      else self.session_representation(features, mask))
            tgt = targets or {}
            for name, head in self.tasks.items():
                key = cfg.tasks[name].target
                if key not in tgt:
                    raise KeyError(f"task {name!r} needs targets[{key!r}] ([B] per session)")
                losses[name] = head.loss(pooled, tgt[key])
        return TrainOutput(combine_losses(losses, self._weights), losses, n)

    def _rtd_loss(self, features: Mapping[str, torch.Tensor], mask: torch.Tensor,
                  ids: torch.Tensor, h: torch.Tensor, hidden: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
        """ELECTRA: replace hidden items by generator samples; a discriminator spots them."""
        with torch.no_grad():
            sampled = masks.sample_replacements(self.next_item.item_scores(h[hidden]), generator)
        corrupted, replaced = masks.rtd_corrupt(ids, hidden, sampled)
        h2 = self._encode({**features, self.item_feature: corrupted}, mask, None, False, None)
        logits = self.discriminator(h2).squeeze(-1)  # [B, L]
        return F.binary_cross_entropy_with_logits(logits[mask], replaced[mask].float())

    # -- inference -----------------------------------------------------------------

    def hidden_states(self, features: Mapping[str, torch.Tensor],
                      mask: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` inference encoding of the real events (causal under CLM)."""
        self._check(features, mask)
        return self._encode(features, mask, None, self.config.masking == "clm", None)

    def session_representation(self, features: Mapping[str, torch.Tensor],
                               mask: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: what the next-item head scores for each session.

        CLM: the last real position. Masked schemes: a ``[MASK]`` slot appended
        after the last event (the oldest event dropped from a full row), encoded
        with the past visible only, as the model was trained to fill it.
        """
        self._check(features, mask)
        if self.config.masking == "clm":
            return _last_real(self._encode(features, mask, None, True, None), mask)
        feats, mask2, hidden, pos = masks.append_mask_slot(dict(features), mask)
        h = self._encode(feats, mask2, hidden, self._xlnet, None)  # [B, L, D]
        return h[torch.arange(h.shape[0], device=h.device), pos]  # [B, D]

    def score(self, features: Mapping[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``[B, num_items]`` next-item scores; ``-inf`` at padding / missing / OOV ids."""
        return self.next_item.item_scores(self.session_representation(features, mask))

    def predict(self, features: Mapping[str, torch.Tensor], mask: torch.Tensor, k: int = 10,
                exclude_seen: bool = False,
                exclude: torch.Tensor | None = None) -> TopK:
        """Top-``k`` next items per session.

        Args:
            k: items per row, at most the number of real items (larger ``k`` is cut to it).
            exclude_seen: never recommend an item already in the session window.
            exclude: extra ``(row, item id)`` pairs ``[2, n]`` never to recommend.

        Rows left with fewer than ``k`` items by the exclusions are filled with
        id 0 at score ``-inf`` (see :class:`TopK`), never with an excluded or a
        padding / missing / OOV id.
        """
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a positive int (items per session), got {k!r}")
        scores = self.score(features, mask)  # [B, V]
        if exclude_seen:
            ids = features[self.item_feature]
            rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
            scores = exclude_items(scores, torch.stack([rows[mask], ids[mask]]))
        if exclude is not None:
            scores = exclude_items(scores, exclude)
        k = min(int(k), self.num_items - self.first_item_id)
        top = torch.topk(scores, k, dim=1)
        # -inf entries are excluded or special ids that topk had to take to fill k slots
        ids = torch.where(torch.isneginf(top.values), 0, top.indices)  # [B, k]
        return TopK(ids, top.values)

    def task_predictions(self, features: Mapping[str, torch.Tensor],
                         mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{task: [B]}`` probabilities (binary) or values (regression) per session."""
        pooled = self.session_representation(features, mask)
        return {name: head.predict(pooled) for name, head in self.tasks.items()}
