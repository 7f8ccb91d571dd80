"""Pre-ranking: an IntTower (or DSSM) narrows the catalogue before the session model scores it.

Serving picks the stage with :class:`PreRankConfig` (``pre_ranker: none | inttower``):

- ``none``: the session model scores the whole catalogue (:meth:`SessionModel.predict`);
- ``inttower``: the session becomes user-tower input (:func:`session_user_features`:
  the session's items are the liked-history list, every other user feature is
  missing), the pre-ranker scores every item of its :class:`ItemIndex` (item-tower
  head vectors precomputed once per model version) by exact search in chunks of
  the catalogue, and only the top ``N`` candidates are scored by the session
  model (:func:`rerank`).

The index also serves as a retrieval index on its own (:meth:`PreRanker.top_n`).
Search is exact: brute force over chunks, a running top-N merged per chunk, so
memory is ``O(B * chunk)`` whatever the catalogue size. ``docs/inttower.md``
says when an approximate index would be the better choice.

Ids: the index stores each catalogue item's id **in the session model's
encoding**, so candidates go to the re-ranker as they are. ``id_map`` (optional,
``[scorer cardinality]``) maps session-model item ids to the pre-ranker's own
item vocabulary for the history feature; without it the two encodings are the same.

>>> from model.inttower import FieldConfig, TowerConfig, TwoTowerConfig, build_two_tower
>>> user = TowerConfig((FieldConfig("history", "sequence", cardinality=30),), hidden=(8, 4))
>>> item = TowerConfig((FieldConfig("item_id", "sparse", cardinality=30),), hidden=(8, 4))
>>> tower = build_two_tower(TwoTowerConfig(user=user, item=item, head_dim=4)).eval()
>>> ids = torch.arange(3, 30)
>>> pre = PreRanker(tower, build_index(tower, {"item_id": ids}, ids))
>>> cand = pre.session_top_n(torch.tensor([[5, 6, 0]]), torch.tensor([[True, True, False]]), n=4)
>>> cand.ids.shape, bool((cand.ids >= 3).all()), bool((cand.scores.diff() <= 0).all())
(torch.Size([1, 4]), True, True)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.inttower import (
    TowerConfig,
    TwoTowerModel,
    catalogue_scores,
    index_layout,
    load_two_tower,
    save_two_tower,
)
from model.model import SessionModel, TopK
from model.preranker_config import PRE_RANKERS, PreRankConfig

__all__ = [
    "PRE_RANKERS", "Candidates", "ItemIndex", "PreRankConfig", "PreRanker", "build_index",
    "candidate_scores", "exact_top_n", "load_preranker", "recommend", "rerank",
    "save_preranker", "session_user_features",
]

MISSING_ID = 1
INDEX_FILE = "index"


@dataclasses.dataclass(frozen=True)
class ItemIndex:
    """The catalogue as the pre-ranker sees it: ``item_ids`` ``[N]`` (session-model ids)
    and their item-tower head vectors ``heads`` in the search layout ``[L, H', d, N]``
    (:func:`~model.inttower.index_layout`)."""

    item_ids: Tensor
    heads: Tensor

    def __post_init__(self) -> None:
        if self.item_ids.dim() != 1 or self.item_ids.dtype != torch.int64:
            raise ValueError("item_ids must be an int64 [N] tensor")
        if self.heads.dim() != 4 or self.heads.shape[3] != self.item_ids.shape[0]:
            raise ValueError(f"heads must be [L, H, d, N={self.item_ids.shape[0]}] "
                             f"(index_layout), got {tuple(self.heads.shape)}")

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Top-N per row: ``ids`` ``[B, n]`` (0 where fewer remain) and ``scores`` (``-inf`` there)."""

    ids: Tensor
    scores: Tensor


def build_index(model: TwoTowerModel, item_features: Mapping[str, Tensor], item_ids: Tensor,
                batch_size: int = 65_536) -> ItemIndex:
    """Run the item tower once over the catalogue (in batches) and keep its head vectors."""
    was_training = model.training
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(item_ids), batch_size):
            batch = {k: v[start:start + batch_size] for k, v in item_features.items()}
            parts.append(model.item_heads(batch))  # [b, L, H', d]
    model.train(was_training)
    return ItemIndex(item_ids.clone(), index_layout(torch.cat(parts)))  # [L, H', d, N]


def exact_top_n(user_heads: Tensor, item_heads: Tensor, n: int,
                chunk_size: int = 65_536) -> tuple[Tensor, Tensor]:
    """Exact top-``n`` items per user by IntTower score, ``(scores [B, n], positions [B, n])``.

    ``item_heads`` is in the search layout ``[L, H', d, N]``. Scores the catalogue
    ``chunk_size`` items at a time, merging a running top-n, so nothing of size
    ``[B, N]`` is built. ``n`` is cut to the catalogue size.

    >>> u, v = torch.randn(2, 1, 2, 3), torch.randn(1, 2, 3, 50)
    >>> full = catalogue_scores(u, v).topk(5)
    >>> vals, pos = exact_top_n(u, v, 5, chunk_size=7)
    >>> torch.equal(pos, full.indices) and torch.allclose(vals, full.values)
    True
    """
    num_items = item_heads.shape[3]
    n = min(n, num_items)
    b = user_heads.shape[0]
    best = user_heads.new_empty(b, 0)  # [B, <=n]
    best_pos = torch.empty(b, 0, dtype=torch.int64, device=user_heads.device)
    for start in range(0, num_items, chunk_size):
        scores = catalogue_scores(user_heads, item_heads[..., start:start + chunk_size])  # [B, C]
        top = scores.topk(min(n, scores.shape[1]), dim=1)  # the chunk's own top-n first
        merged = torch.cat([best, top.values], dim=1)  # [B, <= 2n]
        merged_pos = torch.cat([best_pos, top.indices + start], dim=1)  # [B, <= 2n]
        keep = merged.topk(min(n, merged.shape[1]), dim=1)
        best, best_pos = keep.values, merged_pos.gather(1, keep.indices)
    return best, best_pos


def session_user_features(item_ids: Tensor, mask: Tensor, tower: TowerConfig,
                          history_field: str = "history",
                          id_map: Tensor | None = None) -> dict[str, Tensor]:
    """User-tower input for sessions: the session's items as ``history_field``, the rest missing.

    ``item_ids`` / ``mask`` ``[B, L]`` are the session model's inputs. Sparse fields
    get the missing id 1, dense fields 0.0 (the training mean), other lists stay empty.

    >>> from model.inttower import FieldConfig
    >>> tower = TowerConfig((FieldConfig("age", "dense"), FieldConfig("gender", "sparse", 4),
    ...                      FieldConfig("history", "sequence", 9)))
    >>> f = session_user_features(torch.tensor([[5, 6, 7]]), torch.tensor([[True, True, False]]),
    ...                           tower)
    >>> f["history"].tolist(), f["gender"].tolist(), f["age"].tolist()
    ([[5, 6, 0]], [1], [0.0])
    """
    names = {f.name: f for f in tower.fields}
    if history_field not in names or names[history_field].kind != "sequence":
        raise ValueError(f"the user tower has no sequence field {history_field!r} to feed the "
                         f"session's items into; its fields: {sorted(names)}")
    if item_ids.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError("item_ids and a bool mask of the same [B, L] shape expected")
    history = item_ids if id_map is None else id_map.to(item_ids.device)[item_ids]
    history = torch.where(mask, history, 0)  # [B, L]; padding stays 0
    b, dev = item_ids.shape[0], item_ids.device
    out: dict[str, Tensor] = {}
    for f in tower.fields:
        if f.name == history_field:
            out[f.name] = history
        elif f.kind == "sparse":
            out[f.name] = torch.full((b,), MISSING_ID, dtype=torch.int64, device=dev)
        elif f.kind == "dense":
            out[f.name] = torch.zeros(b, device=dev)
        else:
            out[f.name] = torch.zeros(b, 1, dtype=torch.int64, device=dev)
    return out


class PreRanker:
    """A two-tower model and its item index; stateless between calls.

    Args:
        model: the IntTower / DSSM whose item tower built ``index``.
        index: :func:`build_index` output.
        history_field: the user-tower list field fed with the session's items.
        id_map: session-model item id -> pre-ranker history id (``None``: the same ids).
    """

    def __init__(self, model: TwoTowerModel, index: ItemIndex, history_field: str = "history",
                 id_map: Tensor | None = None):
        self.model = model.eval()
        self.index = index
        self.history_field = history_field
        self.id_map = id_map

    def user_features(self, item_ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return session_user_features(item_ids, mask, self.model.config.user,
                                     self.history_field, self.id_map)

    def top_n(self, user_features: Mapping[str, Tensor], n: int, chunk_size: int = 65_536,
              exclude: Tensor | None = None) -> Candidates:
        """Exact top-``n`` catalogue items per user; ``exclude`` ``[B, M]`` ids never returned."""
        heads = self.index.heads
        with torch.no_grad():
            u = self.model.user_heads(user_features).to(heads.dtype)  # [B, L, H, d]
            m = 0 if exclude is None else exclude.shape[1]
            scores, pos = exact_top_n(u, heads, n + m, chunk_size)  # n + M: room for exclusions
            ids = self.index.item_ids[pos]  # [B, n + M]
            if exclude is not None:
                hit = (ids[:, :, None] == exclude[:, None, :]).any(dim=2)  # [B, n + M]
                scores = scores.masked_fill(hit, float("-inf"))
                top = scores.topk(min(n, scores.shape[1]), dim=1)
                scores, ids = top.values, ids.gather(1, top.indices)
            ids = torch.where(torch.isneginf(scores), 0, ids)
        return Candidates(ids[:, :n], scores[:, :n])

    def session_top_n(self, item_ids: Tensor, mask: Tensor, n: int, chunk_size: int = 65_536,
                      exclude_seen: bool = False) -> Candidates:
        """:meth:`top_n` for sessions (``[B, L]`` session-model item ids and mask)."""
        exclude = torch.where(mask, item_ids, 0) if exclude_seen else None
        return self.top_n(self.user_features(item_ids, mask), n, chunk_size, exclude)


def candidate_scores(model: SessionModel, features: Mapping[str, Tensor], mask: Tensor,
                     candidates: Tensor) -> Tensor:
    """The session model's scores of only the ``candidates`` ``[B, N]`` -> ``[B, N]``.

    Equal to ``model.score(features, mask).gather(1, candidates)`` without scoring
    the catalogue; ids below ``first_item_id`` (no candidate, special ids) get ``-inf``.
    """
    head = model.next_item
    h = model.session_representation(features, mask)  # [B, D]
    q = head._query(h)  # [B, E]
    w = head._weight()[candidates]  # [B, N, E]
    scores = head._finish(torch.einsum("be,bne->bn", q, w), candidates)  # [B, N]
    return scores.masked_fill(candidates < model.first_item_id, float("-inf"))


def rerank(model: SessionModel, features: Mapping[str, Tensor], mask: Tensor,
           candidates: Tensor, k: int = 10, exclude_seen: bool = False) -> TopK:
    """Top-``k`` of the candidates by the session model (the :class:`TopK` convention)."""
    scores = candidate_scores(model, features, mask, candidates)  # [B, N]
    if exclude_seen:
        ids = torch.where(mask, features[model.item_feature], 0)  # [B, L]
        seen = (candidates[:, :, None] == ids[:, None, :]).any(dim=2)  # [B, N, L] -> [B, N]
        scores = scores.masked_fill(seen, float("-inf"))
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    ids = candidates.gather(1, top.indices)
    return TopK(torch.where(torch.isneginf(top.values), 0, ids), top.values)


def recommend(model: SessionModel, features: Mapping[str, Tensor], mask: Tensor, k: int,
              config: PreRankConfig, preranker: PreRanker | None = None,
              exclude_seen: bool = False) -> TopK:
    """The scoring path serving runs: full catalogue, or pre-ranker top-N then re-ranking."""
    if config.pre_ranker == "none":
        return model.predict(features, mask, k=k, exclude_seen=exclude_seen)
    if preranker is None:
        raise ValueError("pre_ranker='inttower' needs a PreRanker: load_preranker(config.version)")
    with torch.no_grad():
        cand = preranker.session_top_n(features[model.item_feature], mask, config.top_n,
                                       config.chunk_size, exclude_seen)
        return rerank(model, features, mask, cand.ids, k, exclude_seen)


def save_preranker(directory: str | os.PathLike[str], preranker: PreRanker,
                   metrics: Mapping[str, Any] | None = None,
                   info: Mapping[str, Any] | None = None) -> Path:
    """One immutable version directory: the two-tower model plus ``index.safetensors``."""
    tensors = {"item_ids": preranker.index.item_ids, "heads": preranker.index.heads}
    if preranker.id_map is not None:
        tensors["id_map"] = preranker.id_map
    meta = {**dict(info or {}), "preranker": {"history_field": preranker.history_field,
                                              "num_items": len(preranker.index)}}
    return save_two_tower(directory, preranker.model, metrics, meta, {INDEX_FILE: tensors})


def load_preranker(directory: str | os.PathLike[str],
                   device: torch.device | str = "cpu") -> PreRanker:
    """Read a :func:`save_preranker` version; everything on ``device``."""
    version = load_two_tower(directory, device)
    if INDEX_FILE not in version.tensors or "preranker" not in version.info:
        raise ValueError(f"{directory}: a two-tower version without an item index; build one "
                         "with build_index and save it with save_preranker")
    t = version.tensors[INDEX_FILE]
    return PreRanker(version.model, ItemIndex(t["item_ids"], t["heads"]),
                     version.info["preranker"]["history_field"], t.get("id_map"))
