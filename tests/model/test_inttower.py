"""model/inttower.py: pooling, LightSE, FE-Block scores, CIR, DSSM baseline, save/load."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from model.config_base import ConfigError
from model.inttower import (
    DSSM,
    POOLINGS,
    FieldConfig,
    IntTower,
    LightSE,
    Tower,
    TowerConfig,
    TwoTowerConfig,
    build_two_tower,
    catalogue_scores,
    cir_loss,
    index_layout,
    load_two_tower,
    paired_scores,
    pool_sequence,
    save_two_tower,
)

KINDS = ("inttower", "dssm")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def config(kind: str = "inttower", lightse: bool = True, pooling: str = "mean",
           cir_weight: float = 0.1) -> TwoTowerConfig:
    user = TowerConfig((FieldConfig("age", "dense"), FieldConfig("gender", "sparse", 5),
                        FieldConfig("history", "sequence", 40, pooling)),
                       hidden=(16, 8), lightse=lightse)
    item = TowerConfig((FieldConfig("item_id", "sparse", 40),
                        FieldConfig("genres", "sequence", 7, pooling), FieldConfig("year", "dense")),
                       hidden=(12, 8), lightse=lightse)
    return TwoTowerConfig(user=user, item=item, kind=kind, embedding_dim=4, head_dim=4,
                          user_heads=2, item_heads=3, cir_weight=cir_weight)


def batch(b: int = 6, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = gen(seed)
    hist = torch.randint(3, 40, (b, 5), generator=g)
    lengths = torch.arange(b) % 6  # includes an empty history
    hist = torch.where(torch.arange(5)[None, :] < lengths[:, None], hist, 0)
    genres = torch.where(torch.arange(3)[None, :] < 1 + torch.arange(b)[:, None] % 3,
                         torch.randint(3, 7, (b, 3), generator=g), 0)
    user = {"age": torch.randn(b, generator=g), "gender": torch.randint(1, 5, (b,), generator=g),
            "history": hist}
    item = {"item_id": torch.randint(3, 40, (b,), generator=g), "genres": genres,
            "year": torch.randn(b, generator=g)}
    return user, item


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_ignores_padded_positions(pooling: str) -> None:
    emb = torch.randn(4, 5, 3, generator=gen(0))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]],
                        dtype=torch.bool)
    pooled = pool_sequence(emb, mask, pooling)
    noisy = torch.where(mask[..., None], emb, torch.randn(4, 5, 3, generator=gen(1)) * 100)
    assert pooled.shape == (4, 3)
    torch.testing.assert_close(pool_sequence(noisy, mask, pooling), pooled)
    assert torch.equal(pooled[2], torch.zeros(3))  # an empty list pools to zeros


def test_pooling_values_by_hand() -> None:
    emb = torch.tensor([[[-3.0, 2.0], [-1.0, 6.0], [50.0, 50.0]]])
    mask = torch.tensor([[True, True, False]])
    assert pool_sequence(emb, mask, "mean").tolist() == [[-2.0, 4.0]]
    assert pool_sequence(emb, mask, "sum").tolist() == [[-4.0, 8.0]]
    assert pool_sequence(emb, mask, "max").tolist() == [[-1.0, 6.0]]  # negative max is kept


@pytest.mark.parametrize("pooling", POOLINGS)
def test_tower_output_does_not_depend_on_padding_width(pooling: str) -> None:
    torch.manual_seed(0)
    model = build_two_tower(config(pooling=pooling)).eval()
    user, item = batch()
    wider = {**user, "history": torch.cat([user["history"], torch.zeros(6, 4, dtype=torch.long)],
                                          dim=1)}
    torch.testing.assert_close(model.user_heads(wider), model.user_heads(user))
    torch.testing.assert_close(model.logits(wider, item), model.logits(user, item))


# --------------------------------------------------------------------------- LightSE


def test_lightse_weights_sum_to_one_per_example() -> None:
    torch.manual_seed(0)
    se = LightSE(num_fields=4)
    fields = torch.randn(7, 4, 5, generator=gen(2)) * 3
    out, weights = se(fields)
    assert weights.shape == (7, 4) and bool((weights > 0).all())
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(7))
    torch.testing.assert_close(out, fields * (1 + weights[..., None]))
    # the weights depend on the example
    assert not torch.allclose(weights[0], weights[1])


def test_tower_reports_field_weights_only_with_lightse() -> None:
    user, item = batch()
    out = build_two_tower(config())(user, item, torch.ones(6))
    assert out.user_field_weights is not None and out.user_field_weights.shape == (6, 3)
    torch.testing.assert_close(out.item_field_weights.sum(1), torch.ones(6))
    plain = build_two_tower(config(lightse=False))(user, item, torch.ones(6))
    assert plain.user_field_weights is None and plain.item_field_weights is None


# --------------------------------------------------------------------------- scores


def test_paired_score_is_sum_over_layers_and_user_heads_of_max_over_item_heads() -> None:
    u, v = torch.randn(3, 2, 2, 4, generator=gen(0)), torch.randn(3, 2, 3, 4, generator=gen(1))
    expected = torch.zeros(3)
    for b in range(3):
        for layer in range(2):
            for h in range(2):
                expected[b] += max(float(u[b, layer, h] @ v[b, layer, k]) for k in range(3))
    torch.testing.assert_close(paired_scores(u, v), expected)
    full = catalogue_scores(u, index_layout(v))  # [3, 3]: every user x every item
    torch.testing.assert_close(full.diagonal(), expected)
    torch.testing.assert_close(full[0, 2], paired_scores(u[:1], v[2:3])[0])


def test_inttower_heads_have_one_entry_per_layer_and_head() -> None:
    model = build_two_tower(config())
    user, item = batch()
    assert isinstance(model, IntTower)
    assert model.user_heads(user).shape == (6, 2, 2, 4)
    heads = model.item_heads(item)
    assert heads.shape == (6, 2, 3, 4)
    assert not torch.allclose(heads.norm(dim=-1), torch.ones(6, 2, 3))
    unit = build_two_tower(dataclasses.replace(config(), normalize_heads=True))
    torch.testing.assert_close(unit.item_heads(item).norm(dim=-1), torch.ones(6, 2, 3))


def test_dssm_shares_the_towers_and_scores_by_dot_product() -> None:
    torch.manual_seed(0)
    dssm, inttower = build_two_tower(config("dssm")), build_two_tower(config())
    assert isinstance(dssm, DSSM)
    assert type(dssm.user_tower) is type(inttower.user_tower) is Tower
    user, item = batch()
    with torch.no_grad():
        dssm.log_scale.fill_(math.log(0.5))
        dssm.bias.fill_(0.25)
        u_last = dssm.user_tower(user)[0][-1]
        i_last = dssm.item_tower(item)[0][-1]
        expected = 0.5 * (u_last * i_last).sum(dim=1) + 0.25
        torch.testing.assert_close(dssm.logits(user, item), expected)


# --------------------------------------------------------------------------- CIR


def test_cir_loss_equals_hand_computed_value() -> None:
    # rows 0, 1, 3 are positives; row 2 (a negative) must be ignored
    u = torch.tensor([[2.0, 0.0], [0.0, 3.0], [9.0, -9.0], [0.6, 0.8]])
    v = torch.tensor([[1.0, 0.0], [3.0, 4.0], [-5.0, 1.0], [0.0, 7.0]])
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0])
    # cosines u_i . v_j of the positives, / tau = 0.5:
    # u0=(1,0), u1=(0,1), u3=(.6,.8); v0=(1,0), v1=(.6,.8), v3=(0,1)
    s = [[2.0, 1.2, 0.0], [0.0, 1.6, 2.0], [1.2, 2.0, 1.6]]
    expected = sum(-s[i][i] + math.log(sum(math.exp(x) for x in s[i])) for i in range(3)) / 3
    assert float(cir_loss(u, v, labels, temperature=0.5)) == pytest.approx(expected, rel=1e-6)


def test_cir_loss_is_minimal_when_each_user_matches_its_own_item() -> None:
    u = torch.eye(4)
    labels = torch.ones(4)
    aligned = float(cir_loss(u, u, labels, 0.1))
    shifted = float(cir_loss(u, u.roll(1, dims=0), labels, 0.1))  # positives off the diagonal
    assert aligned < 0.01 < 5.0 < shifted


def test_cir_loss_needs_two_positives_and_keeps_gradients_finite() -> None:
    u = torch.randn(3, 4, requires_grad=True)
    loss = cir_loss(u, torch.randn(3, 4), torch.tensor([1.0, 0.0, 0.0]), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and bool(torch.isfinite(u.grad).all())


def test_forward_loss_is_bce_plus_weighted_cir() -> None:
    torch.manual_seed(0)
    model = build_two_tower(config(cir_weight=0.3))
    user, item = batch()
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    out = model(user, item, labels)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    torch.testing.assert_close(out.bce, bce)
    assert out.cir.item() > 0
    torch.testing.assert_close(out.loss, bce + 0.3 * out.cir)
    none = build_two_tower(config(cir_weight=0.0))(user, item, labels)
    assert none.cir.item() == 0.0 and torch.equal(none.loss, none.bce)


@pytest.mark.parametrize("kind", KINDS)
def test_model_learns_a_feature_interaction(kind: str) -> None:
    """Click iff the user's gender id and the item's genre id have the same parity."""
    torch.manual_seed(0)
    model = build_two_tower(config(kind))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    user, item = batch(b=128, seed=3)
    item["genres"][:, 1:] = 0
    labels = ((user["gender"] % 2) == (item["genres"][:, 0] % 2)).float()
    for _ in range(80):
        loss = model(user, item, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    acc = ((model.logits(user, item) > 0).float() == labels).float().mean()
    assert float(acc) > 0.95


# --------------------------------------------------------------------------- configs and inputs


def test_config_round_trips_and_rejects_typos() -> None:
    cfg = config()
    assert TwoTowerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="did you mean 'head_dim'"):
        TwoTowerConfig.from_dict({**cfg.to_dict(), "heads_dim": 3})
    with pytest.raises(ConfigError, match="did you mean 'pooling'"):
        TowerConfig.from_dict({"fields": [{"name": "x", "kind": "sequence", "cardinality": 5,
                                           "poolling": "max"}]})


@pytest.mark.parametrize(("change", "message"), [
    ({"user_hidden": (16, 8, 8)}, "same number of layers"),
    ({"user_hidden": (16, 6)}, "equal widths"),
    ({"head_dim": 0}, "positive int"),
    ({"cir_temperature": 0.0}, "cir_temperature"),
])
def test_invalid_configs_say_what_is_wrong(change: dict, message: str) -> None:
    cfg = config()
    user = TowerConfig(cfg.user.fields, hidden=change.pop("user_hidden", cfg.user.hidden))
    with pytest.raises(ConfigError, match=message):
        TwoTowerConfig(user=user, item=cfg.item, **change)


def test_field_configs_are_checked() -> None:
    with pytest.raises(ConfigError, match="no cardinality"):
        FieldConfig("age", "dense", cardinality=3)
    with pytest.raises(ConfigError, match="set cardinality"):
        FieldConfig("gender", "sparse")
    with pytest.raises(ConfigError, match="pooling"):
        FieldConfig("h", "sequence", 5, pooling="median")


def test_bad_inputs_raise_with_a_hint() -> None:
    model = build_two_tower(config())
    user, item = batch()
    with pytest.raises(ValueError, match="OOV id 2"):
        model.logits({**user, "gender": torch.full((6,), 5)}, item)
    with pytest.raises(KeyError, match="history"):
        model.logits({k: v for k, v in user.items() if k != "history"}, item)
    with pytest.raises(ValueError, match="unknown features"):
        model.logits({**user, "zip": torch.zeros(6, dtype=torch.long)}, item)
    with pytest.raises(ValueError, match="must be float"):
        model.logits({**user, "age": torch.zeros(6, dtype=torch.long)}, item)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model = build_two_tower(config(kind)).eval()
    with torch.no_grad():
        model.bias.fill_(0.7)  # a non-default value must survive too
    user, item = batch()
    extra = {"index": {"ids": torch.arange(5), "heads": torch.randn(5, 1, 1, 8)}}
    path = save_two_tower(tmp_path / "v1", model, metrics={"auc": 0.8},
                          info={"cutoff": 123}, tensors=extra)
    loaded = load_two_tower(path)
    assert type(loaded.model) is type(model) and loaded.model.config == model.config
    assert not loaded.model.training
    torch.testing.assert_close(loaded.model.logits(user, item), model.logits(user, item))
    assert loaded.metrics == {"auc": 0.8} and loaded.info["cutoff"] == 123
    assert torch.equal(loaded.tensors["index"]["heads"], extra["index"]["heads"])
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "index.safetensors", "metrics.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="immutable"):
        save_two_tower(path, model)


def test_load_rejects_other_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a two-tower version"):
        load_two_tower(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "streamrec.model/1"}))
    with pytest.raises(ValueError, match="format"):
        load_two_tower(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_and_gpu_agree(kind: str) -> None:
    torch.manual_seed(0)
    model = build_two_tower(config(kind)).eval()
    user, item = batch()
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    cpu = model(user, item, labels)
    gpu_model = model.to("cuda")
    gpu = gpu_model({k: v.cuda() for k, v in user.items()},
                    {k: v.cuda() for k, v in item.items()}, labels.cuda())
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, atol=1e-4, rtol=1e-4)
