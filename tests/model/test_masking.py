"""Tests of model/masking.py: one shared suite over every scheme, then scheme-specific checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model.config_base import ConfigError
from model.masking import (
    MASKINGS,
    VALID_BLOCKS,
    Masked,
    append_mask_slot,
    causal_perm_mask,
    check_combination,
    clm,
    mlm,
    mlm_last,
    plm,
    rtd_corrupt,
    sample_replacements,
    stochastic_shared_embeddings,
)

FIRST_ITEM = 5
CARDINALITY = 40


def random_batch(
    batch: int, length: int, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids with an empty row, a full row and random lengths in between."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    lengths[0], lengths[-1] = 0, length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ids = torch.randint(FIRST_ITEM, CARDINALITY, (batch, length), generator=g)
    ids = torch.where(mask, ids, 0)
    return ids.to(device), mask.to(device)


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


Scheme = Callable[[torch.Tensor, torch.Tensor, torch.Generator], Masked]

SCHEMES: dict[str, Scheme] = {
    "clm": lambda ids, mask, g: clm(ids, mask),
    "mlm": lambda ids, mask, g: mlm(ids, mask, 0.3, g),
    "mlm_last": lambda ids, mask, g: mlm_last(ids, mask),
    "plm": lambda ids, mask, g: plm(ids, mask, 0.3, 3, g),
}
RANDOM_SCHEMES = ("mlm", "plm")


# ---------------------------------------------------------------- shared suite


@pytest.mark.parametrize("name", SCHEMES)
def test_output_shapes_dtypes_and_device_follow_inputs(name: str) -> None:
    ids, mask = random_batch(6, 7, seed=1)
    m = SCHEMES[name](ids, mask, gen(0))
    assert m.targets.shape == ids.shape and m.targets.dtype == torch.int64
    assert m.hidden.shape == ids.shape and m.hidden.dtype == torch.bool
    assert m.targets.device == ids.device and m.hidden.device == ids.device
    assert m.causal is (name == "clm")
    if name == "plm":
        assert m.perm_mask is not None
        assert m.perm_mask.shape == (6, 7, 7) and m.perm_mask.dtype == torch.float32
    else:
        assert m.perm_mask is None


@pytest.mark.parametrize("name", SCHEMES)
def test_no_target_and_no_hidden_position_on_padding(name: str) -> None:
    for seed in range(5):
        ids, mask = random_batch(8, 6, seed=seed)
        m = SCHEMES[name](ids, mask, gen(seed))
        assert not (m.targets[~mask] != 0).any()
        assert not m.hidden[~mask].any()


@pytest.mark.parametrize("name", SCHEMES)
def test_targets_are_the_original_ids_exactly_at_hidden_positions(name: str) -> None:
    ids, mask = random_batch(10, 6, seed=3)
    m = SCHEMES[name](ids, mask, gen(1))
    if name == "clm":
        assert not m.hidden.any()
        return
    assert torch.equal(m.targets != 0, m.hidden)
    assert torch.equal(m.targets[m.hidden], ids[m.hidden])


@pytest.mark.parametrize("name", SCHEMES)
def test_inputs_are_not_mutated(name: str) -> None:
    ids, mask = random_batch(6, 5, seed=2)
    ids_before, mask_before = ids.clone(), mask.clone()
    SCHEMES[name](ids, mask, gen(0))
    assert torch.equal(ids, ids_before) and torch.equal(mask, mask_before)


@pytest.mark.parametrize("name", RANDOM_SCHEMES)
def test_same_seed_same_output_different_seed_different_output(name: str) -> None:
    ids, mask = random_batch(16, 12, seed=4)
    a = SCHEMES[name](ids, mask, gen(7))
    b = SCHEMES[name](ids, mask, gen(7))
    c = SCHEMES[name](ids, mask, gen(8))
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.targets, b.targets)
    if a.perm_mask is not None:
        assert b.perm_mask is not None and torch.equal(a.perm_mask, b.perm_mask)
    assert not torch.equal(a.hidden, c.hidden)


@pytest.mark.parametrize("name", SCHEMES)
def test_rejects_left_padded_or_mistyped_inputs(name: str) -> None:
    ids = torch.tensor([[0, 5, 6]])
    with pytest.raises(ValueError, match="right-padded"):
        SCHEMES[name](ids, ids > 0, gen(0))
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="int64"):
        SCHEMES[name](ids.int(), ids > 0, gen(0))
    with pytest.raises(ValueError, match="bool"):
        SCHEMES[name](ids, (ids > 0).long(), gen(0))


# ---------------------------------------------------------------- CLM / MLM


def test_clm_targets_are_the_next_items() -> None:
    ids = torch.tensor([[11, 12, 13, 14], [21, 22, 0, 0], [31, 0, 0, 0], [0, 0, 0, 0]])
    m = clm(ids, ids > 0)
    expected = torch.tensor([[12, 13, 14, 0], [22, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(m.targets, expected)


def test_mlm_hides_at_least_one_per_non_empty_row_and_none_in_empty_rows() -> None:
    ids, mask = random_batch(64, 4, seed=5)
    m = mlm(ids, mask, probability=0.0, generator=gen(0))  # only the forced position
    lengths = mask.sum(1)
    assert torch.equal(m.hidden.sum(1), (lengths > 0).long())
    m = mlm(ids, mask, probability=0.3, generator=gen(1))
    assert (m.hidden.sum(1)[lengths > 0] >= 1).all()
    assert not m.hidden[lengths == 0].any()


def test_mlm_forced_position_is_uniform_over_the_real_positions() -> None:
    ids = torch.full((3000, 4), 7)
    ids[:, 3] = 0  # three real events per row
    m = mlm(ids, ids > 0, probability=0.0, generator=gen(2))
    counts = m.hidden.sum(0).float() / 3000
    assert torch.allclose(counts[:3], torch.full((3,), 1 / 3), atol=0.04)
    assert counts[3] == 0


def test_mlm_hidden_rate_is_close_to_probability() -> None:
    ids, mask = random_batch(400, 50, seed=6)
    mask[:] = True
    ids = torch.where(mask, ids.clamp(min=FIRST_ITEM), 0)
    m = mlm(ids, mask, probability=0.2, generator=gen(3))
    assert abs(m.hidden.float().mean().item() - 0.2) < 0.01


def test_mlm_last_hides_only_the_last_real_item() -> None:
    ids = torch.tensor([[11, 12, 13], [21, 0, 0], [0, 0, 0], [31, 32, 0]])
    m = mlm_last(ids, ids > 0)
    assert torch.equal(m.targets, torch.tensor([[0, 0, 13], [21, 0, 0], [0, 0, 0], [0, 32, 0]]))
    assert torch.equal(m.hidden.sum(1), torch.tensor([1, 1, 0, 1]))


# ---------------------------------------------------------------- PLM


def can_see(m: Masked) -> torch.Tensor:
    assert m.perm_mask is not None
    values = set(m.perm_mask.unique().tolist())
    assert values <= {0.0, 1.0}
    return m.perm_mask == 0.0  # [B, L query, L key]


@pytest.mark.parametrize("seed", range(6))
def test_plm_perm_mask_is_a_factorisation_order_with_targets_last(seed: int) -> None:
    ids, mask = random_batch(12, 9, seed=10 + seed)
    m = plm(ids, mask, probability=0.3, max_span=3, generator=gen(seed))
    sees = can_see(m)
    target = m.hidden
    real_non_target = mask & ~target
    for b in range(ids.shape[0]):
        s, t, n, r = sees[b], target[b], real_non_target[b], mask[b]
        assert not s[:, ~r].any(), "somebody sees padding"
        assert not s[n][:, t].any(), "a non-target sees a target"
        assert not s.diagonal().any(), "a position sees itself"
        assert s[t][:, n].all(), "a target misses a non-target"
        # Among real positions "sees" is a strict total order: exactly one direction per pair ...
        sr = s[r][:, r]
        k = int(r.sum())
        assert torch.equal(sr | sr.T, ~torch.eye(k, dtype=torch.bool))
        assert not (sr & sr.T).any()
        # ... and transitive (hence acyclic).
        two_steps = (sr.float() @ sr.float()) > 0
        assert not (two_steps & ~sr).any()


def test_plm_targets_never_see_later_targets_and_are_in_random_order() -> None:
    ids, mask = random_batch(300, 10, seed=20)
    m = plm(ids, mask, probability=0.5, max_span=2, generator=gen(5))
    sees = can_see(m)
    later_sees_earlier = 0
    pairs = 0
    for b in range(ids.shape[0]):
        t = m.hidden[b].nonzero().flatten().tolist()
        for x, i in enumerate(t):
            for j in t[x + 1 :]:
                assert bool(sees[b, i, j]) != bool(sees[b, j, i])
                later_sees_earlier += int(sees[b, j, i])
                pairs += 1
    assert pairs > 500
    assert abs(later_sees_earlier / pairs - 0.5) < 0.06  # not simply left to right


def test_plm_target_rate_is_close_to_probability_and_spans_are_longer() -> None:
    mask = torch.ones(400, 50, dtype=torch.bool)
    ids = torch.full((400, 50), 9)

    def mean_run(hidden: torch.Tensor) -> float:
        starts = hidden & ~torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], 1)
        return hidden.sum().item() / starts.sum().item()

    spans = plm(ids, mask, probability=0.2, max_span=4, generator=gen(6)).hidden
    single = plm(ids, mask, probability=0.2, max_span=1, generator=gen(6)).hidden
    assert abs(spans.float().mean().item() - 0.2) < 0.015
    assert abs(single.float().mean().item() - 0.2) < 0.015
    assert mean_run(spans) > mean_run(single) + 0.5


def test_plm_every_non_empty_row_has_a_target() -> None:
    ids, mask = random_batch(64, 3, seed=21)
    m = plm(ids, mask, probability=0.0, generator=gen(0))
    assert torch.equal(m.hidden.sum(1), (mask.sum(1) > 0).long())


def test_plm_rejects_bad_arguments() -> None:
    ids, mask = random_batch(2, 3, seed=0)
    with pytest.raises(ValueError, match="max_span"):
        plm(ids, mask, max_span=0)
    with pytest.raises(ValueError, match="probability"):
        plm(ids, mask, probability=1.5)


def test_causal_perm_mask_hand_example() -> None:
    mask = torch.tensor([[True, True, True], [True, False, False]])
    expected = torch.tensor(
        [
            [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
            [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]],
        ]
    )
    out = causal_perm_mask(mask)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


# ---------------------------------------------------------------- RTD


def test_rtd_corrupt_hand_example_and_equal_replacement_is_not_replaced() -> None:
    ids = torch.tensor([[11, 12, 13], [21, 22, 0]])
    hidden = torch.tensor([[False, True, True], [True, False, False]])
    before = ids.clone(), hidden.clone()
    corrupted, replaced = rtd_corrupt(ids, hidden, torch.tensor([30, 13, 21]))
    assert torch.equal(corrupted, torch.tensor([[11, 30, 13], [21, 22, 0]]))
    assert torch.equal(replaced, torch.tensor([[False, True, False], [False, False, False]]))
    assert torch.equal(ids, before[0]) and torch.equal(hidden, before[1])


def test_rtd_corrupt_rejects_wrong_number_of_replacements() -> None:
    ids = torch.tensor([[11, 12]])
    with pytest.raises(ValueError, match="one replacement per hidden position"):
        rtd_corrupt(ids, torch.tensor([[True, True]]), torch.tensor([5]))


def test_sample_replacements_picks_the_argmax_of_peaked_logits() -> None:
    logits = torch.full((5, 8), -30.0)
    best = torch.tensor([3, 0, 7, 7, 1])
    logits[torch.arange(5), best] = 30.0
    logits.requires_grad_(True)
    out = sample_replacements(logits, gen(0))
    assert out.dtype == torch.int64 and not out.requires_grad
    assert torch.equal(out, best)
    assert torch.equal(sample_replacements(logits.detach().bfloat16(), gen(0)), best)


def test_sample_replacements_follows_the_softmax_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(20000, 3)
    out = sample_replacements(logits, gen(1))
    freq = torch.bincount(out, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)
    assert torch.equal(sample_replacements(logits, gen(4)), sample_replacements(logits, gen(4)))


def test_sample_replacements_of_no_rows_is_empty() -> None:
    assert sample_replacements(torch.zeros(0, 4)).shape == (0,)


# ---------------------------------------------------------------- inference slot


def test_append_mask_slot_hand_examples_with_full_and_empty_rows() -> None:
    ids = torch.tensor([[11, 12, 0, 0], [21, 22, 23, 24], [0, 0, 0, 0], [31, 32, 33, 0]])
    mask = ids > 0
    price = torch.tensor(
        [[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 5.0, 6.0], [0.0] * 4, [7.0, 8.0, 9.0, 0.0]]
    )
    embedding = torch.arange(32, dtype=torch.float32).view(4, 4, 2) * mask[..., None]
    features = {"item": ids, "price": price, "emb": embedding}
    before = {k: v.clone() for k, v in features.items()}

    out, new_mask, hidden, position = append_mask_slot(features, mask)

    assert torch.equal(
        out["item"], torch.tensor([[11, 12, 0, 0], [22, 23, 24, 0], [0] * 4, [31, 32, 33, 0]])
    )
    assert torch.equal(
        out["price"],
        torch.tensor([[1.0, 2.0, 0, 0], [4.0, 5.0, 6.0, 0], [0.0] * 4, [7.0, 8.0, 9.0, 0]]),
    )
    assert torch.equal(out["emb"][1, :3], embedding[1, 1:])  # full row shifted like the others
    assert torch.equal(out["emb"][0], embedding[0]) and not out["emb"][1, 3].any()
    assert torch.equal(position, torch.tensor([2, 3, 0, 3]))
    assert torch.equal(new_mask.sum(1), torch.tensor([3, 4, 1, 4]))
    assert torch.equal(hidden, torch.nn.functional.one_hot(position, 4).bool())
    assert torch.equal(new_mask[:, 1:] & ~new_mask[:, :-1], torch.zeros(4, 3, dtype=torch.bool))
    for k, v in features.items():
        assert torch.equal(v, before[k])


def test_append_mask_slot_keeps_dtypes_and_rejects_mismatched_features() -> None:
    ids, mask = random_batch(5, 4, seed=30)
    flags = mask.clone()
    out, *_ = append_mask_slot({"item": ids, "flag": flags}, mask)
    assert out["item"].dtype == torch.int64 and out["flag"].dtype == torch.bool
    with pytest.raises(ValueError, match="feature 'bad'"):
        append_mask_slot({"bad": ids[:, :3]}, mask)


# ---------------------------------------------------------------- combinations


def test_check_combination_accepts_every_valid_pair() -> None:
    assert set(VALID_BLOCKS) == set(MASKINGS)
    for masking, blocks in VALID_BLOCKS.items():
        for block in blocks:
            check_combination(masking, block)


def test_check_combination_names_the_valid_blocks() -> None:
    with pytest.raises(ConfigError, match="valid blocks for 'plm': xlnet") as e:
        check_combination("plm", "gpt2")
    assert "works with masking clm" in str(e.value)
    with pytest.raises(ConfigError, match="gpt2, xlnet, sasrec, gru, lstm"):
        check_combination("clm", "bert")
    with pytest.raises(ConfigError, match="choose one of: clm, mlm, plm, rtd"):
        check_combination("mask", "bert")
    with pytest.raises(ConfigError, match="'tcn' works with no masking") as e:
        check_combination("mlm", "tcn")
    assert "bert" in str(e.value)


# ---------------------------------------------------------------- SSE


def test_sse_replaces_real_ids_at_the_given_rate_within_range() -> None:
    ids, mask = random_batch(300, 40, seed=40)
    out = stochastic_shared_embeddings(ids, mask, 0.1, 100, 200, generator=gen(0))
    replaced = out != ids
    assert not replaced[~mask].any() and not (out[~mask] != 0).any()
    assert ((out[replaced] >= 100) & (out[replaced] < 200)).all()
    rate = replaced.sum().item() / mask.sum().item()
    assert abs(rate - 0.1) < 0.01


def test_sse_with_probability_zero_is_an_identical_copy() -> None:
    ids, mask = random_batch(10, 6, seed=41)
    out = stochastic_shared_embeddings(ids, mask, 0.0, FIRST_ITEM, CARDINALITY, generator=gen(0))
    assert torch.equal(out, ids) and out.data_ptr() != ids.data_ptr()


def test_sse_is_reproducible_and_rejects_an_empty_range() -> None:
    ids, mask = random_batch(10, 6, seed=42)
    a = stochastic_shared_embeddings(ids, mask, 0.5, FIRST_ITEM, CARDINALITY, gen(3))
    b = stochastic_shared_embeddings(ids, mask, 0.5, FIRST_ITEM, CARDINALITY, gen(3))
    c = stochastic_shared_embeddings(ids, mask, 0.5, FIRST_ITEM, CARDINALITY, gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="low < high"):
        stochastic_shared_embeddings(ids, mask, 0.5, 10, 10)


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_where_nothing_is_random() -> None:
    ids, mask = random_batch(9, 7, seed=50)
    gi, gm = ids.cuda(), mask.cuda()
    for fn in (clm, mlm_last):
        cpu, gpu = fn(ids, mask), fn(gi, gm)
        assert torch.equal(cpu.targets, gpu.targets.cpu())
        assert torch.equal(cpu.hidden, gpu.hidden.cpu())
    assert torch.equal(causal_perm_mask(mask), causal_perm_mask(gm).cpu())
    hidden = mlm_last(ids, mask).hidden
    repl = torch.arange(int(hidden.sum())) + 100
    for cpu_t, gpu_t in zip(
        rtd_corrupt(ids, hidden, repl), rtd_corrupt(gi, hidden.cuda(), repl.cuda()), strict=True
    ):
        assert torch.equal(cpu_t, gpu_t.cpu())
    cpu_out = append_mask_slot({"item": ids}, mask)
    gpu_out = append_mask_slot({"item": gi}, gm)
    assert torch.equal(cpu_out[0]["item"], gpu_out[0]["item"].cpu())
    for a, b in zip(cpu_out[1:], gpu_out[1:], strict=True):
        assert torch.equal(a, b.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_schemes_run_on_cuda_with_a_cuda_generator() -> None:
    ids, mask = random_batch(9, 7, seed=51, device="cuda")
    for name in RANDOM_SCHEMES:
        a = SCHEMES[name](ids, mask, gen(0, "cuda"))
        b = SCHEMES[name](ids, mask, gen(0, "cuda"))
        assert a.targets.is_cuda and torch.equal(a.hidden, b.hidden)
        assert not a.hidden[~mask].any()
        assert (a.hidden.sum(1)[mask.sum(1) > 0] >= 1).all()
    out = stochastic_shared_embeddings(ids, mask, 0.5, 5, 40, gen(0, "cuda"))
    assert out.is_cuda and not (out[~mask] != 0).any()
    draws = sample_replacements(torch.randn(4, 6, device="cuda"), gen(0, "cuda"))
    assert draws.is_cuda and draws.shape == (4,)
