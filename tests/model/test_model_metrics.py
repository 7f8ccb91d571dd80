"""Offline metrics: hand-computed values, tie and exclusion honesty, properties, accumulator."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config_base import ConfigError
from model.metrics import (
    METRIC_NAMES,
    RankingAccumulator,
    RankingMetricsConfig,
    auc,
    log_loss,
    ranking_metrics,
    sample_negative_ids,
    sampled_metric_names,
    sampled_ranks,
    target_ranks,
)

INF = math.inf
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def values(metrics: dict[str, torch.Tensor], row: int = 0) -> dict[str, float]:
    return {k: float(v[row]) for k, v in metrics.items()}


# --- full-catalogue ranks and metrics: hand values ---------------------------------------


def test_single_target_at_rank_3_hand_values() -> None:
    # items:         0 (pad)  1    2    3    4    5
    scores = torch.tensor([[-INF, 0.9, 0.3, 0.7, 0.5, 0.1]])
    ranks = target_ranks(scores, torch.tensor([[4]]))
    assert ranks.tolist() == [[3.0]]  # 0.9, 0.7, 0.5 are >= 0.5
    m = values(ranking_metrics(ranks, ks=(2, 10)))
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(4))  # = 0.5
    assert m["ndcg@10"] == pytest.approx(0.5)
    assert m["mrr@10"] == pytest.approx(1 / 3)
    assert m["hr@10"] == 1.0
    assert m["recall@10"] == 1.0
    assert m["map@10"] == pytest.approx(1 / 3)  # precision@3 / min(1, 10)
    for name in METRIC_NAMES:
        assert m[f"{name}@2"] == 0.0


def test_several_targets_hand_values() -> None:
    # Distinct scores: item i has score 1 - i/10, so item i sits at rank i (item 0 excluded).
    scores = torch.tensor([[-INF] + [1 - i / 10 for i in range(1, 9)]])
    ranks = target_ranks(scores, torch.tensor([[1, 4, 6]]))
    assert ranks.tolist() == [[1.0, 4.0, 6.0]]
    m = values(ranking_metrics(ranks, ks=(1, 5)))
    assert m["hr@5"] == 1.0
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["mrr@5"] == 1.0
    idcg3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / idcg3)
    assert m["map@5"] == pytest.approx((1 / 1 + 2 / 4) / 3)
    assert m["recall@1"] == pytest.approx(1 / 3)
    # The ideal at k=1 holds one item: ndcg and map are 1 here and smaller at k=5. This is the
    # documented non-monotonicity of normalised metrics when k < #relevant.
    assert m["ndcg@1"] == 1.0
    assert m["map@1"] == 1.0
    assert m["ndcg@5"] < m["ndcg@1"]


def test_tied_targets_share_the_pessimistic_rank() -> None:
    scores = torch.tensor([[-INF, 0.9, 0.9, 0.1, 0.2]])
    ranks = target_ranks(scores, torch.tensor([[1, 2]]))
    assert ranks.tolist() == [[2.0, 2.0]]
    m = values(ranking_metrics(ranks, ks=(1, 2)))
    assert m["recall@1"] == 0.0
    assert m["hr@1"] == 0.0
    assert m["recall@2"] == 1.0
    assert m["ndcg@2"] == pytest.approx((2 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["map@2"] == pytest.approx((2 / 2 + 2 / 2) / 2)
    assert m["mrr@2"] == 0.5


def test_constant_scores_give_the_worst_rank() -> None:
    v = 7
    assert target_ranks(torch.zeros(2, v), torch.tensor([[3], [1]])).tolist() == [[7.0], [7.0]]
    scores = torch.zeros(1, v)
    scores[0, 0] = -INF  # padding excluded: worst rank among the 6 remaining
    assert target_ranks(scores, torch.tensor([[3]])).tolist() == [[6.0]]


def test_excluded_items_are_never_counted() -> None:
    scores = torch.tensor([[-INF, -INF, -INF, 0.2, 0.1, 0.3]])
    assert target_ranks(scores, torch.tensor([[4]])).tolist() == [[3.0]]
    scores[0, 1:3] = 5.0  # the same items, not excluded, now outrank the target
    assert target_ranks(scores, torch.tensor([[4]])).tolist() == [[5.0]]


def test_excluded_target_raises() -> None:
    scores = torch.tensor([[-INF, 0.5, -INF, 0.2], [-INF, 0.5, 0.4, 0.2]])
    with pytest.raises(ValueError, match=r"target item 2 of query 0 .*excluded"):
        target_ranks(scores, torch.tensor([[2], [2]]))
    with pytest.raises(ValueError, match="excluded"):
        sampled_ranks(scores, torch.tensor([[2], [1]]), num_negatives=1)


def test_padding_and_repeated_targets_are_ignored() -> None:
    scores = torch.tensor([[-INF, 0.1, 0.9, 0.5, 0.3]])
    one = target_ranks(scores, torch.tensor([[3]]))
    padded = target_ranks(scores, torch.tensor([[0, 3, 0]]))
    repeated = target_ranks(scores, torch.tensor([[3, 0, 3]]))
    assert padded.tolist() == [[INF, 2.0, INF]]
    assert repeated.tolist() == [[2.0, INF, INF]]
    for ranks in (padded, repeated):
        assert values(ranking_metrics(ranks, (1, 3))) == values(ranking_metrics(one, (1, 3)))


def test_query_without_target_is_nan_not_zero() -> None:
    m = ranking_metrics(torch.tensor([[INF, INF], [1.0, INF]]), ks=(5,))
    assert all(math.isnan(v[0]) for v in m.values())
    assert all(v[1] == 1.0 for v in m.values())


@pytest.mark.parametrize(
    ("scores", "targets", "match"),
    [
        (torch.tensor([[0.1, math.nan, 0.3]]), torch.tensor([[2]]), "NaN"),
        (torch.zeros(1, 3), torch.tensor([[3]]), r"\[0, 3\)"),
        (torch.zeros(1, 3), torch.tensor([[-1]]), r"\[0, 3\)"),
        (torch.zeros(1, 3), torch.tensor([2]), "targets\\[:, None\\]"),
        (torch.zeros(1, 3), torch.tensor([[2]], dtype=torch.int32), "int64"),
        (torch.zeros(2, 3), torch.tensor([[2]]), "2 queries"),
    ],
)
def test_bad_inputs_raise_with_a_hint(
    scores: torch.Tensor, targets: torch.Tensor, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        target_ranks(scores, targets)


def test_ranking_metrics_rejects_bad_ks_and_ranks() -> None:
    with pytest.raises(ValueError, match="positive"):
        ranking_metrics(torch.ones(1, 1), ks=(0, 10))
    with pytest.raises(ValueError, match="repeated"):
        ranking_metrics(torch.ones(1, 1), ks=(10, 10))
    with pytest.raises(ValueError, match=">= 1"):
        ranking_metrics(torch.zeros(1, 1), ks=(10,))


# --- properties over random inputs ------------------------------------------------------

KS = (1, 2, 3, 5, 10)


@st.composite
def scored_queries(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    b = draw(st.integers(1, 4))
    v = draw(st.integers(3, 9))
    t = draw(st.integers(1, 4))
    # Few distinct score levels so that ties are common; level 0 means excluded.
    levels = draw(st.lists(st.integers(0, 3), min_size=b * v, max_size=b * v))
    scores = torch.tensor(levels, dtype=torch.float32).view(b, v)  # [B, V]
    scores[scores == 0] = -INF
    ids = draw(st.lists(st.integers(0, v - 1), min_size=b * t, max_size=b * t))
    targets = torch.tensor(ids).view(b, t)  # [B, T]
    excluded = scores.gather(1, targets) == -INF
    targets[excluded] = 0  # a target must not be excluded; those slots become padding
    return scores, targets


@settings(max_examples=100, deadline=None)
@given(scored_queries())
def test_ranks_match_brute_force_and_metrics_are_bounded_and_monotone(
    query: tuple[torch.Tensor, torch.Tensor],
) -> None:
    scores, targets = query
    ranks = target_ranks(scores, targets)
    for b, t in itertools.product(range(targets.shape[0]), range(targets.shape[1])):
        item = int(targets[b, t])
        earlier = targets[b, :t].tolist()
        if item == 0 or item in earlier:
            assert ranks[b, t] == INF
        else:
            assert ranks[b, t] == sum(float(s) >= float(scores[b, item]) for s in scores[b])
    m = ranking_metrics(ranks, KS)
    has_target = torch.isfinite(ranks).any(dim=1)
    num_relevant = torch.isfinite(ranks).sum(dim=1)
    for value in m.values():
        assert torch.isnan(value).eq(~has_target).all()
        ok = value[has_target]
        assert ((ok >= 0) & (ok <= 1 + 1e-12)).all()
    for name in METRIC_NAMES:
        for small, large in itertools.pairwise(KS):
            grows = m[f"{name}@{large}"] >= m[f"{name}@{small}"] - 1e-12
            if name in ("ndcg", "map"):  # normalised by min(#relevant, k): see module docs
                grows = grows | (num_relevant > small)
            assert grows[has_target].all(), (name, small, large)
    assert (m["recall@1"] <= m["recall@10"])[has_target].all()


@settings(max_examples=60, deadline=None)
@given(scored_queries(), st.integers(0, 2**31 - 1))
def test_sampled_rank_lies_in_1_to_n_plus_1(
    query: tuple[torch.Tensor, torch.Tensor], seed: int
) -> None:
    scores, targets = query
    targets = targets[:, :1]
    candidates = (scores > -INF).sum(dim=1) - (targets[:, 0] > 0).long()
    n = int(candidates.min())
    if n < 1:
        return
    g = torch.Generator().manual_seed(seed)
    ranks = sampled_ranks(scores, targets, num_negatives=n, generator=g)
    real = targets[:, 0] > 0
    assert (ranks[~real] == INF).all()
    assert ((ranks[real] >= 1) & (ranks[real] <= n + 1)).all()
    full = target_ranks(scores, targets)
    assert (ranks[real] <= full[real]).all()  # sampling can only improve a rank


# --- sampled protocol -------------------------------------------------------------------


def test_sampled_target_beating_all_gets_rank_1() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 50, generator=g)
    scores[:, 0] = -INF
    scores[:, 7] = 2.0
    ranks = sampled_ranks(scores, torch.full((4, 1), 7), num_negatives=20, generator=g)
    assert ranks.tolist() == [[1.0]] * 4


def test_sampled_negatives_skip_excluded_items_and_the_target() -> None:
    scores = torch.full((3, 30), -INF)
    known = [4, 9, 17, 22, 28]
    scores[:, known] = 1.0
    scores[:, 12] = 0.5  # the target, below every known candidate
    targets = torch.full((3, 1), 12)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        ids = sample_negative_ids(scores, targets, num_negatives=5, generator=g)
        assert sorted(ids[0].tolist()) == known
        # Had an excluded item replaced a candidate, the rank would be below 6.
        g = torch.Generator().manual_seed(seed)
        assert sampled_ranks(scores, targets, 5, g).tolist() == [[6.0]] * 3
    scores[:, 12] = 2.0  # the target above all: drawing it as its own negative would give 2
    assert sampled_ranks(scores, targets, 5).tolist() == [[1.0]] * 3
    with pytest.raises(ValueError, match="only 5 non-excluded items"):
        sampled_ranks(scores, targets, num_negatives=6)


def test_sampled_negatives_are_uniform_distinct_and_reproducible() -> None:
    scores = torch.zeros(3000, 7)
    scores[:, 0] = -INF
    targets = torch.full((3000, 1), 3)
    ids = sample_negative_ids(scores, targets, 2, torch.Generator().manual_seed(1))
    again = sample_negative_ids(scores, targets, 2, torch.Generator().manual_seed(1))
    assert torch.equal(ids, again)
    assert (ids[:, 0] != ids[:, 1]).all()
    counts = torch.bincount(ids.flatten(), minlength=7) / 3000
    assert counts[0] == 0 and counts[3] == 0
    for item in (1, 2, 4, 5, 6):
        assert counts[item] == pytest.approx(2 / 5, abs=0.04)


def test_sampled_protocol_needs_one_target_per_query() -> None:
    with pytest.raises(ValueError, match=r"targets\[:, :1\]"):
        sampled_ranks(torch.zeros(1, 9), torch.tensor([[1, 2]]), num_negatives=3)


def test_sampled_metric_names_carry_the_label() -> None:
    assert sampled_metric_names({"hr@10": 1, "mrr@10": 2}, 100) == {
        "sampled100/hr@10": 1,
        "sampled100/mrr@10": 2,
    }


# --- accumulator ------------------------------------------------------------------------


def random_batch(b: int, v: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (b, v), generator=g).float()  # ties
    scores[:, 0] = -INF
    targets = torch.randint(1, v, (b, t), generator=g)
    targets[torch.rand(b, t, generator=g) < 0.3] = 0  # some padding, some empty queries
    return scores, targets


def test_accumulating_two_batches_equals_one_concatenated_batch() -> None:
    s1, t1 = random_batch(6, 12, 3, seed=1)
    s2, t2 = random_batch(5, 12, 3, seed=2)
    t2[0] = 0  # a query without any target
    split, joined = RankingAccumulator(ks=(1, 5)), RankingAccumulator(ks=(1, 5))
    split.update(s1, t1)
    split.update(s2, t2)
    joined.update(torch.cat([s1, s2]), torch.cat([t1, t2]))
    assert split.num_queries == joined.num_queries
    expected = joined.compute()
    assert split.compute() == pytest.approx(expected)
    # The mean over the non-empty queries, by hand from the per-query values.
    per_query = ranking_metrics(target_ranks(torch.cat([s1, s2]), torch.cat([t1, t2])), (1, 5))
    kept = ~torch.isnan(per_query["hr@1"])
    assert joined.num_queries == int(kept.sum()) <= 10  # empty queries were skipped
    assert expected["ndcg@5"] == pytest.approx(float(per_query["ndcg@5"][kept].mean()))


def test_state_round_trip_and_summed_states() -> None:
    s1, t1 = random_batch(6, 12, 1, seed=3)
    s2, t2 = random_batch(4, 12, 1, seed=4)
    a, b, both = (RankingAccumulator(ks=(2,), sampled_negatives=3) for _ in range(3))
    a.update(s1, t1, torch.Generator().manual_seed(5))
    b.update(s2, t2, torch.Generator().manual_seed(6))
    both.update(s1, t1, torch.Generator().manual_seed(5))
    both.update(s2, t2, torch.Generator().manual_seed(6))
    state = a.state()
    assert state.dtype == torch.float64 and state.shape == (len(a.keys) + 1,)
    copy = RankingAccumulator(ks=(2,), sampled_negatives=3)
    copy.load_state(state)
    assert copy.compute() == a.compute()
    reduced = RankingAccumulator(ks=(2,), sampled_negatives=3)
    reduced.load_state(a.state() + b.state())  # what all_reduce(SUM) does across ranks
    assert reduced.compute() == pytest.approx(both.compute())
    assert reduced.num_queries == both.num_queries
    state[0] += 1  # state() is a copy
    assert copy.compute() == a.compute()


def test_accumulator_keys_full_catalogue_first_then_labelled_sampled() -> None:
    acc = RankingAccumulator(ks=(10, 20), sampled_negatives=100)
    scores, targets = random_batch(3, 150, 1, seed=7)
    targets[:, 0] = 5
    acc.update(scores, targets)
    keys = list(acc.compute())
    assert keys[:10] == [f"{m}@{k}" for m in METRIC_NAMES for k in (10, 20)]
    assert keys[10:] == [f"sampled100/{m}@{k}" for m in METRIC_NAMES for k in (10, 20)]


def test_accumulator_errors_say_what_to_do() -> None:
    acc = RankingAccumulator(ks=(1,))
    acc.update(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int64))
    assert acc.num_queries == 0
    with pytest.raises(ValueError, match="no query with a target"):
        acc.compute()
    with pytest.raises(ValueError, match="other ks or sampled_negatives"):
        acc.load_state(RankingAccumulator(ks=(1, 2)).state())
    acc.update(torch.zeros(1, 4), torch.tensor([[2]]))
    acc.reset()
    assert acc.num_queries == 0


def test_config_is_strict() -> None:
    cfg = RankingMetricsConfig.from_dict({"ks": [5, 10], "sampled_negatives": 100})
    assert cfg.ks == (5, 10)
    assert RankingAccumulator.from_config(cfg).keys[0] == "ndcg@5"
    with pytest.raises(ConfigError, match="did you mean 'sampled_negatives'"):
        RankingMetricsConfig.from_dict({"sampled_negative": 100})
    with pytest.raises(ConfigError, match="positive"):
        RankingMetricsConfig(ks=(0,))
    with pytest.raises(ConfigError, match="sequence"):
        RankingMetricsConfig(ks=10)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sampled_negatives"):
        RankingAccumulator(sampled_negatives=0)


# --- CTR metrics ------------------------------------------------------------------------


def brute_force_auc(labels: list[int], scores: list[float]) -> float:
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (60,), generator=g)
    labels[:2] = torch.tensor([0, 1])
    scores = torch.randint(0, 6, (60,), generator=g).float() / 5  # many ties
    assert auc(labels, scores) == pytest.approx(
        brute_force_auc(labels.tolist(), scores.tolist()), abs=1e-12
    )


def test_auc_hand_values_and_one_class_error() -> None:
    assert auc(torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auc(torch.tensor([1, 0]), torch.tensor([0.3, 0.3])) == 0.5
    assert auc(torch.tensor([True, False]), torch.tensor([0.9, 0.3])) == 1.0
    with pytest.raises(ValueError, match="one class"):
        auc(torch.tensor([1, 1]), torch.tensor([0.2, 0.3]))
    with pytest.raises(ValueError, match="0 or 1"):
        auc(torch.tensor([2, 0]), torch.tensor([0.2, 0.3]))


def test_log_loss_hand_value_and_clipping() -> None:
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert log_loss(torch.tensor([1, 0]), torch.tensor([0.8, 0.4])) == pytest.approx(expected)
    assert log_loss(torch.tensor([0]), torch.tensor([1.0]), eps=1e-7) == pytest.approx(
        -math.log(1e-7)
    )
    with pytest.raises(ValueError, match="sigmoid"):
        log_loss(torch.tensor([1, 0]), torch.tensor([2.5, -1.0]))


# --- CPU / CUDA agreement ---------------------------------------------------------------


@gpu
@needs_cuda
def test_cpu_and_cuda_agree() -> None:
    scores, targets = random_batch(16, 300, 3, seed=8)
    cuda = torch.device("cuda")
    cpu_ranks = target_ranks(scores, targets)
    cuda_ranks = target_ranks(scores.to(cuda), targets.to(cuda))
    assert cuda_ranks.device.type == "cuda"
    assert torch.equal(cpu_ranks, cuda_ranks.cpu())
    cpu_m, cuda_m = ranking_metrics(cpu_ranks), ranking_metrics(cuda_ranks)
    for key, value in cpu_m.items():
        torch.testing.assert_close(value, cuda_m[key].cpu(), equal_nan=True)
    # Sampled: only the draw differs between devices; a fully known candidate set does not.
    s = torch.full((4, 40), -INF)
    s[:, [3, 8, 20]] = torch.tensor([0.9, 0.1, 0.5])
    t = torch.full((4, 1), 20)
    g = torch.Generator(device=cuda).manual_seed(0)
    assert sampled_ranks(s.to(cuda), t.to(cuda), 2, g).tolist() == [[2.0]] * 4
    acc_cpu, acc_cuda = RankingAccumulator(ks=(1, 10)), RankingAccumulator(ks=(1, 10))
    acc_cpu.update(scores, targets)
    acc_cuda.update(scores.to(cuda), targets.to(cuda))
    assert acc_cuda.state().device.type == "cuda"
    assert acc_cuda.compute() == pytest.approx(acc_cpu.compute())
    labels = torch.randint(0, 2, (500,), generator=torch.Generator().manual_seed(9))
    probs = torch.rand(500, generator=torch.Generator().manual_seed(10))
    assert auc(labels.to(cuda), probs.to(cuda)) == pytest.approx(auc(labels, probs))
    assert log_loss(labels.to(cuda), probs.to(cuda)) == pytest.approx(log_loss(labels, probs))
