"""Offline evaluation metrics of the recommender, honest by construction.

The protocol:

* **Full-catalogue metrics are the headline.** Every target is ranked against
  every item the caller did not exclude. The caller excludes items (padding id 0,
  the special ids, optionally items already seen in the session) by setting their
  score to ``-inf`` before calling :func:`target_ranks`.
* **Ties are pessimistic.** A target's rank is the number of items scoring at
  least as high as it, itself included. Breaking ties in the target's favour
  (or by item id) lets a degenerate model that scores everything alike look
  perfect; counting ties against it gives such a model the worst rank.
* **One rank per target.** Every metric at every cut-off k is computed from the
  same ranks, so for example ``recall@1 <= recall@10`` cannot be violated (it can
  be when each k runs its own top-k with its own tie-breaking).
* **Sampled metrics are always labelled.** SASRec's older protocol (rank the
  target among 100 random negatives) is available through :func:`sampled_ranks`;
  its metric names carry the prefix ``"sampled{n}/"``, e.g. ``"sampled100/ndcg@10"``
  (:func:`sampled_metric_names`). Full-catalogue names have no prefix.

Monotonicity in k: ``hr``, ``recall`` and ``mrr`` never decrease as k grows.
``ndcg@k`` and ``map@k`` divide by the best value reachable at k
(``min(#relevant, k)`` terms), so with several relevant items they can decrease
while ``k < #relevant`` (ranks 1 and 4 of 3 relevant: ``ndcg@1 = 1``,
``ndcg@5 = 0.67``). With one relevant item (next-item prediction), and for every
``k >= #relevant``, they never decrease. All metrics lie in [0, 1].

Distributed evaluation sums the accumulators of all ranks::

    acc = RankingAccumulator(ks=(10, 20))
    for scores, targets in batches:
        acc.update(scores, targets)
    state = acc.state(device)                 # flat float64 sums + query count
    torch.distributed.all_reduce(state)       # SUM is the default op
    acc.load_state(state)
    metrics = acc.compute()                   # {"ndcg@10": ..., ...}
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch

from model.config_base import ConfigError, from_dict

__all__ = [
    "METRIC_NAMES",
    "RankingAccumulator",
    "RankingMetricsConfig",
    "auc",
    "log_loss",
    "ranking_metrics",
    "sample_negative_ids",
    "sampled_metric_names",
    "sampled_ranks",
    "target_ranks",
]

METRIC_NAMES: tuple[str, ...] = ("ndcg", "hr", "recall", "mrr", "map")
"""Metric families, in the order :func:`ranking_metrics` returns them."""

V = TypeVar("V")


# --- Input checks ------------------------------------------------------------------------------


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """The cut-offs as a tuple of ints; ValueError when empty, non-positive or repeated."""
    if isinstance(ks, numbers.Integral):
        raise ValueError(f"ks must be a sequence of cut-offs such as (10, 20), got {ks!r}")
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks is empty; pass cut-offs such as (10, 20)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"ks must be positive integers, got {k!r} in {ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has repeated cut-offs: {ks}")
    return tuple(int(k) for k in ks)


def _check_scores_targets(scores: torch.Tensor, targets: torch.Tensor) -> None:
    """Shapes, dtypes, devices and id range of a ``(scores, targets)`` pair."""
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a float [B, V] tensor, got shape {tuple(scores.shape)} "
            f"dtype {scores.dtype}"
        )
    if targets.dim() != 2 or targets.dtype != torch.int64:
        raise ValueError(
            f"targets must be an int64 [B, T] tensor (0 = no target in that slot), got "
            f"shape {tuple(targets.shape)} dtype {targets.dtype}; for one target per "
            "query pass targets[:, None]"
        )
    if targets.shape[1] == 0:
        raise ValueError("targets has no slots (T = 0); give each query at least one slot")
    if targets.shape[0] != scores.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} queries but targets has {targets.shape[0]}")
    if targets.device != scores.device:
        raise ValueError(f"scores are on {scores.device} but targets on {targets.device}")
    num_items = scores.shape[1]
    if targets.numel() and bool(((targets < 0) | (targets >= num_items)).any()):
        raise ValueError(
            f"target ids must lie in [0, {num_items}) for a [B, {num_items}] score matrix "
            f"(0 = no target), got ids from {int(targets.min())} to {int(targets.max())}"
        )
    # NaN compares False with everything: a NaN item would silently never outrank a target.
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; fix the model output before evaluating it")


def _check_single_target(targets: torch.Tensor) -> None:
    if targets.shape[1] != 1:
        raise ValueError(
            f"the sampled protocol ranks one target per query ([B, 1]), got T="
            f"{targets.shape[1]}; pass targets[:, :1], or use full-catalogue target_ranks "
            "for several targets"
        )


def _first_occurrences(targets: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: True at real target ids (> 0) not already seen earlier in the row.

    A repeated target id is one relevant item: its later copies are dropped, as
    counting it twice would push ndcg and map above 1.

    >>> _first_occurrences(torch.tensor([[5, 3, 5, 0], [0, 0, 0, 0]]))
    tensor([[ True,  True, False, False],
            [False, False, False, False]])
    """
    sorted_ids, order = targets.sort(dim=1, stable=True)  # [B, T]; equal ids keep slot order
    repeat = torch.zeros_like(targets, dtype=torch.bool)  # [B, T] in sorted order
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    first = torch.zeros_like(repeat).scatter_(1, order, ~repeat)  # [B, T] back in slot order
    return first & (targets > 0)


def _target_scores(
    scores: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target_scores [B, T], valid [B, T])``; ValueError when a real target is excluded."""
    valid = _first_occurrences(targets)  # [B, T]
    target_scores = scores.gather(1, targets)  # [B, T]; padding slots read item 0, masked later
    excluded = valid & (target_scores == -math.inf)  # [B, T]
    if bool(excluded.any()):
        row, slot = (int(i) for i in excluded.nonzero()[0])
        raise ValueError(
            f"target item {int(targets[row, slot])} of query {row} has score -inf, i.e. it "
            "was excluded (padding/special id, or filtered out as already seen); it would "
            "silently count as a miss. Do not exclude targets: keep their scores finite, "
            "or drop such queries before evaluating"
        )
    return target_scores, valid


# --- Ranks -------------------------------------------------------------------------------------


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among the non-excluded items, pessimistic on ties.

    Args:
        scores: ``[B, V]`` float; excluded items already set to ``-inf``.
        targets: ``[B, T]`` int64 relevant item ids; 0 = no target in that slot.

    Returns:
        ``[B, T]`` float64: the number of items whose score is ``>=`` the target's
        (the target included), so ties count against the model: a constant-score
        model gets the worst rank, not the best. ``inf`` in padding slots and at
        repeated ids (a repeated target is one relevant item).

    Raises:
        ValueError: a real target has score ``-inf`` (it was excluded), scores
            contain NaN, or a target id lies outside ``[0, V)``.

    Memory is ``O(B * V)`` (one comparison per target slot); nothing is sorted.

    >>> scores = torch.tensor([[-math.inf, 0.9, 0.5, 0.5, 0.1]])
    >>> target_ranks(scores, torch.tensor([[2, 0]]))  # ties with item 3: rank 3, not 2
    tensor([[3., inf]], dtype=torch.float64)
    >>> target_ranks(torch.zeros(1, 4), torch.tensor([[1]]))  # constant scores: worst rank
    tensor([[4.]], dtype=torch.float64)
    """
    _check_scores_targets(scores, targets)
    target_scores, valid = _target_scores(scores, targets)  # [B, T], [B, T]
    ranks = torch.empty(targets.shape, dtype=torch.float64, device=scores.device)  # [B, T]
    for slot in range(targets.shape[1]):  # one [B, V] comparison at a time keeps memory O(B*V)
        at_least = scores >= target_scores[:, slot : slot + 1]  # [B, V]
        ranks[:, slot] = at_least.sum(dim=1).to(torch.float64)
    return ranks.masked_fill(~valid, math.inf)


def sample_negative_ids(
    scores: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[B, num_negatives]`` int64 negative item ids for SASRec's sampled protocol.

    Drawn uniformly without replacement from the non-excluded items (score above
    ``-inf``) other than the query's target: a uniformly random k-subset is the
    top-k of i.i.d. uniform keys, non-candidates get a key below every candidate.

    Args:
        scores: ``[B, V]`` float; excluded items set to ``-inf``.
        targets: ``[B, 1]`` int64 target ids; 0 = no target (that row's draw is arbitrary).
        num_negatives: negatives per query.
        generator: a ``torch.Generator`` on ``scores.device``, for reproducible draws.

    Raises:
        ValueError: a query with a target has fewer than ``num_negatives`` candidates.

    >>> scores = torch.tensor([[-math.inf, 0.1, 0.2, -math.inf, 0.4]])
    >>> sample_negative_ids(scores, torch.tensor([[4]]), 2).sort(dim=1).values
    tensor([[1, 2]])
    """
    _check_scores_targets(scores, targets)
    _check_single_target(targets)
    return _draw_negatives(scores, targets, num_negatives, generator)


def _draw_negatives(
    scores: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """:func:`sample_negative_ids` on checked inputs."""
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be a positive int, got {num_negatives!r}")
    candidate = scores > -math.inf  # [B, V]
    candidate.scatter_(1, targets, False)  # a target is never its own negative
    num_candidates = candidate.sum(dim=1)  # [B]
    short = (targets[:, 0] > 0) & (num_candidates < num_negatives)  # [B]
    if num_negatives > scores.shape[1] or bool(short.any()):
        row = int(short.nonzero()[0]) if bool(short.any()) else 0
        raise ValueError(
            f"query {row} has only {int(num_candidates[row])} non-excluded items besides "
            f"its target, fewer than num_negatives={num_negatives}; lower num_negatives "
            "or exclude fewer items"
        )
    keys = torch.rand(scores.shape, generator=generator, device=scores.device)  # [B, V]
    keys = keys.masked_fill(~candidate, -1.0)  # uniform keys lie in [0, 1)
    return keys.topk(num_negatives, dim=1).indices  # [B, num_negatives]


def sampled_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[B, 1]`` float64 rank of each target among ``num_negatives`` sampled negatives.

    SASRec's protocol, kept for comparison with older papers: the rank is
    ``1 + #negatives scoring >= the target`` (pessimistic ties), in
    ``[1, num_negatives + 1]``; ``inf`` where the target slot is 0. It
    overstates quality compared with the full catalogue; label its metrics with
    :func:`sampled_metric_names` and never report them alone.

    Args and errors as in :func:`sample_negative_ids`; ``targets`` must be ``[B, 1]``
    (use :func:`target_ranks` for several targets per query).

    >>> scores = torch.tensor([[-math.inf, 0.9, 0.2, 0.5, 0.5, 0.3]])
    >>> sampled_ranks(scores, torch.tensor([[3]]), num_negatives=4)  # all 4 candidates drawn
    tensor([[3.]], dtype=torch.float64)
    """
    _check_scores_targets(scores, targets)
    _check_single_target(targets)
    target_scores, valid = _target_scores(scores, targets)  # [B, 1], [B, 1]
    negatives = _draw_negatives(scores, targets, num_negatives, generator)  # [B, n]
    negative_scores = scores.gather(1, negatives)  # [B, n]
    beaten_by = (negative_scores >= target_scores).sum(dim=1, keepdim=True)  # [B, 1]
    ranks = (beaten_by + 1).to(torch.float64)  # [B, 1]
    return ranks.masked_fill(~valid, math.inf)


# --- Metrics from ranks ------------------------------------------------------------------------


def ranking_metrics(ranks: torch.Tensor, ks: Iterable[int] = (10, 20)) -> dict[str, torch.Tensor]:
    """Per-query ``ndcg``, ``hr``, ``recall``, ``mrr`` and ``map`` at each cut-off k.

    Args:
        ranks: ``[B, T]`` float 1-based ranks (from :func:`target_ranks` or
            :func:`sampled_ranks`); ``inf`` = no target in that slot.
        ks: cut-offs, positive and distinct.

    Returns:
        ``{"ndcg@k": [B], ...}`` ordered by metric (``METRIC_NAMES``), then by k, in
        ``ranks.dtype``. With ``R`` the relevant items of a query and ``r_i`` their ranks:

        * ``hr@k``: 1 if some ``r_i <= k``;
        * ``recall@k``: ``#{r_i <= k} / |R|``;
        * ``mrr@k``: ``1 / min r_i`` if ``min r_i <= k``, else 0;
        * ``ndcg@k``: ``sum_{r_i <= k} 1/log2(r_i + 1)`` over the ideal
          ``sum_{j=1..min(|R|, k)} 1/log2(j + 1)``;
        * ``map@k``: ``sum_{r_i <= k} precision@r_i / min(|R|, k)`` with
          ``precision@r = #{r_j <= r} / r``.

        A query with no target gets NaN everywhere (undefined, not 0: averaging it
        in would be wrong either way; :class:`RankingAccumulator` skips it).

    >>> m = ranking_metrics(torch.tensor([[3.0]]), ks=(2, 10))
    >>> [round(float(m[name]), 4) for name in ("ndcg@10", "mrr@10", "hr@2", "map@10")]
    [0.5, 0.3333, 0.0, 0.3333]
    """
    ks = _check_ks(ks)
    if ranks.dim() != 2 or not ranks.is_floating_point():
        raise ValueError(
            f"ranks must be a float [B, T] tensor, got shape {tuple(ranks.shape)} "
            f"dtype {ranks.dtype}"
        )
    if ranks.shape[1] == 0:
        raise ValueError("ranks has no slots (T = 0); give each query at least one slot")
    if bool((torch.isnan(ranks) | (ranks < 1)).any()):
        raise ValueError("ranks must be >= 1 (1-based) or inf for empty slots; got NaN or < 1")
    valid = torch.isfinite(ranks)  # [B, T]
    num_relevant = valid.sum(dim=1)  # [B]
    best_rank = ranks.min(dim=1).values  # [B]; inf when no target
    # hits_up_to[b, i] = #relevant j with r_j <= r_i: the numerator of precision@r_i.
    at_or_before = valid[:, None, :] & (ranks[:, None, :] <= ranks[:, :, None])  # [B, T, T]
    hits_up_to = at_or_before.sum(dim=2).to(ranks.dtype)  # [B, T]
    gain = torch.where(valid, 1.0 / torch.log2(ranks + 1), 0.0)  # [B, T]
    precision = torch.where(valid, hits_up_to / ranks, 0.0)  # [B, T]
    no_target = num_relevant == 0  # [B]
    positions = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=ranks.dtype)
    ideal_cumulative = (1.0 / torch.log2(positions + 1)).cumsum(0)  # [T]

    per_k: dict[str, dict[int, torch.Tensor]] = {name: {} for name in METRIC_NAMES}
    for k in ks:
        in_top = valid & (ranks <= k)  # [B, T]
        num_in_top = in_top.sum(dim=1).to(ranks.dtype)  # [B]
        ideal_terms = num_relevant.clamp(min=1, max=k)  # [B]; at least 1 avoids 0/0 below
        ideal = ideal_cumulative[ideal_terms - 1]  # [B]
        hit = best_rank <= k  # [B]
        values = {
            "ndcg": torch.where(in_top, gain, 0.0).sum(dim=1) / ideal,
            "hr": hit.to(ranks.dtype),
            "recall": num_in_top / num_relevant.clamp(min=1),
            "mrr": torch.where(hit, 1.0 / best_rank, 0.0),
            "map": torch.where(in_top, precision, 0.0).sum(dim=1) / ideal_terms,
        }
        for name, value in values.items():
            per_k[name][k] = value.to(ranks.dtype).masked_fill(no_target, math.nan)
    return {f"{name}@{k}": per_k[name][k] for name in METRIC_NAMES for k in ks}


def sampled_metric_names(metrics: Mapping[str, V], num_negatives: int) -> dict[str, V]:
    """The same metrics, keys labelled with the sampled protocol: ``"sampled{n}/{key}"``.

    >>> sampled_metric_names({"ndcg@10": 0.4}, 100)
    {'sampled100/ndcg@10': 0.4}
    """
    return {f"sampled{num_negatives}/{key}": value for key, value in metrics.items()}


# --- CTR metrics (two-tower pre-ranker) --------------------------------------------------------


def _check_binary(
    labels: torch.Tensor, values: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ``(labels as bool [N], values as float64 [N])``; ValueError on bad input."""
    if labels.shape != values.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and {what} {tuple(values.shape)} differ in shape"
        )
    if labels.numel() == 0:
        raise ValueError(f"labels and {what} are empty")
    y = labels.reshape(-1)  # [N]
    if labels.dtype != torch.bool and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 or 1 (click / no click)")
    x = values.reshape(-1).to(torch.float64)  # [N]
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{what} contain NaN")
    return y.to(torch.bool), x


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """``[N]`` float64 1-based ascending ranks of ``x``; tied values share their mean rank.

    >>> _average_ranks(torch.tensor([0.5, 0.1, 0.5, 0.9]))
    tensor([2.5000, 1.0000, 2.5000, 4.0000], dtype=torch.float64)
    """
    sorted_x, order = x.sort()  # [N], [N]
    _, group, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(torch.float64)  # [G] rank of each tie group's last member
    mean_rank = last - (counts - 1).to(torch.float64) / 2  # [G] mean of first..last
    ranks = torch.empty_like(x, dtype=torch.float64)  # [N]
    ranks[order] = mean_rank[group]
    return ranks


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """ROC AUC: the probability that a random positive outscores a random negative.

    Computed from ranks (Mann-Whitney U) with average ranks for ties, so a tied
    positive/negative pair counts one half. ``O(N log N)``.

    Raises:
        ValueError: only one class is present (AUC is undefined), shapes differ,
            labels are not 0/1, or scores contain NaN.

    >>> auc(torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y, s = _check_binary(labels, scores, "scores")
    num_pos = int(y.sum())
    num_neg = y.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"AUC is undefined with one class only ({num_pos} positives, {num_neg} "
            "negatives); evaluate on data with both clicks and non-clicks"
        )
    rank_sum = float(_average_ranks(s)[y].sum())
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def log_loss(labels: torch.Tensor, probabilities: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of click probabilities, clipped to ``[eps, 1 - eps]``.

    >>> round(log_loss(torch.tensor([1, 0]), torch.tensor([0.8, 0.4])), 6)
    0.366985
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    y, p = _check_binary(labels, probabilities, "probabilities")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("probabilities must lie in [0, 1]; for logits pass torch.sigmoid(logits)")
    p = p.clamp(eps, 1.0 - eps)  # [N]
    losses = -torch.where(y, torch.log(p), torch.log1p(-p))  # [N]
    return float(losses.mean())


# --- Config and accumulator --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankingMetricsConfig:
    """What the evaluation loop measures.

    Attributes:
        ks: cut-offs k of every ``@k`` metric; positive, distinct. A JSON list is
            stored as a tuple.
        sampled_negatives: when set, also report SASRec's sampled metrics with this
            many uniform negatives per query, under ``"sampled{n}/..."`` keys after the
            full-catalogue ones. Needs one target per query. ``None``: full catalogue only.

    >>> RankingMetricsConfig.from_dict({"ks": [5, 10], "sampled_negatives": 100})
    RankingMetricsConfig(ks=(5, 10), sampled_negatives=100)
    """

    ks: tuple[int, ...] = (10, 20)
    sampled_negatives: int | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "ks", _check_ks(self.ks))
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        n = self.sampled_negatives
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(
                f"sampled_negatives must be a positive int (e.g. 100) or None, got {n!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RankingMetricsConfig:
        """Build from a JSON dict; unknown keys raise :class:`ConfigError`."""
        return from_dict(cls, data)


class RankingAccumulator:
    """Sums per-query ranking metrics over batches; means on :meth:`compute`.

    The state is one flat float64 tensor (metric sums, then the query count), so
    ranks of a distributed job ``all_reduce`` it and :meth:`load_state` the total.
    Queries whose target slots are all 0 are skipped, not counted. ``update``
    never synchronises with the device beyond its input checks.

    >>> acc = RankingAccumulator(ks=(1, 10), sampled_negatives=3)
    >>> scores = torch.tensor([[-math.inf, 0.9, 0.5, 0.5, 0.1], [-math.inf, 0.2, 0.3, 0.4, 0.1]])
    >>> acc.update(scores, torch.tensor([[2], [0]]))  # the second query has no target
    >>> m = acc.compute()
    >>> acc.num_queries, m["ndcg@10"], m["hr@1"], list(m)[10]
    (1, 0.5, 0.0, 'sampled3/ndcg@1')
    """

    def __init__(self, ks: Iterable[int] = (10, 20), sampled_negatives: int | None = None):
        # The config's __post_init__ turns ks into a checked tuple (and refuses a bare int).
        self.config = RankingMetricsConfig(
            ks=ks,  # type: ignore[arg-type]
            sampled_negatives=sampled_negatives,
        )
        full = [f"{name}@{k}" for name in METRIC_NAMES for k in self.config.ks]
        sampled = (
            list(sampled_metric_names(dict.fromkeys(full), sampled_negatives))
            if sampled_negatives is not None
            else []
        )
        self.keys: tuple[str, ...] = (*full, *sampled)  # compute() order
        self._sums = torch.zeros(len(self.keys) + 1, dtype=torch.float64)  # [M + 1]

    @classmethod
    def from_config(cls, config: RankingMetricsConfig) -> RankingAccumulator:
        """An empty accumulator measuring what ``config`` says."""
        return cls(config.ks, config.sampled_negatives)

    def update(
        self,
        scores: torch.Tensor,
        targets: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> None:
        """Add one batch: ``scores [B, V]`` (excluded items ``-inf``), ``targets [B, T]``.

        ``generator`` (on ``scores.device``) drives the sampled negatives, if enabled.
        """
        ranks = target_ranks(scores, targets)  # [B, T]
        per_query = ranking_metrics(ranks, self.config.ks)
        n = self.config.sampled_negatives
        if n is not None:
            sampled = sampled_ranks(scores, targets, n, generator)  # [B, 1]
            per_query.update(sampled_metric_names(ranking_metrics(sampled, self.config.ks), n))
        counted = torch.isfinite(ranks).any(dim=1)  # [B]
        values = torch.stack([per_query[key] for key in self.keys], dim=1)  # [B, M]
        values = torch.where(counted[:, None], values, 0.0)  # skipped queries are NaN
        batch = torch.cat([values.sum(dim=0), counted.sum()[None].to(torch.float64)])  # [M + 1]
        self._sums = self._sums.to(batch.device) + batch

    def state(self, device: torch.device | str | None = None) -> torch.Tensor:
        """A copy of the flat float64 state ``[M + 1]``, on ``device`` if given (NCCL: cuda)."""
        state = self._sums.clone()
        return state if device is None else state.to(device)

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the state, e.g. with the ``all_reduce`` sum of every rank's :meth:`state`."""
        expected = len(self.keys) + 1
        if state.shape != (expected,):
            raise ValueError(
                f"state has shape {tuple(state.shape)}, expected ({expected},) for keys "
                f"{self.keys[:3]}...; was it made by an accumulator with other ks or "
                "sampled_negatives?"
            )
        self._sums = state.detach().to(torch.float64).clone()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._sums = torch.zeros_like(self._sums)

    @property
    def num_queries(self) -> int:
        """Queries with at least one target accumulated so far."""
        return round(float(self._sums[-1]))

    def compute(self) -> dict[str, float]:
        """Mean of each metric over the accumulated queries, in :attr:`keys` order."""
        sums = self._sums.tolist()
        count = sums[-1]
        if count == 0:
            raise ValueError(
                "no query with a target was accumulated; call update() with targets that "
                "are not all 0 (0 marks an empty target slot)"
            )
        return {key: total / count for key, total in zip(self.keys, sums[:-1], strict=True)}
