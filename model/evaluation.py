"""Offline next-item evaluation of a session model over the full catalogue.

Each query is a history and the item that came next; the model scores every
real item (padding, missing and OOV ids are never candidates), optionally
with the items of the full, untruncated history excluded, and the metrics of
:mod:`model.metrics` are accumulated. Under DistributedDataParallel every rank
scores its own shard of the queries and the sums are all-reduced, so every
rank returns the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from model.data import Sequences, eval_batches
from model.metrics import RankingAccumulator
from model.model import SessionModel, exclude_items

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: SessionModel, history: Sequences, targets: torch.Tensor, *,
             batch_size: int = 256, ks: Sequence[int] = (10, 20),
             exclude_seen: bool = True, sampled_negatives: int | None = None,
             device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
             seed: int = 0) -> dict[str, float]:
    """Full-catalogue ranking metrics of ``model`` on (``history``, ``targets``) queries.

    Args:
        exclude_seen: remove every item of the query's history from the candidates
            (a target that is also in the history is kept: it is the answer).
        sampled_negatives: also compute the sampled protocol (labelled keys).
        rank, world_size: this process's shard of the queries (DDP).
    """
    was_training = model.training
    model.eval()
    acc = RankingAccumulator(ks=tuple(ks), sampled_negatives=sampled_negatives)
    index = torch.arange(rank, len(history), world_size)
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    for batch in eval_batches(history.select(index), targets[index], batch_size,
                              model.config.max_len, item_feature=model.item_feature):
        b = batch.inputs.to(device)
        tgt = batch.targets.to(device)  # [B, 1]
        scores = model.score(b.features, b.mask).float()  # [B, V]
        if exclude_seen:
            seen = batch.seen.to(device)  # [2, n]
            keep = seen[1] != tgt[seen[0], 0]  # the answer itself stays a candidate
            scores = exclude_items(scores, seen[:, keep])
        acc.update(scores, tgt, generator=gen)
    if world_size > 1 and dist.is_initialized():
        state = acc.state().to(device)
        dist.all_reduce(state)
        acc.load_state(state.cpu())
    model.train(was_training)
    return acc.compute()
