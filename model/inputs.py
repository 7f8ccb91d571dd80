"""The input block: per-event features -> one ``[B, L, d_model]`` sequence of embeddings.

Built from a fitted :class:`~features.schema.Schema` (cardinalities known):

- every categorical feature gets an ``nn.Embedding`` (row 0 = padding, kept
  at zero), of a fixed width or of width ``ceil(multiplier * cardinality **
  0.25)`` (the rule Transformers4Rec uses), optionally layer-normalised;
- every continuous feature is either a projected scalar or a **soft one-hot
  encoding** (a scalar -> softmax over ``bins`` learned logits -> a weighted
  sum of ``bins`` learned vectors; it lets the model learn a non-linear,
  bucket-like response without fixed bucket edges);
- the per-feature vectors are aggregated: ``concat`` (then one linear
  projection to ``d_model``), ``elementwise-sum`` (every feature is embedded
  at ``d_model`` and summed) or ``elementwise-sum-item-multi`` (the item
  embedding multiplied element-wise by the sum of all other features).

The item-id table is exposed as :attr:`InputBlock.item_embedding` so the
next-item head can tie its output weights to it.

>>> from features.schema import Feature, Kind, Schema, Tag
>>> schema = Schema([
...     Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
...             transform={"op": "categorify"}, cardinality=10),
...     Feature("price", Kind.CONTINUOUS, transform={"op": "normalize"}),
... ])
>>> block = InputBlock(schema, InputConfig(aggregation="concat"), d_model=16)
>>> block({"item_id": torch.tensor([[3, 4, 0]]), "price": torch.tensor([[0.5, -1.0, 0.0]])}).shape
torch.Size([1, 3, 16])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from features.ops import op_from_spec
from features.ops.base import NULL_ID
from features.schema import Feature, Kind, Schema, Tag
from model.config_base import ConfigError, from_dict

__all__ = ["AGGREGATIONS", "InputBlock", "InputConfig", "SoftOneHot", "first_item_id"]

AGGREGATIONS = ("concat", "elementwise-sum", "elementwise-sum-item-multi")
CONTINUOUS_ENCODINGS = ("projection", "soft-one-hot")
# Ids of a row (session, user) and labels (target) are never model inputs.
_NOT_INPUTS = frozenset({Tag.SESSION_ID, Tag.USER_ID, Tag.TARGET})


def first_item_id(feature: Feature) -> int:
    """The smallest id of a real item: ids below it are padding, missing or out of vocabulary.

    >>> from features.schema import Feature, Kind
    >>> first_item_id(Feature("item_id", Kind.CATEGORICAL, transform={"op": "categorify",
    ...                                                               "oov_buckets": 3}))
    5
    """
    op = op_from_spec(feature.transform)
    return int(getattr(op, "first_vocab_id", NULL_ID + 1))


def inferred_dim(cardinality: int, multiplier: float) -> int:
    """Embedding width from the cardinality: ``ceil(multiplier * cardinality ** 0.25)``.

    >>> inferred_dim(10_000, 2.0)
    20
    """
    return max(1, math.ceil(multiplier * cardinality**0.25))


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """How event features become the ``[B, L, d_model]`` input of the sequence block.

    Fields:
        aggregation: one of :data:`AGGREGATIONS`.
        features: schema features to use; ``None`` = every categorical and
            continuous feature except session / user ids.
        embedding_dim: width of every categorical embedding; ``None`` = the
            cardinality rule (``concat`` only; the item id then gets ``d_model``
            so the next-item head can tie weights without a projection). The
            element-wise aggregations need every width equal to ``d_model``.
        embedding_dims: per-feature widths overriding the above.
        dim_multiplier: the ``multiplier`` of the cardinality rule.
        layer_norm: layer-normalise every categorical embedding.
        continuous: ``"projection"`` (a linear map of the scalar) or
            ``"soft-one-hot"``.
        soft_one_hot_bins: number of learned vectors of the soft one-hot encoding.
        continuous_dim: width of a continuous feature's vector under ``concat``
            (``d_model`` under the element-wise aggregations).
        dropout: dropout on the aggregated embeddings.
    """

    aggregation: str = "concat"
    features: tuple[str, ...] | None = None
    embedding_dim: int | None = None
    embedding_dims: Mapping[str, int] = dataclasses.field(default_factory=dict)
    dim_multiplier: float = 2.0
    layer_norm: bool = False
    continuous: str = "projection"
    soft_one_hot_bins: int = 16
    continuous_dim: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"aggregation {self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}"
            )
        if self.continuous not in CONTINUOUS_ENCODINGS:
            raise ConfigError(
                f"continuous {self.continuous!r} is not one of {', '.join(CONTINUOUS_ENCODINGS)}"
            )
        if self.features is not None:
            object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "embedding_dims", dict(self.embedding_dims))
        for name, value in (("soft_one_hot_bins", self.soft_one_hot_bins),
                            ("continuous_dim", self.continuous_dim),
                            *(("embedding_dims." + k, v) for k, v in self.embedding_dims.items())):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ConfigError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> InputConfig:
        return from_dict(cls, data)


class SoftOneHot(nn.Module):
    """Soft one-hot encoding of a scalar: ``softmax(x * w + b) @ table``.

    ``[...]`` float -> ``[..., dim]``. Padding (``x = 0`` at padded positions)
    is handled by the caller, which zeroes padded positions.
    """

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.logit_weight = nn.Parameter(torch.randn(bins) * 0.1)
        self.logit_bias = nn.Parameter(torch.zeros(bins))
        self.table = nn.Parameter(torch.randn(bins, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(x[..., None] * self.logit_weight + self.logit_bias, dim=-1)  # [..., K]
        return weights @ self.table  # [..., dim]


class InputBlock(nn.Module):
    """Event features ``{name: [B, L]}`` -> ``[B, L, d_model]``; see the module docstring."""

    def __init__(self, schema: Schema, config: InputConfig, d_model: int):
        super().__init__()
        self.config = config
        self.d_model = d_model
        item = schema.item_id_feature
        if item.cardinality is None:
            raise ConfigError(
                f"feature {item.name!r} has no cardinality: build the model from a fitted "
                "workflow's schema (Workflow.schema)"
            )
        self.item_feature = item.name
        self.num_items = int(item.cardinality)
        self.first_item_id = first_item_id(item)
        selected = self._select(schema, config)
        summing = config.aggregation != "concat"

        self.embeddings = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        self.continuous = nn.ModuleDict()
        width = 0
        for f in selected:
            if f.kind == Kind.CATEGORICAL:
                dim = self._categorical_dim(f, config, d_model, summing)
                self.embeddings[f.name] = nn.Embedding(int(f.cardinality), dim, padding_idx=0)
                nn.init.normal_(self.embeddings[f.name].weight, std=0.02)
                with torch.no_grad():
                    self.embeddings[f.name].weight[0].zero_()
                if config.layer_norm:
                    self.norms[f.name] = nn.LayerNorm(dim)
            else:
                dim = d_model if summing else config.continuous_dim
                self.continuous[f.name] = (
                    SoftOneHot(config.soft_one_hot_bins, dim)
                    if config.continuous == "soft-one-hot"
                    else nn.Linear(1, dim)
                )
            width += dim
        self.feature_names = tuple(f.name for f in selected)
        if config.aggregation == "elementwise-sum-item-multi" and len(selected) < 2:
            raise ConfigError(
                "elementwise-sum-item-multi multiplies the item embedding by the sum of the other "
                "features: select at least one feature besides the item id"
            )
        self.projection = nn.Linear(width, d_model) if not summing else None
        self.dropout = nn.Dropout(config.dropout)

    @staticmethod
    def _select(schema: Schema, config: InputConfig) -> list[Feature]:
        usable = [f for f in schema
                  if f.kind in (Kind.CATEGORICAL, Kind.CONTINUOUS) and not (f.tags & _NOT_INPUTS)]
        if config.features is None:
            return usable
        by_name = {f.name: f for f in usable}
        missing = [n for n in config.features if n not in by_name]
        if missing:
            raise ConfigError(
                f"input features {missing} are not usable inputs of the schema; "
                f"usable: {sorted(by_name)} (list and id features are not inputs)"
            )
        item = schema.item_id_feature.name
        if item not in config.features:
            raise ConfigError(f"the item-id feature {item!r} must be among the input features")
        return [by_name[n] for n in config.features]

    @staticmethod
    def _categorical_dim(f: Feature, config: InputConfig, d_model: int, summing: bool) -> int:
        if f.cardinality is None:
            raise ConfigError(f"feature {f.name!r} has no cardinality: fit the workflow first")
        if f.name in config.embedding_dims:
            dim = config.embedding_dims[f.name]
        elif config.embedding_dim is not None:
            dim = config.embedding_dim
        elif summing or Tag.ITEM_ID in f.tags:
            dim = d_model
        else:
            dim = inferred_dim(int(f.cardinality), config.dim_multiplier)
        if summing and dim != d_model:
            raise ConfigError(
                f"{config.aggregation} needs every embedding {d_model} wide (d_model); "
                f"{f.name!r} is {dim}"
            )
        return dim

    @property
    def item_embedding(self) -> nn.Embedding:
        """The item-id table ``[num_items, E]`` (for weight tying)."""
        return self.embeddings[self.item_feature]  # type: ignore[return-value]

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: [B, L]}`` -> ``[B, L, d_model]``; features not selected are ignored."""
        missing = [n for n in self.feature_names if n not in features]
        if missing:
            raise KeyError(f"input block: batch lacks features {missing}")
        parts: dict[str, torch.Tensor] = {}
        for name, table in self.embeddings.items():
            emb = table(features[name])  # [B, L, E]
            parts[name] = self.norms[name](emb) if name in self.norms else emb
        for name, encode in self.continuous.items():
            x = features[name].float()  # [B, L]
            vec = encode(x) if isinstance(encode, SoftOneHot) else encode(x[..., None])  # [B, L, E]
            parts[name] = vec * (features[self.item_feature] != 0)[..., None]  # zero at padding
        ordered = [parts[n] for n in self.feature_names]
        if self.config.aggregation == "concat":
            out = self.projection(torch.cat(ordered, dim=-1))  # [B, L, d_model]
        elif self.config.aggregation == "elementwise-sum":
            out = torch.stack(ordered).sum(0)  # [B, L, d_model]
        else:
            others = [p for n, p in zip(self.feature_names, ordered, strict=True)
                      if n != self.item_feature]
            out = parts[self.item_feature] * torch.stack(others).sum(0)  # [B, L, d_model]
        return self.dropout(out)
