"""Vocabulary growth (``model/growth.py``): old ids keep their rows and scores, new ids are sane."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from features.schema import Feature, Kind, Schema, Tag
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config_base import ConfigError
from model.growth import GrowthConfig, grow_bias, grow_model, grow_rows, vocabulary_growth
from model.model import ModelConfig, SessionModel

L, D = 6, 16
OLD = {"item_id": 10, "category": 5}
NEW = {"item_id": 25, "category": 300}  # category's cardinality-derived width changes: 3 -> 9

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors: intra-op threads only add overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def schema(cards: dict[str, int]) -> Schema:
    cat = Kind.CATEGORICAL
    return Schema([
        Feature("item_id", cat, tags={Tag.ITEM_ID}, transform={"op": "categorify"},
                cardinality=cards["item_id"]),
        Feature("category", cat, transform={"op": "categorify"}, cardinality=cards["category"]),
        Feature("price", Kind.CONTINUOUS, transform={"op": "normalize"}),
    ])


CONFIGS = {
    "gru-tied-full": {"block": {"name": "gru", "d_model": D, "n_layers": 1, "max_len": L}},
    "sasrec-untied-bias-sampled": {
        "block": {"name": "sasrec", "d_model": D, "n_heads": 2, "n_layers": 1, "max_len": L},
        "next_item": {"weight_tying": False, "bias": True, "loss": "sampled",
                      "num_negatives": 4, "sampler": "popularity"}},
    "bert-sum-mlm": {"block": {"name": "bert", "d_model": D, "n_heads": 2, "n_layers": 1,
                               "max_len": L},
                     "inputs": {"aggregation": "elementwise-sum"}, "masking": "mlm",
                     "next_item": {"bias": True}},
}


def trained_like(config: dict[str, Any], seed: int = 0) -> SessionModel:
    """A model with random (non-zero everywhere) weights, in eval mode."""
    torch.manual_seed(seed)
    counts = torch.arange(OLD["item_id"], dtype=torch.float32)
    model = SessionModel(schema(OLD), ModelConfig.from_dict(config), item_counts=counts)
    with torch.no_grad():
        if model.next_item.output_bias is not None:
            model.next_item.output_bias.normal_()
    return model.eval()


def batch(seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded sessions over OLD ids only (real items, some missing/OOV ids too)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, OLD["item_id"], (5, L), generator=g)
    cats = torch.randint(1, OLD["category"], (5, L), generator=g)
    lengths = torch.tensor([6, 1, 3, 4, 2])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    price = torch.randn(5, L, generator=g) * mask
    return {"item_id": ids * mask, "category": cats * mask, "price": price}, mask


def grown(model: SessionModel, noise: float = 0.1, seed: int = 0) -> SessionModel:
    counts = torch.arange(NEW["item_id"], dtype=torch.float32)
    return grow_model(model, schema(NEW), GrowthConfig(noise=noise), item_counts=counts,
                      generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_old_ids_keep_rows_representations_and_scores(name: str) -> None:
    old = trained_like(CONFIGS[name])
    new = grown(old)
    for feature, table in old.inputs.embeddings.items():
        rows = table.weight.shape[0]
        assert new.inputs.embeddings[feature].weight.shape[0] == NEW[feature]
        assert torch.equal(new.inputs.embeddings[feature].weight[:rows], table.weight)
    features, mask = batch()
    with torch.no_grad():
        assert torch.equal(old.session_representation(features, mask),
                           new.session_representation(features, mask))  # bit for bit
        before, after = old.score(features, mask), new.score(features, mask)
    v0 = OLD["item_id"]
    assert after.shape == (5, NEW["item_id"])
    assert torch.equal(torch.isinf(after[:, :v0]), torch.isinf(before))  # same special ids
    # Only the final [B, D] x [D, V] product may round differently (BLAS picks its
    # reduction order by V); 1e-6 is a few float32 ulps at these magnitudes.
    torch.testing.assert_close(after[:, :v0], before, rtol=1e-6, atol=1e-6)
    assert bool(after[:, v0:].isfinite().all())


def test_tied_head_follows_the_grown_input_table() -> None:
    new = grown(trained_like(CONFIGS["gru-tied-full"]))
    assert new.next_item.item_embedding is new.inputs.item_embedding
    assert new.next_item.num_items == NEW["item_id"]


def test_untied_head_and_bias_grow_by_the_same_rules() -> None:
    old = trained_like(CONFIGS["sasrec-untied-bias-sampled"])
    new = grown(old, noise=0.0)
    v0, first = OLD["item_id"], old.first_item_id
    w_old, w_new = old.next_item.output_weight, new.next_item.output_weight
    assert torch.equal(w_new[:v0], w_old)
    expected = w_old[first:].mean(0)
    assert torch.allclose(w_new[v0:], expected.expand(NEW["item_id"] - v0, D))
    b_old, b_new = old.next_item.output_bias, new.next_item.output_bias
    assert torch.equal(b_new[:v0], b_old)
    assert torch.allclose(b_new[v0:], b_old[first:].mean().expand(NEW["item_id"] - v0))
    assert new.next_item.sampler_probs.shape == (NEW["item_id"] - first,)


def test_new_rows_are_the_mean_real_row_plus_scaled_noise() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 7.0
    table[0] = 0.0  # padding
    table[1:3] = 100.0  # missing / OOV rows: not real items, must not pull the mean
    out = grow_rows(table, 50 + 20_000, first_id=3, noise=0.5,
                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[:50], table)
    real = table[3:]
    torch.testing.assert_close(out[50:].mean(0), real.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(out[50:].std(0), 0.5 * real.std(0, correction=0), rtol=0.05,
                               atol=0)
    def small(seed: int) -> torch.Tensor:
        return grow_rows(table, 60, first_id=3, noise=0.5,
                         generator=torch.Generator().manual_seed(seed))

    assert torch.equal(small(1), small(1)) and not torch.equal(small(1), small(2))


def test_tables_without_real_rows_and_bias_edge_cases() -> None:
    only_special = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    assert grow_rows(only_special, 3, first_id=3, noise=0.0)[2].tolist() == [2.0, 4.0]
    assert grow_rows(torch.zeros(1, 2), 2, first_id=3).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert grow_bias(torch.tensor([0.0, 5.0]), 3, first_id=3).tolist() == [0.0, 5.0, 0.0]
    with pytest.raises(ValueError, match="shrink"):
        grow_rows(torch.zeros(4, 2), 3, first_id=1)


def test_width_derived_from_cardinality_is_pinned_and_survives_save_load(tmp_path: Path) -> None:
    old = trained_like(CONFIGS["gru-tied-full"])
    assert old.inputs.embeddings["category"].embedding_dim == 3  # ceil(2 * 5 ** 0.25)
    new = grown(old)
    assert new.inputs.embeddings["category"].embedding_dim == 3
    assert new.config.inputs.embedding_dims == {"category": 3}
    path = save_checkpoint(tmp_path / "v", new)
    back = load_checkpoint(path).model
    features, mask = batch(seed=3)
    with torch.no_grad():
        assert torch.equal(back.score(features, mask), new.score(features, mask))


def test_old_model_and_global_random_stream_are_left_alone() -> None:
    old = trained_like(CONFIGS["sasrec-untied-bias-sampled"])
    state = {k: v.clone() for k, v in old.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    grown(old)
    assert torch.equal(torch.rand(3), expected)  # building the new model drew nothing
    assert all(torch.equal(v, state[k]) for k, v in old.state_dict().items())
    assert not old.training and not grown(old).training


def test_same_seed_same_model_and_noise_zero_gives_identical_new_items() -> None:
    old = trained_like(CONFIGS["gru-tied-full"])
    a, b = grown(old, seed=5), grown(old, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))
    flat = grown(old, noise=0.0).inputs.item_embedding.weight[OLD["item_id"]:]
    assert torch.equal(flat, flat[:1].expand_as(flat))


def test_growth_refuses_what_is_not_growth() -> None:
    old = schema(OLD)
    with pytest.raises(ValueError, match="shrinks from 10 to 9"):
        vocabulary_growth(old, schema({"item_id": 9, "category": 5}))
    with pytest.raises(ValueError, match="different features"):
        vocabulary_growth(old, old.without("price"))
    changed = old.with_feature(dataclasses.replace(old["category"],
                                                   transform={"op": "categorify", "min_freq": 3}))
    with pytest.raises(ValueError, match="changed beyond its cardinality"):
        vocabulary_growth(old, changed)
    assert vocabulary_growth(old, schema(NEW)) == {"item_id": (10, 25), "category": (5, 300)}
    with pytest.raises(ConfigError, match=r"unknown key 'nosie'.*did you mean 'noise'"):
        GrowthConfig.from_dict({"nosie": 0.1})


@cuda
@pytest.mark.gpu
def test_growth_on_cuda_agrees_with_cpu() -> None:
    old = trained_like(CONFIGS["sasrec-untied-bias-sampled"])
    on_cpu = grown(old, noise=0.0)
    counts = torch.arange(NEW["item_id"], dtype=torch.float32)
    on_gpu = grow_model(old.to("cuda"), schema(NEW), GrowthConfig(noise=0.0), item_counts=counts,
                        generator=torch.Generator("cuda").manual_seed(0))
    assert next(on_gpu.parameters()).device.type == "cuda"
    features, mask = batch()
    with torch.no_grad():
        expected = on_cpu.score(features, mask)
        got = on_gpu.score({k: v.cuda() for k, v in features.items()}, mask.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
