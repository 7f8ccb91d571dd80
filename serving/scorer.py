"""Batch scoring of recommendation requests with one loaded model version.

:class:`Scorer` is what the dynamic batcher calls: a list of requests and
the stored events of their sessions in, one answer per request out, with one
feature transform, one forward pass and one catalogue matmul for the whole
batch. It is pure with respect to I/O (the caller reads Redis), so it is
tested without servers.

Per request, after the batch's scores ``[B, num_items]``:

- ids that are not real items (padding, missing, out of vocabulary) never
  appear (their score is ``-inf``);
- ``exclude_seen`` removes the items of the session's stored events;
- ``candidates`` restricts the answer to the given original item ids (unknown
  ones are ignored); the pre-ranker uses the same path;
- a session with no stored events gets ``None``: the server answers it from
  the fallback (popularity), it is not the model's to guess.

With a ``preranker`` (``pre_ranker: inttower``), the two-tower model first
picks ``top_n`` candidates per session from the whole catalogue and the
session model scores only those; every other item scores ``-inf``, and the
rules above apply unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import torch

from features.batch import SessionBatch
from model.checkpoint import Checkpoint
from model.preranker import PreRanker, candidate_scores

__all__ = ["RecRequest", "Scored", "Scorer"]


@dataclasses.dataclass(frozen=True)
class RecRequest:
    """One ``POST /v1/recommendations`` body, validated by the API layer."""

    session_id: str
    k: int = 10
    exclude_seen: bool = True
    candidates: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Scored:
    """The model's answer for one request: original item ids and scores, best first."""

    items: list[Any]
    scores: list[float]


class Scorer:
    """Scores batches of requests with ``checkpoint`` (see the module docstring)."""

    def __init__(self, checkpoint: Checkpoint, version: str,
                 device: torch.device | str = "cpu", *,
                 preranker: PreRanker | None = None, top_n: int = 1000):
        if checkpoint.workflow is None:
            raise ValueError(f"model version {version} has no workflow: it cannot encode events")
        self.checkpoint = checkpoint
        self.version = version
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        self.workflow = checkpoint.workflow
        self._item_op = self.workflow.ops[self.model.item_feature]
        self._columns = list(self.workflow.event_columns)
        item_source = self.workflow.schema[self.model.item_feature].source_column
        self._item_source = item_source
        self.preranker = preranker
        self.top_n = top_n

    def encode_items(self, items: Sequence[Any]) -> torch.Tensor:
        """Original item ids -> model ids (``< first_item_id`` for unknown items)."""
        if not items:
            return torch.zeros(0, dtype=torch.long)
        column = pa.array(list(items))
        if pa.types.is_integer(column.type) and self._item_op.value_type == "string":
            column = column.cast(pa.string())
        return self._item_op.transform(column).to(torch.long)

    def _scores(self, features: Mapping[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` next-item scores: the whole catalogue, or only the pre-ranker's top-N."""
        if self.preranker is None:
            return self.model.score(features, mask).float()
        ids = features[self.model.item_feature]
        cand = self.preranker.session_top_n(ids, mask, self.top_n).ids  # [B, N]
        picked = candidate_scores(self.model, features, mask, cand).float()  # [B, N]
        scores = torch.full((ids.shape[0], self.model.num_items), float("-inf"),
                            device=ids.device)
        return scores.scatter_(1, cand, picked)  # id 0 (no candidate) stays -inf

    def __call__(self, requests: Sequence[RecRequest],
                 sessions: Mapping[str, list[dict[str, Any]]]) -> list[Scored | None]:
        live = [i for i, r in enumerate(requests) if sessions.get(r.session_id)]
        out: list[Scored | None] = [None] * len(requests)
        if not live:
            return out
        batch = SessionBatch.from_sessions(
            {f"{i}": sessions[requests[i].session_id] for i in live}, self._columns,
            ts_col=self.workflow.ts_col)
        first = self.model.first_item_id
        with torch.inference_mode():
            fb = self.workflow.transform(batch, self.device)
            scores = self._scores(fb.features, fb.mask)  # [B, V]
            # Seen items: every stored event of the session, not only the last max_len.
            # The window's ids are already encoded; only longer sessions are encoded again.
            seen_rows = [row for row, i in enumerate(live) if requests[i].exclude_seen]
            if seen_rows:
                chosen = torch.zeros(len(live), dtype=torch.bool, device=self.device)
                chosen[seen_rows] = True
                r, c = (fb.mask & chosen[:, None]).nonzero(as_tuple=True)
                scores[r, fb.features[self.model.item_feature][r, c]] = float("-inf")
                longer = [row for row in seen_rows
                          if len(sessions[requests[live[row]].session_id]) > self.workflow.max_len]
                if longer:
                    histories = [sessions[requests[live[row]].session_id] for row in longer]
                    ids = self.encode_items([ev.get(self._item_source)
                                             for h in histories for ev in h])
                    rows = torch.repeat_interleave(torch.tensor(longer),
                                                   torch.tensor([len(h) for h in histories]))
                    scores[rows.to(self.device), ids.to(self.device)] = float("-inf")
            for row, i in enumerate(live):
                cands = requests[i].candidates
                if cands is not None:
                    allowed = self.encode_items(cands).to(self.device)
                    allowed = allowed[allowed >= first]
                    keep = torch.full_like(scores[row], float("-inf"))
                    keep[allowed] = scores[row, allowed]
                    scores[row] = keep
            kmax = min(max(requests[i].k for i in live), scores.shape[1])
            top = torch.topk(scores, kmax, dim=1)  # [B, kmax]
            values, indices = top.values.cpu(), top.indices.cpu()
        items = self._item_op.decode(indices.reshape(-1)).to_pylist()
        for row, i in enumerate(live):
            n = min(requests[i].k, int(torch.isfinite(values[row]).sum()))
            at = row * kmax
            out[i] = Scored(items[at:at + n], values[row, :n].tolist())
        return out
