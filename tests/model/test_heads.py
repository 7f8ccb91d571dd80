"""Prediction heads: hand-computed losses, weight tying, sampling, configs, a training sanity run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from model.config_base import ConfigError
from model.heads import (
    NextItemConfig,
    NextItemHead,
    SequenceTaskConfig,
    SequenceTaskHead,
    combine_losses,
    sample_proposal,
    uniform_negatives_excluding,
)

# A 5-id catalogue: 0 padding, 1 missing (first_item_id = 2), real items 2, 3, 4.
# The special rows hold large values so that any leak into a loss would show.
TINY_W = [[9.0, 9.0], [-9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
TINY_H = [[1.0, 2.0], [0.5, -1.0]]


def tied_head(
    weight: list[list[float]], first: int, config: NextItemConfig, d_model: int | None = None,
    item_counts: torch.Tensor | None = None,
) -> tuple[NextItemHead, nn.Embedding]:
    w = torch.tensor(weight)
    emb = nn.Embedding(w.shape[0], w.shape[1])
    with torch.no_grad():
        emb.weight.copy_(w)
    head = NextItemHead(
        d_model or w.shape[1], w.shape[0], first, config, item_embedding=emb,
        item_counts=item_counts,
    )
    return head, emb


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def cross_entropy_by_hand(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], written out; -inf logits contribute exp(-inf) = 0."""
    denom = sum(math.exp(z) for z in logits if z != -math.inf)
    return -(logits[target] - math.log(denom))


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


# --- item scores, tying, projection, temperature ------------------------------------------------


@pytest.mark.parametrize(
    "config, emb_dim",
    [
        (NextItemConfig(), 8),
        (NextItemConfig(), 4),  # projection
        (NextItemConfig(weight_tying=False, bias=True), None),
    ],
)
def test_item_scores_shape_and_minus_inf_exactly_on_special_ids(
    config: NextItemConfig, emb_dim: int | None
) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(12, emb_dim) if emb_dim else None
    head = NextItemHead(8, 12, 4, config, item_embedding=emb)
    scores = head.item_scores(torch.randn(5, 8))
    assert scores.shape == (5, 12)
    assert torch.isneginf(scores[:, :4]).all()
    assert torch.isfinite(scores[:, 4:]).all()
    assert (scores.topk(3, dim=1).indices >= 4).all()


def test_weight_tying_shares_the_table_and_a_step_changes_it() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6)
    head = NextItemHead(6, 10, 2, NextItemConfig(), item_embedding=emb)
    assert head.item_embedding is emb
    big = [p for p in head.parameters() if p.ndim == 2 and p.shape[0] == 10]
    assert len(big) == 1 and big[0] is emb.weight
    model = nn.ModuleDict({"input": emb, "head": head})
    assert sum(p.numel() for p in model.parameters()) == 10 * 6  # not counted twice

    before = emb.weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    head.loss(torch.randn(4, 6), torch.tensor([2, 5, 9, 3])).backward()
    opt.step()
    changed = (emb.weight.detach() != before).any(dim=1)
    assert changed[[2, 3, 5, 9]].all()
    assert not changed[:2].any()  # special rows get no gradient from the full loss


def test_untied_head_owns_its_matrix() -> None:
    head = NextItemHead(6, 10, 2, NextItemConfig(weight_tying=False))
    assert head.output_weight is not None and head.output_weight.shape == (10, 6)
    assert head.item_embedding is None


def test_projection_used_when_embedding_dim_differs() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3)
    head = NextItemHead(5, 7, 2, NextItemConfig(temperature=2.0), item_embedding=emb)
    assert isinstance(head.proj, nn.Linear)
    assert (head.proj.in_features, head.proj.out_features) == (5, 3)
    h = torch.randn(4, 5)
    expected = (head.proj(h) @ emb.weight[2:].T) / 2.0
    torch.testing.assert_close(head.item_scores(h)[:, 2:], expected)
    same_dim = NextItemHead(3, 7, 2, NextItemConfig(), item_embedding=emb)
    assert same_dim.proj is None


def test_temperature_divides_logits_by_hand() -> None:
    head, _ = tied_head(TINY_W, 2, NextItemConfig(temperature=2.0))
    scores = head.item_scores(torch.tensor(TINY_H))
    # h0 = [1, 2]: items [1,0], [0,1], [1,1] -> 1, 2, 3, halved.
    torch.testing.assert_close(scores[0, 2:], torch.tensor([0.5, 1.0, 1.5]))
    torch.testing.assert_close(scores[1, 2:], torch.tensor([0.25, -0.5, -0.25]))


def test_bias_is_added_before_temperature() -> None:
    head, _ = tied_head(TINY_W, 2, NextItemConfig(temperature=2.0, bias=True))
    with torch.no_grad():
        head.output_bias.copy_(torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0]))
    scores = head.item_scores(torch.tensor(TINY_H[:1]))
    torch.testing.assert_close(scores[0, 2:], torch.tensor([1.0, 0.5, 1.5]))


# --- full softmax ----------------------------------------------------------------------------


def test_full_loss_equals_hand_cross_entropy() -> None:
    head, _ = tied_head(TINY_W, 2, NextItemConfig())
    loss = head.loss(torch.tensor(TINY_H), torch.tensor([4, 2]))
    row0 = -(3 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))  # logits [1, 2, 3], item 4
    row1 = -(0.5 - math.log(math.exp(0.5) + math.exp(-1) + math.exp(-0.5)))  # item 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_label_smoothing_equals_hand_formula() -> None:
    eps = 0.2
    head, _ = tied_head(TINY_W, 2, NextItemConfig(label_smoothing=eps))
    loss = head.loss(torch.tensor(TINY_H), torch.tensor([4, 2]))
    expected = 0.0
    for logits, t in (([1.0, 2.0, 3.0], 2), ([0.5, -1.0, -0.5], 0)):
        nll = [cross_entropy_by_hand(logits, j) for j in range(3)]  # -log p_j over real items
        expected += (1 - eps) * nll[t] + eps * sum(nll) / 3
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_full_loss_ignores_special_id_rows(eps: float) -> None:
    head, emb = tied_head(TINY_W, 2, NextItemConfig(label_smoothing=eps))
    h, t = torch.tensor(TINY_H), torch.tensor([4, 3])
    before = head.loss(h, t).item()
    with torch.no_grad():
        emb.weight[:2] = torch.tensor([[100.0, -50.0], [3.0, 70.0]])
    assert head.loss(h, t).item() == before


@pytest.mark.parametrize("loss", ["full", "sampled", "bce"])
@pytest.mark.parametrize("bad", [[2, 1], [0, 3], [2, 5]])
def test_targets_outside_real_items_raise(loss: str, bad: list[int]) -> None:
    head, _ = tied_head(TINY_W, 2, NextItemConfig(loss=loss, num_negatives=2))
    with pytest.raises(ValueError, match="real item ids"):
        head.loss(torch.tensor(TINY_H), torch.tensor(bad))


def test_empty_batch_gives_zero_loss_with_graph() -> None:
    head, _ = tied_head(TINY_W, 2, NextItemConfig())
    h = torch.zeros(0, 2, requires_grad=True)
    loss = head.loss(h, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and not math.copysign(1.0, loss.item()) < 0


# --- sampled softmax ---------------------------------------------------------------------------


def sampled_loss_by_hand(
    weight: list[list[float]], hidden: list[list[float]], targets: list[int],
    negatives: list[int], log_q: dict[int, float], temperature: float, mask_hits: bool = True,
) -> tuple[float, int]:
    total, hits = 0.0, 0
    for h, t in zip(hidden, targets, strict=True):
        logits = [dot(h, weight[t]) / temperature - log_q[t]]
        for n in negatives:
            if n == t and mask_hits:
                hits += 1
                logits.append(-math.inf)
            else:
                logits.append(dot(h, weight[n]) / temperature - log_q[n])
        total += cross_entropy_by_hand(logits, 0)
    return total / len(targets), hits


def test_sampled_loss_uniform_equals_hand_value_with_hits_masked() -> None:
    config = NextItemConfig(loss="sampled", num_negatives=5, temperature=0.5)
    head, _ = tied_head(TINY_W, 2, config)
    h, t = torch.tensor(TINY_H), torch.tensor([4, 2])
    loss = head.loss(h, t, generator=torch.Generator().manual_seed(3))
    negatives = sample_proposal(5, 2, 5, generator=torch.Generator().manual_seed(3)).tolist()
    log_q = {i: math.log(1 / 3) for i in (2, 3, 4)}
    expected, hits = sampled_loss_by_hand(TINY_W, TINY_H, [4, 2], negatives, log_q, 0.5)
    assert hits > 0  # the seed draws accidental hits, so masking is exercised
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    unmasked, _ = sampled_loss_by_hand(TINY_W, TINY_H, [4, 2], negatives, log_q, 0.5, False)
    assert abs(unmasked - expected) > 1e-3  # the masking matters for this draw
    logits = head.sampled_logits(h, t, torch.tensor(negatives))
    assert logits.shape == (2, 6)
    raw = torch.tensor(TINY_H) @ torch.tensor(TINY_W).T  # [N, num_items]
    torch.testing.assert_close(logits[:, 0], raw[[0, 1], [4, 2]] / 0.5 + math.log(3))
    assert (torch.isneginf(logits[:, 1:]) == (torch.tensor(negatives)[None, :] == t[:, None])).all()


def test_sampled_loss_popularity_subtracts_log_q_by_hand() -> None:
    counts = torch.tensor([0.0, 0.0, 1.0, 2.0, 5.0])
    config = NextItemConfig(loss="sampled", num_negatives=6, sampler="popularity")
    head, _ = tied_head(TINY_W, 2, config, item_counts=counts)
    h, t = torch.tensor(TINY_H), torch.tensor([3, 4])
    loss = head.loss(h, t, generator=torch.Generator().manual_seed(1))
    negatives = head.draw_shared_negatives(generator=torch.Generator().manual_seed(1)).tolist()
    log_q = {2: math.log(1 / 8), 3: math.log(2 / 8), 4: math.log(5 / 8)}
    expected, _ = sampled_loss_by_hand(TINY_W, TINY_H, [3, 4], negatives, log_q, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Correction really applied: it shifts each candidate logit by -log Q(item).
    raw = torch.tensor(TINY_H) @ torch.tensor(TINY_W).T  # [N, num_items]
    logits = head.sampled_logits(h, t, torch.tensor(negatives))
    torch.testing.assert_close(logits[:, 0], raw[[0, 1], [3, 4]] - torch.tensor([log_q[3], log_q[4]]))


def test_popularity_sampler_prefers_frequent_items_and_never_draws_special_ids() -> None:
    counts = torch.tensor([1000.0, 1000.0, 1000.0, 0.0, 10.0, 100.0, 1000.0])
    ids = sample_proposal(
        20_000, 3, 7, probs=NextItemHead(
            2, 7, 3, NextItemConfig(loss="sampled", sampler="popularity", weight_tying=False),
            item_counts=counts,
        ).sampler_probs, generator=torch.Generator().manual_seed(0),
    )
    assert int(ids.min()) >= 3 and int(ids.max()) <= 6
    freq = torch.bincount(ids, minlength=7)[3:].tolist()
    assert freq[0] < freq[1] < freq[2] < freq[3]
    assert freq[0] > 0  # zero-count items are still drawable (count treated as 1)
    assert freq[3] / 20_000 == pytest.approx(1000 / 1111, abs=0.02)


class RecordShapes(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_sampled_loss_never_materialises_n_by_catalogue(sampler: str) -> None:
    n, num_items, first = 4, 5_000, 3
    torch.manual_seed(0)
    emb = nn.Embedding(num_items, 4)
    counts = torch.rand(num_items)
    config = NextItemConfig(loss="sampled", num_negatives=16, sampler=sampler)
    head = NextItemHead(4, num_items, first, config, item_embedding=emb, item_counts=counts)
    h, t = torch.randn(n, 4), torch.randint(first, num_items, (n,))
    with RecordShapes() as rec:
        head.loss(h, t, generator=torch.Generator().manual_seed(0))
    assert rec.shapes and max(math.prod(s) for s in rec.shapes) < n * (num_items - first) // 10
    # The recorder does see a dense [N, R] when one is built (the full loss builds it).
    with RecordShapes() as rec_full:
        NextItemHead(4, num_items, first, NextItemConfig(), item_embedding=emb).loss(h, t)
    assert (n, num_items - first) in rec_full.shapes


# --- BCE (SASRec) --------------------------------------------------------------------------------


def test_bce_loss_equals_hand_value() -> None:
    config = NextItemConfig(loss="bce", num_negatives=2, temperature=0.5, bias=True)
    head, _ = tied_head(TINY_W, 2, config)
    bias = [0.0, 0.0, 0.2, -0.3, 0.1]
    with torch.no_grad():
        head.output_bias.copy_(torch.tensor(bias))
    h, t = torch.tensor(TINY_H), torch.tensor([4, 2])
    loss = head.loss(h, t, generator=torch.Generator().manual_seed(5))
    negatives = uniform_negatives_excluding(t, 2, 5, 2, torch.Generator().manual_seed(5)).tolist()

    def s(row: int, item: int) -> float:
        return (dot(TINY_H[row], TINY_W[item]) + bias[item]) / 0.5

    expected = 0.0
    for row, target in enumerate([4, 2]):
        neg_terms = [-log_sigmoid(-s(row, j)) for j in negatives[row]]
        expected += -log_sigmoid(s(row, target)) + sum(neg_terms) / len(neg_terms)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)


def test_bce_negatives_are_real_items_other_than_the_positive() -> None:
    t = torch.tensor([3, 4, 5, 9, 9, 3])
    neg = uniform_negatives_excluding(t, 3, 10, 2_000, torch.Generator().manual_seed(0))
    assert neg.shape == (6, 2_000)
    assert (neg != t[:, None]).all()
    assert int(neg.min()) >= 3 and int(neg.max()) <= 9
    # Uniform over the 6 other real items: each appears about 1/6 of the time.
    counts = torch.stack([torch.bincount(r, minlength=10)[3:] for r in neg]).float()
    others = counts[counts > 0].reshape(6, 6) / 2_000
    assert (others - 1 / 6).abs().max() < 0.04


# --- sequence tasks and multi-task -----------------------------------------------------------


def fixed_task_head(kind: str) -> SequenceTaskHead:
    head = SequenceTaskHead(2, SequenceTaskConfig(kind=kind, target="y"))
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
        head.mlp[0].bias.fill_(0.5)
    return head


POOLED = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])  # outputs 1.5, -1.5, 0.5


def test_binary_task_loss_equals_hand_bce() -> None:
    loss = fixed_task_head("binary").loss(POOLED, torch.tensor([1.0, 0.0, 0.0]))
    expected = -(log_sigmoid(1.5) + log_sigmoid(1.5) + log_sigmoid(-0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_regression_task_loss_equals_hand_mse() -> None:
    loss = fixed_task_head("regression").loss(POOLED, torch.tensor([1.0, 0.0, 2.5]))
    assert loss.item() == pytest.approx((0.25 + 2.25 + 4.0) / 3, rel=1e-6)


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_task_loss_ignores_nan_targets(kind: str) -> None:
    head = fixed_task_head(kind)
    with_nan = head.loss(POOLED, torch.tensor([1.0, float("nan"), 0.0]))
    subset = head.loss(POOLED[[0, 2]], torch.tensor([1.0, 0.0]))
    assert with_nan.item() == pytest.approx(subset.item(), rel=1e-6)
    all_nan = head.loss(POOLED, torch.full((3,), float("nan")))
    all_nan.backward()
    assert all_nan.item() == 0.0
    assert head.mlp[0].weight.grad is not None and (head.mlp[0].weight.grad == 0).all()


def test_task_predict_and_mlp_shape() -> None:
    torch.manual_seed(0)
    head = SequenceTaskHead(4, SequenceTaskConfig(kind="binary", target="y", hidden=(8, 3)))
    x = torch.randn(6, 4) * 50
    p = head.predict(x)
    assert p.shape == (6,) and ((p >= 0) & (p <= 1)).all()
    torch.testing.assert_close(p, torch.sigmoid(head(x)))
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [8, 3, 1]
    reg = fixed_task_head("regression")
    torch.testing.assert_close(reg.predict(POOLED), torch.tensor([1.5, -1.5, 0.5]))


def test_binary_target_outside_unit_interval_raises() -> None:
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fixed_task_head("binary").loss(POOLED, torch.tensor([1.0, 2.0, 0.0]))


def test_combine_losses_weighted_sum_and_mismatch() -> None:
    total = combine_losses(
        {"next": torch.tensor(2.0), "buy": torch.tensor(4.0)}, {"next": 1.0, "buy": 0.25}
    )
    assert total.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="'buy'"):
        combine_losses({"next": torch.tensor(2.0), "buy": torch.tensor(1.0)}, {"next": 1.0})
    with pytest.raises(ValueError, match="'ctr'"):
        combine_losses({"next": torch.tensor(2.0)}, {"next": 1.0, "ctr": 0.5})


# --- configs and construction errors ---------------------------------------------------------


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        NextItemConfig.from_dict({"temprature": 2.0})
    with pytest.raises(ConfigError, match="label_smoothing"):
        NextItemConfig.from_dict({"loss": "bce", "label_smoothing": 0.1})
    for bad_t in (0.0, -1.0):
        with pytest.raises(ConfigError, match="temperature"):
            NextItemConfig.from_dict({"temperature": bad_t})
    with pytest.raises(ConfigError, match="label_smoothing"):
        NextItemConfig(label_smoothing=1.0)
    with pytest.raises(ConfigError, match="sampler"):
        NextItemConfig(loss="full", sampler="popularity")
    with pytest.raises(ConfigError, match="loss"):
        NextItemConfig(loss="softmax")
    with pytest.raises(ConfigError, match="num_negatives"):
        NextItemConfig(loss="bce", num_negatives=0)
    with pytest.raises(ConfigError, match="did you mean 'target'"):
        SequenceTaskConfig.from_dict({"kind": "binary", "targte": "y"})
    with pytest.raises(ConfigError, match="kind"):
        SequenceTaskConfig(kind="multiclass", target="y")
    with pytest.raises(ConfigError, match="weight"):
        SequenceTaskConfig(kind="binary", target="y", weight=-1.0)
    cfg = SequenceTaskConfig.from_dict({"kind": "regression", "target": "y", "hidden": [4, 2]})
    assert cfg.hidden == (4, 2)


def test_construction_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="pass item_embedding"):
        NextItemHead(4, 10, 2, NextItemConfig())
    with pytest.raises(ValueError, match="item_counts"):
        NextItemHead(4, 10, 2, NextItemConfig(loss="sampled", sampler="popularity"),
                     item_embedding=nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="rows"):
        NextItemHead(4, 10, 2, NextItemConfig(), item_embedding=nn.Embedding(11, 4))
    with pytest.raises(ValueError, match="weight_tying=False"):
        NextItemHead(4, 10, 2, NextItemConfig(weight_tying=False), item_embedding=nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="real item"):
        NextItemHead(4, 3, 3, NextItemConfig(weight_tying=False))


# --- training sanity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        NextItemConfig(loss="full"),
        NextItemConfig(loss="sampled", num_negatives=8),
        NextItemConfig(loss="bce", num_negatives=1),
    ],
    ids=["full", "sampled", "bce"],
)
def test_head_learns_to_rank_the_right_item_first(config: NextItemConfig) -> None:
    torch.manual_seed(0)
    num_items, first, d = 30, 3, 8
    centers = torch.randn(2, d)
    hidden = (centers[:, None, :] + 0.1 * torch.randn(2, 16, d)).reshape(32, d)  # [2*16, D]
    targets = torch.tensor([7] * 16 + [21] * 16)
    emb = nn.Embedding(num_items, d)
    head = NextItemHead(d, num_items, first, config, item_embedding=emb)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        opt.zero_grad()
        head.loss(hidden, targets, generator=g).backward()
        opt.step()
    with torch.no_grad():
        top1 = head.item_scores(hidden).argmax(dim=1)
    assert (top1 == targets).all()


# --- CPU / CUDA agreement ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("loss", ["full", "sampled", "bce"])
def test_cpu_and_cuda_agree(loss: str) -> None:
    torch.manual_seed(0)
    num_items, first, d = 50, 3, 8
    config = NextItemConfig(loss=loss, num_negatives=4, bias=True, temperature=0.7)
    cpu = NextItemHead(d, num_items, first, config, item_embedding=nn.Embedding(num_items, 6))
    with torch.no_grad():
        cpu.output_bias.normal_()
    gpu = copy.deepcopy(cpu).cuda()
    h, t = torch.randn(10, d), torch.randint(first, num_items, (10,))
    scores = gpu.item_scores(h.cuda()).cpu()
    torch.testing.assert_close(scores, cpu.item_scores(h), rtol=1e-4, atol=1e-5)
    if loss == "full":
        pairs = [(cpu.full_loss(h, t), gpu.full_loss(h.cuda(), t.cuda()))]
    elif loss == "sampled":
        neg = cpu.draw_shared_negatives(generator=torch.Generator().manual_seed(0))
        pairs = [(cpu.sampled_softmax_loss(h, t, neg),
                  gpu.sampled_softmax_loss(h.cuda(), t.cuda(), neg.cuda()))]
    else:
        neg = uniform_negatives_excluding(t, first, num_items, 4, torch.Generator().manual_seed(0))
        pairs = [(cpu.bce_loss(h, t, neg), gpu.bce_loss(h.cuda(), t.cuda(), neg.cuda()))]
    for a, b in pairs:
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
    g = torch.Generator(device="cuda").manual_seed(0)
    value = gpu.loss(h.cuda(), t.cuda(), generator=g)
    assert value.device.type == "cuda" and torch.isfinite(value)
