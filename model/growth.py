"""Vocabulary growth: a trained :class:`~model.model.SessionModel` resized to a larger catalogue.

The retrainer extends the champion's feature workflow on new events
(``Workflow.partial_fit``): vocabularies only grow and an id, once given,
never changes, so every categorical table of the model needs new rows at the
end and nothing else. :func:`grow_model` builds a model for the extended
(fitted) schema and copies every weight of the old one into it:

- every old row of every embedding table is copied unchanged (row 0, padding,
  stays zero), so an old id means what it meant;
- each new row is the **mean of the table's real rows** (ids ``>=`` the
  feature's first vocabulary id; padding, missing and OOV rows are left out)
  plus Gaussian noise with, per dimension, ``noise`` times the standard
  deviation of those rows. The mean makes a new item score like an average
  item (neither pushed to the top nor buried) until fine-tuning places it; the
  noise keeps new items apart (equal rows would tie in every ranking);
- the tied output head follows the input table (it *is* that table); an
  untied output matrix grows by the same rule, and a per-item output bias gets
  the mean bias of the real items for new ids (no noise);
- every other weight is copied as is. A categorical input whose embedding
  width is derived from its cardinality (``InputConfig.embedding_dim=None``
  under ``concat``) keeps its old width: it is pinned in
  ``InputConfig.embedding_dims`` of the returned model's config.

So with the same input ids the grown model computes exactly the old session
representation (bit for bit), and scores every old item as before, up to the
float rounding of the final ``[B, D] x [D, V]`` product (BLAS picks its
reduction order by ``V``: about 1e-7 apart on CPU); new items get finite scores.

>>> from features.schema import Feature, Kind, Schema, Tag
>>> def schema(n):
...     return Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
...                            transform={"op": "categorify"}, cardinality=n)])
>>> cfg = ModelConfig.from_dict({"block": {"name": "gru", "d_model": 8, "n_layers": 1,
...                                        "max_len": 4}})
>>> old = SessionModel(schema(6), cfg).eval()
>>> vocabulary_growth(old.schema, schema(9))
{'item_id': (6, 9)}
>>> new = grow_model(old, schema(9), generator=torch.Generator().manual_seed(0))
>>> ids, mask = torch.tensor([[3, 4, 0, 0]]), torch.tensor([[True, True, False, False]])
>>> torch.equal(old.session_representation({"item_id": ids}, mask),
...             new.session_representation({"item_id": ids}, mask))
True
>>> torch.allclose(old.score({"item_id": ids}, mask), new.score({"item_id": ids}, mask)[:, :6],
...                rtol=1e-6, atol=1e-6)
True
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from features.schema import Kind, Schema
from model.config_base import ConfigError, from_dict
from model.inputs import first_item_id
from model.model import ModelConfig, SessionModel

__all__ = ["GrowthConfig", "grow_bias", "grow_model", "grow_rows", "vocabulary_growth"]

logger = logging.getLogger(__name__)


# -- pure leaf functions ------------------------------------------------------------------


def grow_rows(table: torch.Tensor, num_rows: int, first_id: int, noise: float = 0.1,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """``table`` ``[V, E]`` -> ``[num_rows, E]``: old rows kept, new rows = mean of real rows + noise.

    Real rows are ids ``>= first_id``; without any, the non-padding rows; without
    those, zeros. The noise is ``N(0, (noise * std_e)^2)`` per dimension ``e``.

    >>> t = torch.tensor([[0.0, 0.0], [9.0, 9.0], [1.0, 2.0], [3.0, 4.0]])
    >>> grow_rows(t, 6, first_id=2, noise=0.0)
    tensor([[0., 0.],
            [9., 9.],
            [1., 2.],
            [3., 4.],
            [2., 3.],
            [2., 3.]])
    """
    old, dim = table.shape
    if num_rows < old:
        raise ValueError(f"cannot shrink a table from {old} to {num_rows} rows")
    if num_rows == old:
        return table.detach().clone()
    real = table[first_id:] if old > first_id else table[1:]  # [R, E]
    if real.shape[0] == 0:
        mean = table.new_zeros(dim)  # [E]
        std = table.new_zeros(dim)  # [E]
    else:
        mean = real.mean(0)  # [E]
        std = real.std(0, correction=0)  # [E]
    draws = torch.randn(num_rows - old, dim, generator=generator, device=table.device,
                        dtype=table.dtype)  # [N, E]
    new = mean + noise * std * draws  # [N, E]
    return torch.cat([table.detach(), new]).clone()  # [num_rows, E]


def grow_bias(bias: torch.Tensor, num_rows: int, first_id: int) -> torch.Tensor:
    """Per-item bias ``[V]`` -> ``[num_rows]``: new ids get the mean bias of the real items.

    >>> grow_bias(torch.tensor([0.0, 0.0, 1.0, 3.0]), 5, first_id=2)
    tensor([0., 0., 1., 3., 2.])
    """
    old = bias.shape[0]
    if num_rows < old:
        raise ValueError(f"cannot shrink a bias from {old} to {num_rows} entries")
    real = bias[first_id:]  # [R]
    fill = real.mean() if real.numel() else bias.new_zeros(())
    return torch.cat([bias.detach(), fill.expand(num_rows - old)]).clone()  # [num_rows]


def vocabulary_growth(old: Schema, new: Schema) -> dict[str, tuple[int, int]]:
    """``{categorical feature: (old cardinality, new cardinality)}``, checking the schemas
    differ in nothing but larger (or equal) cardinalities.

    >>> from features.schema import Feature, Kind, Schema, Tag
    >>> f = Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
    ...             transform={"op": "categorify"}, cardinality=5)
    >>> vocabulary_growth(Schema([f]), Schema([dataclasses.replace(f, cardinality=4)]))
    Traceback (most recent call last):
    ...
    ValueError: feature 'item_id' shrinks from 5 to 4 ids: vocabularies only grow; extend the champion's workflow (Workflow.partial_fit) instead of fitting a new one
    """
    if old.names != new.names:
        raise ValueError(
            f"the schemas have different features ({list(old.names)} vs {list(new.names)}); "
            "growth only adds ids: retrain from scratch to change the features"
        )
    out = {}
    for f_old in old:
        f_new = new[f_old.name]
        if dataclasses.replace(f_old, cardinality=None) != dataclasses.replace(
                f_new, cardinality=None):
            raise ValueError(
                f"feature {f_old.name!r} changed beyond its cardinality ({f_old} vs {f_new}); "
                "growth only adds ids: retrain from scratch to change a transform"
            )
        if f_old.kind != Kind.CATEGORICAL:
            continue
        if f_old.cardinality is None or f_new.cardinality is None:
            raise ValueError(f"feature {f_old.name!r} has no cardinality: use fitted schemas "
                             "(Workflow.schema)")
        if f_new.cardinality < f_old.cardinality:
            raise ValueError(
                f"feature {f_old.name!r} shrinks from {f_old.cardinality} to {f_new.cardinality} "
                "ids: vocabularies only grow; extend the champion's workflow "
                "(Workflow.partial_fit) instead of fitting a new one"
            )
        out[f_old.name] = (int(f_old.cardinality), int(f_new.cardinality))
    return out


# -- config -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GrowthConfig:
    """How new rows are initialised.

    Fields:
        noise: standard deviation of the noise added to the mean row, as a share
            of the existing real rows' standard deviation (per dimension);
            ``0`` makes every new row the mean row.

    >>> GrowthConfig.from_dict({"noise": -1})
    Traceback (most recent call last):
    ...
    model.config_base.ConfigError: GrowthConfig: noise must be a finite number >= 0, got -1
    """

    noise: float = 0.1

    def __post_init__(self) -> None:
        ok = isinstance(self.noise, int | float) and not isinstance(self.noise, bool)
        if not (ok and math.isfinite(self.noise) and self.noise >= 0):
            raise ConfigError(f"noise must be a finite number >= 0, got {self.noise!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GrowthConfig:
        return from_dict(cls, data)


# -- the model ----------------------------------------------------------------------------


def _pinned_config(old: SessionModel, new: SessionModel, config: ModelConfig) -> ModelConfig:
    """``config`` with the old embedding width pinned where the new schema would change it."""
    pins = {name: table.embedding_dim for name, table in old.inputs.embeddings.items()
            if new.inputs.embeddings[name].embedding_dim != table.embedding_dim}
    if not pins:
        return config
    logger.info("growth: embedding widths %s kept (pinned in inputs.embedding_dims)", pins)
    inputs = dataclasses.replace(config.inputs,
                                 embedding_dims={**config.inputs.embedding_dims, **pins})
    return dataclasses.replace(config, inputs=inputs)


def _row_rules(model: SessionModel) -> dict[str, tuple[str, int]]:
    """State-dict key -> (``"rows"`` | ``"bias"``, first real id) of every table that grows."""
    first = {f.name: first_item_id(f) for f in model.schema if f.kind == Kind.CATEGORICAL}
    rules = {f"inputs.embeddings.{name}.weight": ("rows", first[name])
             for name in model.inputs.embeddings}
    item_first = first[model.item_feature]
    rules["next_item.item_embedding.weight"] = ("rows", item_first)  # the tied alias
    rules["next_item.output_weight"] = ("rows", item_first)
    rules["next_item.output_bias"] = ("bias", item_first)
    return rules


def grow_model(model: SessionModel, schema: Schema, config: GrowthConfig | None = None, *,
               item_counts: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> SessionModel:
    """A new model for the grown ``schema`` holding every weight of ``model``; see the module doc.

    Args:
        model: the trained model (left unchanged).
        schema: the extended, fitted schema (``Workflow.schema`` after ``partial_fit``).
        config: how new rows are initialised.
        item_counts: ``[new item cardinality]`` training frequencies, needed when
            the model's sampled softmax uses the popularity sampler.
        generator: draws the noise of new rows; on the model's device.

    The result is on the model's device, in its train / eval mode. Building it
    does not consume the caller's global CPU random stream.
    """
    config = config or GrowthConfig()
    growth = vocabulary_growth(model.schema, schema)
    device = next(model.parameters()).device
    counts = None if item_counts is None else item_counts.detach().cpu()
    with torch.random.fork_rng(devices=[]):  # construction draws initial weights we overwrite
        new = SessionModel(schema, model.config, item_counts=counts)
        model_config = _pinned_config(model, new, model.config)
        if model_config is not model.config:
            new = SessionModel(schema, model_config, item_counts=counts)
    new.to(device)
    rules = _row_rules(model)
    old_state = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    done: dict[tuple[int, str], torch.Tensor] = {}  # tied tensors are grown once
    for key, target in new.state_dict().items():
        src = old_state[key]
        if src.shape == target.shape:
            state[key] = src
            continue
        if key not in rules:
            raise RuntimeError(f"growth: {key} changed shape {tuple(src.shape)} -> "
                               f"{tuple(target.shape)} and has no growth rule")
        kind, first = rules[key]
        memo = (src.data_ptr(), kind)
        if memo not in done:
            done[memo] = (grow_rows(src, target.shape[0], first, config.noise, generator)
                          if kind == "rows" else grow_bias(src, target.shape[0], first))
        state[key] = done[memo]
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    grown = {k: v for k, v in growth.items() if v[0] != v[1]}
    logger.info("growth: %s", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in grown.items())
                or "no new ids")
    return new
