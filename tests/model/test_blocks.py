"""One suite over every sequence block of ``model/blocks.py``."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch

from model.blocks import (
    BIDIRECTIONAL_ONLY,
    BLOCKS,
    CAUSAL_ONLY,
    HF_BLOCKS,
    BlockConfig,
    HFBlock,
    RNNBlock,
    SASRecBlock,
    SequenceBlock,
    build_block,
    causal_perm_mask,
    hf_config,
    hf_config_kwargs,
)
from model.config_base import ConfigError, from_dict, to_dict

D, L = 16, 8
LENGTHS = (8, 5, 1, 0)  # a full row, a padded one, a single event, an empty row
CAUSAL_CAPABLE = tuple(n for n in BLOCKS if n not in BIDIRECTIONAL_ONLY)
BIDIRECTIONAL_CAPABLE = tuple(n for n in BLOCKS if n not in CAUSAL_ONLY)
MODES = [(n, True) for n in CAUSAL_CAPABLE] + [(n, False) for n in BIDIRECTIONAL_CAPABLE]
MODE_IDS = [f"{n}-{'causal' if c else 'bidi'}" for n, c in MODES]


def make_block(name: str, *, dropout: float = 0.1, seed: int = 0, **kw: object) -> SequenceBlock:
    torch.manual_seed(seed)
    cfg = BlockConfig(name=name, d_model=D, n_layers=2, n_heads=2, max_len=L, dropout=dropout, **kw)
    return build_block(cfg)


def make_inputs(lengths: tuple[int, ...] = LENGTHS, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), L, D, generator=g)  # [B, L, D]
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # [B, L]
    return x, mask


def call(block: SequenceBlock, x: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    perm = causal_perm_mask(mask) if block.config.name == "xlnet" and causal else None
    return block(x, mask, causal=causal, perm_mask=perm)


# --------------------------------------------------------------------------- pure helpers


def test_causal_perm_mask_hides_future_and_padding() -> None:
    mask = torch.tensor([[True, True, False], [True, True, True]])
    expected = torch.tensor(
        [
            [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],
            [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
        ]
    )
    out = causal_perm_mask(mask)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------- shared suite


@pytest.mark.parametrize(("name", "causal"), MODES, ids=MODE_IDS)
def test_output_shape_dtype_and_finite(name: str, causal: bool) -> None:
    block = make_block(name).eval()
    x, mask = make_inputs()
    with torch.no_grad():
        out = call(block, x, mask, causal)
    assert out.shape == (len(LENGTHS), L, D)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()  # padded positions and the empty row included


@pytest.mark.parametrize("name", CAUSAL_CAPABLE)
def test_causal_blocks_do_not_see_the_future(name: str) -> None:
    block = make_block(name).eval()
    x, mask = make_inputs((8, 6))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        base = call(block, x, mask, True)
        for t in range(L - 1):
            x2 = x.clone()
            x2[:, t + 1 :] = torch.randn(x.shape[0], L - t - 1, D, generator=g)
            out = call(block, x2, mask, True)
            seen = mask[:, : t + 1]
            torch.testing.assert_close(out[:, : t + 1][seen], base[:, : t + 1][seen])
            # the change itself is visible at the changed position of the full row
            assert not torch.allclose(out[0, t + 1], base[0, t + 1], atol=1e-4)


@pytest.mark.parametrize("name", BIDIRECTIONAL_CAPABLE)
def test_bidirectional_blocks_see_the_future(name: str) -> None:
    block = make_block(name).eval()
    x, mask = make_inputs((8, 6))
    x2 = x.clone()
    # the last real event of row 1; random, as a constant shift would vanish in a LayerNorm
    x2[:, 5] = torch.randn(2, D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        base = call(block, x, mask, False)
        out = call(block, x2, mask, False)
    assert (out[:, 0] - base[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize(("name", "causal"), MODES, ids=MODE_IDS)
def test_padding_values_do_not_reach_real_positions(name: str, causal: bool) -> None:
    block = make_block(name).eval()
    x, mask = make_inputs()
    x2 = x.clone()
    x2[~mask] = 10.0 * torch.randn(
        int((~mask).sum()), D, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        base = call(block, x, mask, causal)
        out = call(block, x2, mask, causal)
    torch.testing.assert_close(out[mask], base[mask])


@pytest.mark.parametrize(("name", "causal"), MODES, ids=MODE_IDS)
def test_padded_row_equals_the_row_run_alone(name: str, causal: bool) -> None:
    block = make_block(name).eval()
    x, mask = make_inputs((8, 5, 3))
    with torch.no_grad():
        batched = call(block, x, mask, causal)
        for row, n in enumerate((8, 5, 3)):
            alone = call(block, x[row : row + 1, :n], mask[row : row + 1, :n], causal)
            torch.testing.assert_close(batched[row, :n], alone[0])


@pytest.mark.parametrize(("name", "causal"), MODES, ids=MODE_IDS)
def test_gradients_reach_every_trainable_parameter(name: str, causal: bool) -> None:
    block = make_block(name).train()
    x, mask = make_inputs()
    x.requires_grad_(True)
    out = call(block, x, mask, causal)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights)[mask].sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad[mask].abs().sum() > 0
    frozen = [n for n, p in block.named_parameters() if not p.requires_grad]
    for pname, param in block.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, pname
            assert torch.isfinite(param.grad).all(), pname
            assert param.grad.abs().sum() > 0, pname
    # only the word-embedding table (and XLNet's query-stream/segment parameters) is frozen
    allowed = ("word_embedding", "wte.", "mask_emb", "r_s_bias", "seg_embed")
    assert all(any(a in n for a in allowed) for n in frozen), frozen
    assert bool(frozen) == (name in HF_BLOCKS)


@pytest.mark.parametrize(("name", "causal"), MODES, ids=MODE_IDS)
def test_dropout_is_active_only_in_train_mode(name: str, causal: bool) -> None:
    x, mask = make_inputs()
    block = make_block(name, dropout=0.3)
    block.eval()
    with torch.no_grad():
        e1, e2 = call(block, x, mask, causal), call(block, x, mask, causal)
        block.train()
        t1, t2 = call(block, x, mask, causal), call(block, x, mask, causal)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    assert not torch.allclose(t1[mask], e1[mask], atol=1e-4)
    assert not torch.allclose(t1[mask], t2[mask], atol=1e-4)
    # with dropout 0, train mode is eval mode: dropout is the only difference
    still = make_block(name, dropout=0.0)
    with torch.no_grad():
        a = call(still.train(), x, mask, causal)
        b = call(still.eval(), x, mask, causal)
    torch.testing.assert_close(a[mask], b[mask])


# --------------------------------------------------------------------------- XLNet


def test_xlnet_respects_a_permutation_mask() -> None:
    block = make_block("xlnet").eval()
    n = 5
    x, mask = make_inputs((n,))
    x, mask = x[:, :n], mask[:, :n]
    rank = torch.tensor([2, 0, 4, 1, 3])  # factorisation order: 1, 3, 0, 4, 2
    perm = (rank[None, :] > rank[:, None]).float()[None]  # [1, L, L]: j after i is hidden
    assert perm[0, 1].tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]  # position 1 comes first
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        base = block(x, mask, causal=False, perm_mask=perm)
        unmasked = block(x, mask, causal=False)
        for i in range(n):
            later = rank > rank[i]
            if later.any():
                x2 = x.clone()
                x2[0, later] = torch.randn(int(later.sum()), D, generator=g)
                out = block(x2, mask, causal=False, perm_mask=perm)
                torch.testing.assert_close(out[0, i], base[0, i])
            earlier = rank < rank[i]
            if earlier.any():
                x3 = x.clone()
                x3[0, earlier] = torch.randn(int(earlier.sum()), D, generator=g)
                out = block(x3, mask, causal=False, perm_mask=perm)
                assert (out[0, i] - base[0, i]).abs().max() > 1e-3
    # the mask changes the result: without it position 1 sees everything
    assert (unmasked[0, 1] - base[0, 1]).abs().max() > 1e-3


def test_xlnet_causal_adds_the_future_to_a_non_causal_perm_mask() -> None:
    block = make_block("xlnet").eval()
    x, mask = make_inputs((8, 6))
    zeros = torch.zeros(2, L, L)
    with torch.no_grad():
        proper = block(x, mask, causal=True, perm_mask=causal_perm_mask(mask))
        lax = block(x, mask, causal=True, perm_mask=zeros)
    torch.testing.assert_close(lax[mask], proper[mask])


# --------------------------------------------------------------------------- call errors


@pytest.mark.parametrize("name", BIDIRECTIONAL_ONLY)
def test_bidirectional_block_refuses_causal(name: str) -> None:
    x, mask = make_inputs()
    with pytest.raises(ValueError, match="bidirectional"):
        make_block(name)(x, mask, causal=True)


@pytest.mark.parametrize("name", CAUSAL_ONLY)
def test_causal_block_refuses_bidirectional(name: str) -> None:
    x, mask = make_inputs()
    with pytest.raises(ValueError, match="causal only"):
        make_block(name)(x, mask, causal=False)


@pytest.mark.parametrize("name", [n for n in BLOCKS if n != "xlnet"])
def test_perm_mask_is_refused_outside_xlnet(name: str) -> None:
    x, mask = make_inputs()
    causal = name in CAUSAL_CAPABLE
    with pytest.raises(ValueError, match="xlnet only"):
        make_block(name)(x, mask, causal=causal, perm_mask=causal_perm_mask(mask))


def test_causal_xlnet_without_perm_mask_says_what_to_pass() -> None:
    x, mask = make_inputs()
    with pytest.raises(ValueError, match="causal_perm_mask"):
        make_block("xlnet")(x, mask, causal=True)


@pytest.mark.parametrize("name", ["gpt2", "sasrec", "gru"])
def test_bad_shapes_are_refused(name: str) -> None:
    block = make_block(name)
    x, mask = make_inputs()
    with pytest.raises(ValueError, match="max_len"):
        block(torch.randn(1, L + 1, D), torch.ones(1, L + 1, dtype=torch.bool), causal=True)
    with pytest.raises(ValueError, match="D=16"):
        block(torch.randn(1, L, D + 1), torch.ones(1, L, dtype=torch.bool), causal=True)
    with pytest.raises(ValueError, match="bool"):
        block(x, mask.long(), causal=True)


# --------------------------------------------------------------------------- config


# Per-model field names written out here, independent of the module's table.
HF_FF_FIELD = {
    "gpt2": "n_inner",
    "xlnet": "d_inner",
    "bert": "intermediate_size",
    "albert": "intermediate_size",
    "roberta": "intermediate_size",
    "electra": "intermediate_size",
}


@pytest.mark.parametrize("name", HF_BLOCKS)
def test_hf_config_keys_are_real_fields_and_carry_our_values(name: str) -> None:
    cfg = BlockConfig(name=name, d_model=24, n_layers=3, n_heads=4, dropout=0.17, max_len=9)
    kwargs = hf_config_kwargs(cfg)
    built = hf_config(cfg)
    config_cls = type(built)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    signature = set(inspect.signature(config_cls.__init__).parameters)
    defaults = set(config_cls().to_dict())
    for key in kwargs:
        assert key in fields and key in signature and key in defaults, key
        assert getattr(built, key) == kwargs[key] or kwargs[key] is None, key
    # HF's standard attribute names (attribute_map), not our table
    assert built.hidden_size == 24
    assert built.num_hidden_layers == 3
    assert built.num_attention_heads == 4
    assert getattr(built, HF_FF_FIELD[name]) == 4 * 24
    dropout_fields = [f for f in fields if "drop" in f]
    assert dropout_fields
    for f in dropout_fields:
        assert getattr(built, f) == 0.17, f
    if name != "xlnet":  # relative positions: no table
        positions = built.max_position_embeddings
        assert positions == (9 + 2 if name == "roberta" else 9)


def test_hf_config_maps_d_ff_and_layer_norm_eps() -> None:
    built = hf_config(BlockConfig(name="gpt2", d_model=16, d_ff=40, layer_norm_eps=1e-3))
    assert built.n_inner == 40
    assert built.layer_norm_epsilon == 1e-3
    assert hf_config(BlockConfig(name="bert")).layer_norm_eps == 1e-12  # HF's default kept


def test_hf_extra_field_is_applied() -> None:
    block = make_block("gpt2", hf={"activation_function": "relu"})
    assert isinstance(block, HFBlock)
    assert block.model.config.activation_function == "relu"


def test_unknown_hf_key_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'hiden_act'.*did you mean 'hidden_act'"):
        BlockConfig(name="bert", hf={"hiden_act": "relu"})


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "is_decoder", "return_dict"])
def test_hf_keys_we_own_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        BlockConfig(name="bert", hf={key: 1})


def test_xlnet_attn_type_cannot_be_overridden() -> None:
    with pytest.raises(ConfigError, match="attn_type"):
        BlockConfig(name="xlnet", hf={"attn_type": "uni"})


def test_hf_value_rejected_by_hf_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="type_vocab_size"):
        BlockConfig(name="bert", hf={"type_vocab_size": "two"})


@pytest.mark.parametrize("name", ["sasrec", "gru", "lstm"])
def test_hf_on_native_block_is_an_error(name: str) -> None:
    with pytest.raises(ConfigError, match="only for Hugging Face blocks"):
        BlockConfig(name=name, hf={"hidden_act": "relu"})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"name": "trasnformer"}, "valid names: gpt2, xlnet"),
        ({"name": "bret"}, "did you mean 'bert'"),
        ({"name": "bert", "d_model": 10, "n_heads": 3}, "not divisible"),
        ({"name": "bert", "dropout": 1.0}, "dropout"),
        ({"name": "bert", "n_layers": 0}, "n_layers"),
        ({"name": "bert", "d_ff": 0}, "d_ff"),
        ({"name": "bert", "layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"name": "bert", "dropuot": 0.2}, "did you mean 'dropout'"),
    ],
)
def test_invalid_config_is_refused(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BlockConfig.from_dict(changes)


def test_rnn_ignores_heads() -> None:
    assert BlockConfig(name="gru", d_model=10, n_heads=3).n_heads == 3


@pytest.mark.parametrize("name", BLOCKS)
def test_config_round_trips_through_a_dict(name: str) -> None:
    hf = {"hidden_act": "relu"} if name in BIDIRECTIONAL_ONLY else {}
    cfg = BlockConfig(name=name, d_model=8, n_heads=2, hf=hf)
    assert from_dict(BlockConfig, to_dict(cfg)) == cfg


def test_config_copies_the_hf_dict() -> None:
    extra = {"hidden_act": "relu"}
    cfg = BlockConfig(name="bert", hf=extra)
    extra["hidden_act"] = "tanh"
    assert cfg.hf == {"hidden_act": "relu"}


@pytest.mark.parametrize(
    ("name", "cls"), [("bert", HFBlock), ("sasrec", SASRecBlock), ("lstm", RNNBlock)]
)
def test_build_block_returns_the_named_class(name: str, cls: type) -> None:
    block = make_block(name)
    assert isinstance(block, cls)
    assert block.config.name == name


# --------------------------------------------------------------------------- attention impl


@pytest.mark.parametrize("name", [n for n in HF_BLOCKS if n != "xlnet"])
def test_sdpa_and_eager_attention_agree(name: str) -> None:
    block = make_block(name).eval()
    assert isinstance(block, HFBlock)
    assert block.model.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(block)
    eager.model.set_attn_implementation("eager")
    x, mask = make_inputs()
    causal = name in CAUSAL_ONLY
    with torch.no_grad():
        a = call(block, x, mask, causal)
        b = call(eager, x, mask, causal)
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(b).all()


# --------------------------------------------------------------------------- devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "causal"), MODES, ids=MODE_IDS)
def test_cpu_and_cuda_agree(name: str, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # TF32 matmuls (cuBLAS, cuDNN RNNs) would cost ~1e-3 of precision
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    block = make_block(name).eval()
    gpu_block = copy.deepcopy(block).to("cuda")
    x, mask = make_inputs()
    with torch.no_grad():
        cpu = call(block, x, mask, causal)
        gpu = call(gpu_block, x.cuda(), mask.cuda(), causal)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu()[mask], cpu[mask], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(gpu).all()
