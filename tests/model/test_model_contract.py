"""The shared contract of ``SessionModel``: one suite over every masking x block x loss.

Which combinations each check runs on (a tiny model: d_model 16, 2 layers,
max_len 8, 27 items):

- ``COMBOS``, all 48 (16 valid masking x block pairs of
  ``model.masking.VALID_BLOCKS`` x the losses ``full``, ``sampled``, ``bce``):
  forward / gradients, score and predict;
- ``SAMPLED``, for the multi-step checks (reproducibility, optimisation): every
  pair with one loss (rotating over the pairs), plus every loss on one block of
  each masking (clm: sasrec, mlm: bert, plm: xlnet, rtd: electra) - so every
  pair meets a loss and every loss meets every masking;
- ``PAIRS``, every pair with the rotating loss, for the checks that cannot
  depend on the loss (leakage, padding, checkpoints, CPU/GPU).

The input block always sees real ids from a fitted ``Workflow`` (item id, a
second categorical, a price), unseen items (OOV) and missing values included.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from features.batch import FeatureBatch
from features.schema import Feature, Kind, Schema, Tag
from features.workflow import Workflow
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config_base import ConfigError
from model.inputs import AGGREGATIONS, SoftOneHot
from model.masking import MASKINGS, VALID_BLOCKS
from model.model import ModelConfig, SessionModel

D, L, N_ITEMS = 16, 8, 27
FIRST = 3  # categorify with one OOV bucket: 0 pad, 1 missing, 2 OOV, items from 3
LOSSES = ("full", "sampled", "bce")
BLOCKS = sorted({b for blocks in VALID_BLOCKS.values() for b in blocks})

COMBOS = [(m, b, loss) for m in MASKINGS for b in VALID_BLOCKS[m] for loss in LOSSES]
COMBO_IDS = ["-".join(c) for c in COMBOS]
_PAIRS = [(m, b) for m in MASKINGS for b in VALID_BLOCKS[m]]
PAIRS = [(m, b, LOSSES[i % len(LOSSES)]) for i, (m, b) in enumerate(_PAIRS)]
PAIR_IDS = ["-".join(p) for p in PAIRS]
_ALL_LOSSES_ON = {"clm": "sasrec", "mlm": "bert", "plm": "xlnet", "rtd": "electra"}
SAMPLED = PAIRS + [(m, b, loss) for m, b in _ALL_LOSSES_ON.items() for loss in LOSSES
                   if (m, b, loss) not in PAIRS]
SAMPLED_IDS = ["-".join(c) for c in SAMPLED]
CLM_PAIRS = [p for p in PAIRS if p[0] == "clm"]
CLM_IDS = ["-".join(p) for p in CLM_PAIRS]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --------------------------------------------------------------------------- data


def item(k: int) -> str:
    return f"i{k:02d}"


def train_events() -> pa.Table:
    """Sessions over items i00..i26 (every item seen), 4 categories, prices."""
    sid, ts, items, cats, prices = [], [], [], [], []
    for s in range(10):
        for e in range(3 + s % 6):
            k = (s * 7 + e * 3) % N_ITEMS
            sid.append(f"t{s}")
            ts.append(e * 1_000)
            items.append(item(k))
            cats.append(f"c{k % 4}")
            prices.append(1.0 + k)
    for k in range(N_ITEMS):
        sid.append("all")
        ts.append(k)
        items.append(item(k))
        cats.append(f"c{k % 4}")
        prices.append(1.0 + k)
    return pa.table(
        {"session_id": sid, "ts": ts, "item_id": items, "category": cats, "price": prices}
    )


def query_events() -> pa.Table:
    """Lengths 8 (full), 11 (cut to its last 8), 5, 3, 1, 2 (unseen item, nulls), 4."""
    rows: list[tuple[str, str | None, str | None, float | None]] = []
    for s, n in enumerate((8, 11, 5, 3, 1)):
        rows += [(f"q{s}", item((5 * s + 2 * e) % N_ITEMS), f"c{e % 4}", 2.0 + e) for e in range(n)]
    rows += [("q5", "never-seen", None, None), ("q5", item(4), "c9", 3.0)]
    rows += [("q6", item(k), "c1", 10.0 * k) for k in (20, 21, 22, 20)]
    sid, items, cats, prices = (list(c) for c in zip(*rows, strict=True))
    return pa.table(
        {
            "session_id": sid,
            "ts": list(range(len(sid))),
            "item_id": items,
            "category": cats,
            "price": pa.array(prices, pa.float64()),
        }
    )


def schema() -> Schema:
    cat = Kind.CATEGORICAL
    return Schema([
        Feature("item_id", cat, tags={Tag.ITEM_ID}, transform={"op": "categorify"}),
        Feature("category", cat, tags={Tag.ITEM_FEATURE}, transform={"op": "categorify"}),
        Feature("price", Kind.CONTINUOUS, transform={"op": "normalize", "log": True}),
    ])


@pytest.fixture(scope="module")
def workflow() -> Workflow:
    return Workflow(schema(), max_len=L).fit(train_events())


@pytest.fixture(scope="module")
def batch(workflow: Workflow) -> FeatureBatch:
    out = workflow.transform_table(query_events())
    assert out.features["item_id"].shape == (7, L)
    assert workflow.cardinalities == {"item_id": FIRST + N_ITEMS, "category": 3 + 4}
    return out


def fb(batch: FeatureBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fresh copies of the features and mask (a test may not change the shared batch)."""
    return {k: v.clone() for k, v in batch.features.items()}, batch.mask.clone()


def config(masking: str, block: str, loss: str = "full", *, dropout: float = 0.0,
           **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "block": {"name": block, "d_model": D, "n_layers": 2, "n_heads": 2, "max_len": L,
                  "dropout": dropout},
        "masking": masking,
        "mlm_probability": 0.3,
        "next_item": {"loss": loss, "num_negatives": 4},
    }
    cfg.update(overrides)
    return cfg


def build(wf: Workflow, masking: str, block: str, loss: str = "full", *, seed: int = 0,
          dropout: float = 0.0, item_counts: torch.Tensor | None = None,
          **overrides: Any) -> SessionModel:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict(config(masking, block, loss, dropout=dropout, **overrides))
    return SessionModel(wf.schema, cfg, item_counts=item_counts)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors: intra-op threads only add overhead (10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cut(features: dict[str, torch.Tensor], rows: Any, width: int) -> dict[str, torch.Tensor]:
    return {k: v[rows, :width] for k, v in features.items()}


# --------------------------------------------------------------------------- training contract


@pytest.mark.parametrize(("masking", "block", "loss"), COMBOS, ids=COMBO_IDS)
def test_forward_gives_finite_scalar_loss_and_gradients(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss, dropout=0.1)
    feats, mask = fb(batch)
    out = model(feats, mask, generator=gen())
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert set(out.losses) == ({"next_item", "rtd"} if masking == "rtd" else {"next_item"})
    ids = feats["item_id"]
    if masking == "clm":  # every real next item (not OOV) is a target
        assert out.num_targets == int(((ids[:, 1:] >= FIRST) & mask[:, 1:]).sum())
    else:
        assert 0 < out.num_targets <= int(((ids >= FIRST) & mask).sum())
    assert (model.mask_embedding is not None) == (masking != "clm")
    assert (model.discriminator is not None) == (masking == "rtd")
    out.loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:  # HF word embeddings and other inputs we never feed
            assert p.grad is None, name
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    assert torch.equal(feats["item_id"], batch.features["item_id"])  # inputs not mutated


@pytest.mark.parametrize(("masking", "block", "loss"), SAMPLED, ids=SAMPLED_IDS)
def test_training_loss_reproducible_from_the_generator(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss)
    feats, mask = fb(batch)
    torch.manual_seed(123)  # the global RNG differs between the calls: only `generator` counts
    a = model(feats, mask, generator=gen(1)).loss
    torch.manual_seed(456)
    b = model(feats, mask, generator=gen(1)).loss
    assert torch.equal(a, b)
    if masking != "clm" or loss != "full":  # something is drawn: another seed, another loss
        assert not torch.equal(a, model(feats, mask, generator=gen(2)).loss)


@pytest.mark.parametrize(("masking", "block", "loss"), SAMPLED, ids=SAMPLED_IDS)
def test_optimisation_steps_lower_the_loss(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss)
    feats, mask = fb(batch)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    first = None
    for _ in range(3):
        out = model(feats, mask, generator=gen(0))  # the same draws every step
        first = out.loss.item() if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert model(feats, mask, generator=gen(0)).loss.item() < first


# --------------------------------------------------------------------------- inference contract


@pytest.mark.parametrize(("masking", "block", "loss"), COMBOS, ids=COMBO_IDS)
def test_score_and_predict(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss).eval()
    feats, mask = fb(batch)
    scores = model.score(feats, mask)
    assert scores.shape == (7, FIRST + N_ITEMS) and scores.dtype == torch.float32
    assert torch.isneginf(scores[:, :FIRST]).all()
    assert torch.isfinite(scores[:, FIRST:]).all()
    top = model.predict(feats, mask, k=5)
    assert top.ids.shape == top.scores.shape == (7, 5) and top.ids.dtype == torch.int64
    assert ((top.ids >= FIRST) & (top.ids < FIRST + N_ITEMS)).all()
    assert torch.equal(top.scores, scores.gather(1, top.ids))
    assert torch.equal(top.scores, scores.sort(1, descending=True).values[:, :5])


@pytest.mark.parametrize(("masking", "block", "loss"), PAIRS, ids=PAIR_IDS)
def test_predict_exclude_seen_never_returns_a_session_item(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss).eval()
    feats, mask = fb(batch)
    ids = feats["item_id"]
    for k in (5, N_ITEMS + 10):  # the second asks for more than is left after exclusion
        top = model.predict(feats, mask, k=k, exclude_seen=True)
        assert top.ids.shape == (7, min(k, N_ITEMS))
        for r in range(7):
            seen = set(ids[r][mask[r]].tolist())
            real = top.ids[r][top.ids[r] >= FIRST].tolist()
            assert not seen & set(real)
            assert len(set(real)) == len(real)
            n_left = N_ITEMS - len({i for i in seen if i >= FIRST})
            assert len(real) == min(k, n_left)  # every remaining slot is "no item" (id 0)
            assert (top.ids[r][len(real):] == 0).all()
            assert torch.isneginf(top.scores[r][len(real):]).all()
    with pytest.raises(ValueError, match="k must be a positive int"):
        model.predict(feats, mask, k=0)


@pytest.mark.parametrize(("masking", "block", "loss"), CLM_PAIRS, ids=CLM_IDS)
def test_clm_has_no_future_leakage(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss, dropout=0.1).eval()
    feats, mask = fb(batch)
    h = model.hidden_states(feats, mask)  # [B, L, D]
    g = gen(7)
    for t in range(L - 1):
        after = mask.clone()
        after[:, : t + 1] = False  # real positions after t
        n = int(after.sum())
        if n == 0:
            continue
        changed = {k: v.clone() for k, v in feats.items()}
        changed["item_id"][after] = torch.randint(FIRST, FIRST + N_ITEMS, (n,), generator=g)
        changed["category"][after] = torch.randint(1, 7, (n,), generator=g)
        changed["price"][after] = torch.randn(n, generator=g) * 3
        h2 = model.hidden_states(changed, mask)
        assert not torch.allclose(h2[:, t + 1 :], h[:, t + 1 :])  # the change did reach the model
        assert torch.allclose(h2[:, : t + 1], h[:, : t + 1], atol=1e-6), f"leak into <= {t}"
        rows = mask[:, t]  # sessions with an event at t: the prefix ending at t, alone
        alone = model.score(cut(feats, rows, t + 1), mask[rows, : t + 1])  # [b, V]
        for states in (h, h2):
            from_full = model.next_item.item_scores(states[rows, t])  # [b, V]
            assert torch.allclose(alone, from_full, atol=1e-5)


@pytest.mark.parametrize(("masking", "block", "loss"), PAIRS, ids=PAIR_IDS)
def test_score_ignores_padding_content(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss, dropout=0.1).eval()
    feats, mask = fb(batch)
    pad = ~mask
    n = int(pad.sum())
    g = gen(3)
    garbage = {k: v.clone() for k, v in feats.items()}
    garbage["item_id"][pad] = torch.randint(1, FIRST + N_ITEMS, (n,), generator=g)
    garbage["category"][pad] = torch.randint(1, 7, (n,), generator=g)
    garbage["price"][pad] = torch.randn(n, generator=g)
    assert torch.allclose(model.score(garbage, mask), model.score(feats, mask), atol=1e-6)


@pytest.mark.parametrize(("masking", "block", "loss"), PAIRS, ids=PAIR_IDS)
def test_session_scored_alone_equals_scored_in_a_batch(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss, dropout=0.1).eval()
    feats, mask = fb(batch)
    together = model.score(feats, mask)  # [B, V], right-padded to L
    for r, n in enumerate(mask.sum(1).tolist()):
        # A masked scheme needs one free slot after the events (a full row drops its
        # oldest event to make one), so "alone" keeps one padding column there.
        widths = {min(n + 1, L)} | ({n} if masking == "clm" else set())
        for w in widths:
            alone = model.score(cut(feats, [r], w), mask[[r], :w])
            assert torch.allclose(alone, together[[r]], atol=1e-5), (r, w)


@pytest.mark.parametrize(("masking", "block", "loss"), PAIRS, ids=PAIR_IDS)
def test_eval_scores_are_deterministic(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss, dropout=0.3).eval()
    feats, mask = fb(batch)
    torch.manual_seed(1)
    a = model.score(feats, mask)
    torch.manual_seed(2)  # dropout would draw other masks now
    assert torch.equal(a, model.score(feats, mask))
    with torch.inference_mode():  # what serving uses; may pick other kernels (LSTM does)
        b = model.score(feats, mask)
    assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(("masking", "block", "loss"), PAIRS, ids=PAIR_IDS)
def test_save_load_round_trip_gives_identical_scores(tmp_path, workflow, batch, masking, block,
                                                     loss):
    model = build(workflow, masking, block, loss, dropout=0.1)
    feats, mask = fb(batch)
    model(feats, mask, generator=gen()).loss.backward()  # move off the init: a trained state
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    model.eval()
    path = save_checkpoint(tmp_path / "v1", model, workflow, metrics={"recall@10": 0.25})
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "metrics.json", "model.safetensors", "workflow"]
    files = [p for p in path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".parquet"}  # nothing pickled
    for p in files:  # and each file really is what its name says
        data = p.read_bytes()
        if p.suffix == ".json":
            json.loads(data)
        elif p.suffix == ".parquet":
            assert data[:4] == data[-4:] == b"PAR1", p
        else:  # safetensors: u64 header length, then a JSON header
            header = int.from_bytes(data[:8], "little")
            assert isinstance(json.loads(data[8 : 8 + header]), dict)
    doc = json.loads((path / "config.json").read_text())
    assert ModelConfig.from_dict(doc["model"]) == model.config
    loaded = load_checkpoint(path)
    assert not loaded.model.training
    assert loaded.model.config == model.config
    assert torch.equal(loaded.model.score(feats, mask), model.score(feats, mask))
    state = model.state_dict()
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[name]), name


# --------------------------------------------------------------------------- CPU / GPU


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("masking", "block", "loss"), PAIRS, ids=PAIR_IDS)
def test_cpu_and_gpu_agree(workflow, batch, masking, block, loss):
    model = build(workflow, masking, block, loss, dropout=0.1).eval()
    feats, mask = fb(batch)
    on_gpu = copy.deepcopy(model).to("cuda")
    gfeats = {k: v.cuda() for k, v in feats.items()}
    gmask = mask.cuda()
    with torch.no_grad():
        cpu_scores = model.score(feats, mask)
        gpu_scores = on_gpu.score(gfeats, gmask)
    assert gpu_scores.device.type == "cuda"
    assert torch.allclose(gpu_scores.cpu(), cpu_scores, atol=1e-4)
    top = on_gpu.predict(gfeats, gmask, k=N_ITEMS, exclude_seen=True)
    assert top.ids.device.type == "cuda"
    on_gpu.train()  # the training step runs on the device with a device generator
    out = on_gpu(gfeats, gmask, generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.loss.device.type == "cuda" and torch.isfinite(out.loss)
    out.loss.backward()


# --------------------------------------------------------------------------- config


INVALID = [(m, b) for m in MASKINGS for b in BLOCKS if b not in VALID_BLOCKS[m]]


@pytest.mark.parametrize(("masking", "block"), INVALID, ids=[f"{m}-{b}" for m, b in INVALID])
def test_invalid_masking_block_combination_names_the_valid_blocks(masking, block):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(config(masking, block))
    message = str(err.value)
    assert repr(block) in message
    for valid in VALID_BLOCKS[masking]:
        assert valid in message


def test_unknown_masking_lists_the_schemes():
    with pytest.raises(ConfigError, match="clm, mlm, plm, rtd"):
        ModelConfig.from_dict(config("mlmm", "bert"))


def _with(path: tuple[str, ...], key: str) -> dict[str, Any]:
    cfg = config("clm", "gpt2", tasks={"buy": {"kind": "binary", "target": "purchased"}},
                 inputs={"aggregation": "concat"})
    node = cfg
    for part in path:
        node = node.setdefault(part, {})
    node[key] = 1
    return cfg


@pytest.mark.parametrize(
    ("path", "key", "hint"),
    [
        ((), "mlm_probabilty", "mlm_probability"),
        (("block",), "d_modle", "d_model"),
        (("block", "hf"), "n_embdd", None),  # checked against the HF config class's fields
        (("inputs",), "layer_nrom", "layer_norm"),
        (("next_item",), "temperture", "temperature"),
        (("tasks", "buy"), "wieght", "weight"),
    ],
    ids=["top", "block", "block.hf", "inputs", "next_item", "tasks"],
)
def test_unknown_key_anywhere_raises_naming_it(path, key, hint):
    with pytest.raises(ConfigError, match=repr(key)) as err:
        ModelConfig.from_dict(_with(path, key))
    if hint:
        assert f"did you mean {hint!r}" in str(err.value)


def test_config_round_trips_through_json():
    cfg = ModelConfig.from_dict(config(
        "mlm", "bert", "sampled", sse_probability=0.1,
        inputs={"aggregation": "elementwise-sum", "features": ["item_id", "price"]},
        tasks={"buy": {"kind": "binary", "target": "purchased", "hidden": [4]}}))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --------------------------------------------------------------------------- input block


def _expected_continuous(model: SessionModel, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    enc = model.inputs.continuous["price"]
    if isinstance(enc, SoftOneHot):
        weights = torch.softmax(x[..., None] * enc.logit_weight + enc.logit_bias, -1)  # [B, L, K]
        vec = weights @ enc.table  # [B, L, E]
    else:
        vec = x[..., None] * enc.weight[:, 0] + enc.bias  # [B, L, E]
    return vec * mask[..., None]  # zero at padding


@pytest.mark.parametrize("continuous", ["projection", "soft-one-hot"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_input_aggregation_and_continuous_encoding(workflow, batch, aggregation, continuous):
    model = build(workflow, "clm", "sasrec",
                  inputs={"aggregation": aggregation, "continuous": continuous,
                          "soft_one_hot_bins": 5})
    feats, mask = fb(batch)
    inp = model.inputs
    assert isinstance(inp.continuous["price"], SoftOneHot) == (continuous == "soft-one-hot")
    items = inp.embeddings["item_id"](feats["item_id"])  # [B, L, E]
    cats = inp.embeddings["category"](feats["category"])  # [B, L, E]
    price = _expected_continuous(model, feats["price"], mask)  # [B, L, E]
    if aggregation == "concat":
        expected = inp.projection(torch.cat([items, cats, price], -1))  # [B, L, D]
    elif aggregation == "elementwise-sum":
        expected = items + cats + price
    else:
        expected = items * (cats + price)
    assert torch.allclose(inp(feats), expected, atol=1e-6)
    out = model(feats, mask, generator=gen())
    out.loss.backward()
    assert all(p.grad is not None for p in inp.continuous["price"].parameters())
    assert model.eval().score(feats, mask).shape == (7, FIRST + N_ITEMS)


def test_layer_norm_normalises_each_categorical_embedding(workflow, batch):
    model = build(workflow, "clm", "gru",
                  inputs={"aggregation": "elementwise-sum", "layer_norm": True})
    feats, mask = fb(batch)
    inp = model.inputs
    assert set(inp.norms) == {"item_id", "category"}  # not the continuous feature
    normed = inp.norms["category"](inp.embeddings["category"](feats["category"]))  # [B, L, D]
    assert torch.allclose(normed.mean(-1), torch.zeros(7, L), atol=1e-5)
    raw_var = inp.embeddings["category"].weight[1:].var(-1, unbiased=False)  # small at init
    assert (raw_var < 0.01).all()
    assert (normed.var(-1, unbiased=False)[mask] > 0.9).all()  # unit scale (up to the eps)
    expected = (F.layer_norm(inp.embeddings["item_id"](feats["item_id"]), (D,))
                + normed + _expected_continuous(model, feats["price"], mask))
    assert torch.allclose(inp(feats), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "category_dim", "item_dim"),
    [
        ({}, math.ceil(2.0 * 7**0.25), D),  # the cardinality rule; the item id gets d_model
        ({"dim_multiplier": 4.0}, math.ceil(4.0 * 7**0.25), D),
        ({"embedding_dims": {"category": 5}}, 5, D),
        ({"embedding_dim": 6}, 6, 6),
    ],
    ids=["rule", "multiplier", "per-feature", "fixed"],
)
def test_embedding_dim_cardinality_rule(workflow, batch, inputs, category_dim, item_dim):
    model = build(workflow, "clm", "lstm", inputs={"aggregation": "concat", **inputs})
    inp = model.inputs
    assert inp.embeddings["category"].embedding_dim == category_dim
    assert inp.embeddings["item_id"].embedding_dim == item_dim
    continuous_dim = 8
    assert inp.projection.in_features == item_dim + category_dim + continuous_dim
    feats, mask = fb(batch)
    assert torch.isfinite(model(feats, mask).loss)


def test_elementwise_sum_refuses_embeddings_of_another_width(workflow):
    with pytest.raises(ConfigError, match="'category' is 5"):
        build(workflow, "clm", "sasrec",
              inputs={"aggregation": "elementwise-sum", "embedding_dims": {"category": 5}})


def test_weight_tying_with_a_narrow_item_embedding_projects(tmp_path, workflow, batch):
    model = build(workflow, "clm", "sasrec", "sampled",
                  inputs={"aggregation": "concat", "embedding_dims": {"item_id": 8}})
    feats, mask = fb(batch)
    table = model.inputs.item_embedding
    assert table.embedding_dim == 8
    assert model.next_item.item_embedding is table  # shared, not copied
    proj = model.next_item.proj
    assert (proj.in_features, proj.out_features) == (D, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(feats, mask, generator=gen())
    out.loss.backward()
    assert proj.weight.grad is not None and table.weight.grad.abs().sum() > 0
    opt.step()
    model.eval()
    rep = model.session_representation(feats, mask)  # [B, D]
    by_hand = proj(rep) @ table.weight[FIRST:].T  # [B, R]: the (updated) input table scores
    assert torch.allclose(model.score(feats, mask)[:, FIRST:], by_hand, atol=1e-5)
    path = save_checkpoint(tmp_path / "tied", model)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        shapes = [tuple(f.get_slice(k).get_shape()) for k in f.keys()]  # noqa: SIM118
    assert shapes.count((FIRST + N_ITEMS, 8)) == 1  # the tied table is stored once
    loaded = load_checkpoint(path).model
    assert loaded.next_item.item_embedding is loaded.inputs.item_embedding
    assert torch.equal(loaded.score(feats, mask), model.score(feats, mask))


# --------------------------------------------------------------------------- SSE, multi-task


def test_sse_changes_training_inputs_only_in_train_mode(workflow, batch):
    plain = build(workflow, "clm", "sasrec")
    sse = build(workflow, "clm", "sasrec", sse_probability=0.5)
    sse.load_state_dict(plain.state_dict())  # same weights; SSE adds no parameter
    feats, mask = fb(batch)
    noisy = sse(feats, mask, generator=gen(0)).loss
    assert not torch.equal(noisy, plain(feats, mask, generator=gen(0)).loss)
    assert torch.equal(noisy, sse(feats, mask, generator=gen(0)).loss)
    assert not torch.equal(noisy, sse(feats, mask, generator=gen(1)).loss)
    assert torch.equal(feats["item_id"], batch.features["item_id"])  # the batch is not mutated
    assert torch.equal(sse.score(feats, mask), plain.score(feats, mask))  # scoring never noisy
    sse.eval()
    plain.eval()
    assert torch.equal(sse(feats, mask, generator=gen(0)).loss,
                       plain(feats, mask, generator=gen(0)).loss)


TASKS = {
    "buy": {"kind": "binary", "target": "purchased", "weight": 0.5},
    "value": {"kind": "regression", "target": "revenue", "weight": 2.0, "hidden": [8]},
}
TASK_MODELS = [("clm", "sasrec"), ("mlm", "bert"), ("plm", "xlnet"), ("rtd", "electra")]


@pytest.mark.parametrize(("masking", "block"), TASK_MODELS, ids=[m for m, _ in TASK_MODELS])
def test_multi_task_losses_train_together_as_a_weighted_sum(workflow, batch, masking, block):
    model = build(workflow, masking, block, tasks=TASKS, next_item_weight=1.5, rtd_weight=3.0)
    feats, mask = fb(batch)
    targets = {"purchased": torch.tensor([1.0, 0, 0, 1, float("nan"), 1, 0]),
               "revenue": torch.linspace(-1.0, 2.0, 7)}
    out = model(feats, mask, targets, generator=gen())
    expected_keys = {"next_item", "buy", "value"} | ({"rtd"} if masking == "rtd" else set())
    assert set(out.losses) == expected_keys
    weights = {"next_item": 1.5, "buy": 0.5, "value": 2.0, "rtd": 3.0}
    total = sum(weights[k] * v for k, v in out.losses.items())
    assert torch.allclose(out.loss, total)
    # The task heads read the session representation: the last event under CLM,
    # the appended [MASK] slot otherwise (dropout is 0, so train mode changes nothing).
    if masking == "clm":
        last = mask.sum(1) - 1
        pooled = model.hidden_states(feats, mask)[torch.arange(7), last]  # [B, D]
    else:
        pooled = model.session_representation(feats, mask)  # [B, D]
    keep = ~targets["purchased"].isnan()
    buy = F.binary_cross_entropy_with_logits(model.tasks["buy"](pooled)[keep],
                                             targets["purchased"][keep])
    value = F.mse_loss(model.tasks["value"](pooled), targets["revenue"])
    assert torch.allclose(out.losses["buy"], buy, atol=1e-6)
    assert torch.allclose(out.losses["value"], value, atol=1e-6)
    out.loss.backward()
    for head in ("buy", "value"):
        assert all(p.grad is not None for p in model.tasks[head].parameters())
    assert model.inputs.item_embedding.weight.grad is not None
    with pytest.raises(KeyError, match="revenue"):
        model(feats, mask, {"purchased": targets["purchased"]})
    model.eval()
    preds = model.task_predictions(feats, mask)
    assert set(preds) == {"buy", "value"}
    assert preds["buy"].shape == preds["value"].shape == (7,)
    assert ((preds["buy"] > 0) & (preds["buy"] < 1)).all()
