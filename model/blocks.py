"""Sequence blocks: ``[B, L, D]`` event embeddings in, ``[B, L, D]`` hidden states out.

The middle of the Transformers4Rec meta-architecture (input block -> sequence
block -> head). Every block has the same call::

    block(x, mask, causal=..., perm_mask=None) -> hidden   # [B, L, D]

``x`` is float ``[B, L, D]``, ``mask`` a bool ``[B, L]`` that is True at real
events and right-padded. ``causal=True`` promises that position ``t`` sees
positions ``<= t`` only (next-item training and serving); ``causal=False`` is
for masked-LM training with a bidirectional block. Outputs at padded positions
are finite but otherwise unspecified: the caller ignores them.

Blocks: six Hugging Face base models driven through ``inputs_embeds`` (their
word embeddings are never used and are frozen), a native SASRec, GRU and LSTM.
``transformers`` is imported when an HF block's config is first checked, so
SASRec and RNN models (and whatever merely imports this module) never load it.

>>> import torch
>>> block = build_block(BlockConfig(name="gru", d_model=8, n_layers=1))
>>> x = torch.randn(2, 5, 8)
>>> mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
>>> block(x, mask, causal=True).shape
torch.Size([2, 5, 8])
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config_base import ConfigError, from_dict
from model.masking import causal_perm_mask

if TYPE_CHECKING:
    import transformers

__all__ = [
    "BIDIRECTIONAL_ONLY",
    "BLOCKS",
    "CAUSAL_ONLY",
    "HF_BLOCKS",
    "BlockConfig",
    "HFBlock",
    "RNNBlock",
    "SASRecBlock",
    "SequenceBlock",
    "build_block",
    "causal_perm_mask",
    "hf_config",
    "hf_config_kwargs",
]

logger = logging.getLogger(__name__)

BLOCKS = ("gpt2", "xlnet", "bert", "albert", "roberta", "electra", "sasrec", "gru", "lstm")
HF_BLOCKS = ("gpt2", "xlnet", "bert", "albert", "roberta", "electra")
CAUSAL_ONLY = ("gpt2", "sasrec", "gru", "lstm")
BIDIRECTIONAL_ONLY = ("bert", "albert", "roberta", "electra")
# xlnet is both: causal use and permutation LM go through ``perm_mask``.

_SASREC_LAYER_NORM_EPS = 1e-8  # SASRec.pytorch's value


# --------------------------------------------------------------------------- pure helpers


def _sasrec_attention_mask(mask: Tensor) -> Tensor:
    """Bool ``[B, 1, L, L]``, True where query ``i`` may attend key ``j``.

    Causal and key padding masked; the diagonal is always allowed so that a
    query with no real key before it (a padded query of an empty row) still
    has one key and scaled-dot-product attention gives no NaN.
    """
    length = mask.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=mask.device)  # [L, L]
    past = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()  # [L, L]
    allowed = (past[None] & mask[:, None, :]) | eye[None]  # [B, L, L]
    return allowed[:, None]  # [B, 1, L, L]


# --------------------------------------------------------------------------- SASRec leaves


class _SelfAttention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        b, length, d = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.n_heads, d // self.n_heads)  # [B,L,3,H,Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, Dh]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # [B,H,L,Dh]
        y = y.transpose(1, 2).reshape(b, length, d)  # [B, L, D]
        return self.resid_dropout(self.proj(y))


def _feed_forward(d_model: int, d_ff: int, dropout: float) -> nn.Sequential:
    """Point-wise feed-forward: Linear -> GELU -> dropout -> Linear -> dropout."""
    return nn.Sequential(
        nn.Linear(d_model, d_ff),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(d_ff, d_model),
        nn.Dropout(dropout),
    )


class _SASRecLayer(nn.Module):
    """One pre-LN layer: ``x + MHA(LN(x))`` then ``x + FFN(LN(x))``, padding zeroed.

    SASRec.pytorch adds the attention output to the *normalised* query
    (``q = LN(x); x = q + MHA(q, x, x)``); we use the standard pre-LN residual,
    which keeps an un-normalised identity path through the stack (the final
    LayerNorm of the block normalises the sum).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model, eps=eps)
        self.attn = _SelfAttention(d_model, n_heads, dropout)
        self.ln_ff = nn.LayerNorm(d_model, eps=eps)
        self.ff = _feed_forward(d_model, d_ff, dropout)

    def forward(self, x: Tensor, allowed: Tensor, keep: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x), allowed)  # [B, L, D]
        x = x + self.ff(self.ln_ff(x))  # [B, L, D]
        return x * keep  # keep: [B, L, 1]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class BlockConfig:
    """Config of one sequence block.

    Attributes:
        name: one of :data:`BLOCKS`.
        d_model: width of the input and output (``D``).
        n_layers: number of layers (transformer layers or stacked RNN layers).
        n_heads: attention heads; ``d_model % n_heads == 0``. Ignored by gru/lstm.
        d_ff: feed-forward width; ``None`` means ``4 * d_model``. Ignored by gru/lstm.
        dropout: put on every dropout field of the HF config (hidden, attention,
            embedding, summary/classifier ones that the base model does not use);
            for SASRec on embeddings, attention, residuals and feed-forward; for
            gru/lstm between stacked layers.
        max_len: the longest sequence the block accepts; sizes position embeddings.
        layer_norm_eps: ``None`` keeps each block's own default (HF class default,
            1e-8 for SASRec). Ignored by gru/lstm.
        hf: extra fields of the HF config class (e.g. ``{"hidden_act": "relu"}``);
            fields that the other attributes set (or that we pin, like
            ``vocab_size``) are refused. Must be empty for non-HF blocks.

    >>> BlockConfig.from_dict({"name": "bert", "hf": {"hidden_act": "relu"}}).hf
    {'hidden_act': 'relu'}
    >>> BlockConfig(name="bret")
    Traceback (most recent call last):
    ...
    model.config_base.ConfigError: BlockConfig.name: unknown block 'bret' (did you mean 'bert'?); valid names: gpt2, xlnet, bert, albert, roberta, electra, sasrec, gru, lstm
    """

    name: str
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int | None = None
    dropout: float = 0.1
    max_len: int = 200
    layer_norm_eps: float | None = None
    hf: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in BLOCKS:
            close = difflib.get_close_matches(str(self.name), BLOCKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"BlockConfig.name: unknown block {self.name!r}{hint}; "
                f"valid names: {', '.join(BLOCKS)}"
            )
        for key in ("d_model", "n_layers", "n_heads", "max_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"BlockConfig.{key} must be a positive int, got {value!r}")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise ConfigError(f"BlockConfig.d_ff must be a positive int or None, got {self.d_ff!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"BlockConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.layer_norm_eps is not None and not self.layer_norm_eps > 0:
            raise ConfigError(
                f"BlockConfig.layer_norm_eps must be > 0 or None, got {self.layer_norm_eps!r}"
            )
        if self.name not in ("gru", "lstm") and self.d_model % self.n_heads:
            raise ConfigError(
                f"BlockConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick n_heads that divides d_model"
            )
        if not isinstance(self.hf, Mapping):
            raise ConfigError(f"BlockConfig.hf must be a mapping, got {type(self.hf).__name__}")
        # A defensive copy: the config is frozen, the caller's dict is not.
        object.__setattr__(self, "hf", dict(self.hf))
        if self.name in HF_BLOCKS:
            # Imported here, like transformers (by _hf_specs), and not with the module:
            # SASRec/GRU/LSTM models and settings-only commands never load them.
            from huggingface_hub.errors import StrictDataclassError

            _check_hf_keys(self)
            try:
                hf_config(self)
            except (StrictDataclassError, TypeError, ValueError) as e:
                raise ConfigError(f"BlockConfig.hf: {self.name} config rejected it: {e}") from None
        elif self.hf:
            raise ConfigError(
                f"BlockConfig.hf is only for Hugging Face blocks ({', '.join(HF_BLOCKS)}); "
                f"{self.name!r} got {sorted(self.hf)}: remove it"
            )

    @property
    def ff_dim(self) -> int:
        """The feed-forward width actually used: ``d_ff`` or ``4 * d_model``."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlockConfig:
        """Build from a plain dict (JSON); unknown keys raise :class:`ConfigError`."""
        return from_dict(cls, d)


# BlockConfig attributes, in the order of _HFSpec.names.
_MAPPED = ("d_model", "n_layers", "n_heads", "ff_dim")


@dataclass(frozen=True)
class _HFSpec:
    """How :class:`BlockConfig` maps onto one HF model: classes, field names, pinned values."""

    config_cls: type[transformers.PreTrainedConfig]
    model_cls: type[transformers.PreTrainedModel]
    names: tuple[str, str, str, str]  # HF fields of the _MAPPED attributes
    eps_field: str
    dropouts: tuple[str, ...]  # every dropout field of the config class
    positions: str | None  # field sized from max_len + position_offset; None: relative
    pinned: Mapping[str, Any]
    position_offset: int = 0
    pooler: bool = True  # the constructor takes add_pooling_layer (we pass False)
    embedding_size: bool = False  # has an embedding_size field (ALBERT, ELECTRA): d_model
    unused: tuple[str, ...] = ("embeddings.word_embeddings.weight",)  # frozen parameters


# Word embeddings are never used (we pass inputs_embeds): vocab_size 2 keeps them
# tiny and still holds the pad ids 0 (BERT family) and 1 (RoBERTa). No special
# tokens; no KV cache or XLNet mems (nothing is kept between calls); causality is
# the block kind's business, never a config flag (is_decoder, attn_type). ALBERT
# and ELECTRA project embedding_size -> hidden_size: both are d_model.
_NO_TOKENS = {"vocab_size": 2, "bos_token_id": None, "eos_token_id": None}
_ENCODER = {**_NO_TOKENS, "is_decoder": False, "use_cache": False, "add_cross_attention": False}
_BERT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_BERT_DROP = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
_POS = "max_position_embeddings"


@functools.cache
def _hf_specs() -> dict[str, _HFSpec]:
    """The spec of every HF block; the first call imports ``transformers`` (~3 s)."""
    import transformers as hf

    # fmt: off
    return {
        "gpt2": _HFSpec(
            hf.GPT2Config, hf.GPT2Model, ("n_embd", "n_layer", "n_head", "n_inner"),
            "layer_norm_epsilon",
            ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"),
            "n_positions", {**_NO_TOKENS, "pad_token_id": None, "use_cache": False},
            pooler=False, unused=("wte.weight",),
        ),
        "xlnet": _HFSpec(
            hf.XLNetConfig, hf.XLNetModel, ("d_model", "n_layer", "n_head", "d_inner"),
            "layer_norm_eps", ("dropout", "summary_last_dropout"), None,
            # "bi" + a causal perm_mask is leak-free; "uni" + perm_mask crashes in HF.
            # d_head None: derived as d_model // n_head.
            {**_NO_TOKENS, "pad_token_id": None, "d_head": None, "attn_type": "bi",
             "mem_len": None, "use_mems_eval": False, "use_mems_train": False},
            pooler=False,
            # mask_emb serves the query stream (target_mapping), seg_embed and r_s_bias
            # token_type_ids: we pass neither.
            unused=("word_embedding.weight", "mask_emb", "r_s_bias", "seg_embed"),
        ),
        "bert": _HFSpec(
            hf.BertConfig, hf.BertModel, _BERT, "layer_norm_eps", _BERT_DROP, _POS,
            {**_ENCODER, "pad_token_id": 0},
        ),
        "albert": _HFSpec(
            hf.AlbertConfig, hf.AlbertModel, _BERT, "layer_norm_eps",
            ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"),
            _POS, {**_NO_TOKENS, "pad_token_id": 0}, embedding_size=True,
        ),
        "roberta": _HFSpec(
            hf.RobertaConfig, hf.RobertaModel, _BERT, "layer_norm_eps", _BERT_DROP, _POS,
            {**_ENCODER, "pad_token_id": 1},
            position_offset=2,  # positions start at pad_token_id + 1 = 2
        ),
        "electra": _HFSpec(
            hf.ElectraConfig, hf.ElectraModel, _BERT, "layer_norm_eps",
            (*_BERT_DROP, "summary_last_dropout"), _POS, {**_ENCODER, "pad_token_id": 0},
            pooler=False, embedding_size=True,
        ),
    }
    # fmt: on


def _managed_keys(spec: _HFSpec) -> set[str]:
    """HF fields that BlockConfig's own attributes set, or that we pin."""
    keys = {*spec.names, spec.eps_field, *spec.dropouts, *spec.pinned}
    keys |= {"embedding_size"} if spec.embedding_size else set()
    return keys | ({spec.positions} if spec.positions else set())


def _model_fields(config_cls: type[transformers.PreTrainedConfig]) -> list[str]:
    """The model-specific fields of an HF config class (the base class's are not ours to set)."""
    import transformers

    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    return [f.name for f in dataclasses.fields(config_cls) if f.name not in base]


def _check_hf_keys(cfg: BlockConfig) -> None:
    spec = _hf_specs()[cfg.name]
    valid = _model_fields(spec.config_cls)
    managed = _managed_keys(spec)
    for key in cfg.hf:
        if key in managed:
            raise ConfigError(
                f"BlockConfig.hf: {key!r} of {spec.config_cls.__name__} is set by BlockConfig "
                "(from d_model, n_layers, n_heads, d_ff, dropout, max_len, layer_norm_eps, or "
                "pinned); set the BlockConfig field instead"
            )
        if key not in valid:
            settable = [k for k in valid if k not in managed]
            close = difflib.get_close_matches(str(key), settable, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"BlockConfig.hf: {key!r} is not a field of {spec.config_cls.__name__}{hint}; "
                f"settable fields: {', '.join(settable)}"
            )


def hf_config_kwargs(cfg: BlockConfig) -> dict[str, Any]:
    """The keyword arguments :func:`hf_config` passes to the HF config class.

    >>> kw = hf_config_kwargs(BlockConfig(name="gpt2", d_model=16, n_heads=4, max_len=8))
    >>> kw["n_embd"], kw["n_head"], kw["n_inner"], kw["n_positions"], kw["attn_pdrop"]
    (16, 4, 64, 8, 0.1)
    """
    if cfg.name not in HF_BLOCKS:
        raise ValueError(f"{cfg.name!r} is not a Hugging Face block ({', '.join(HF_BLOCKS)})")
    spec = _hf_specs()[cfg.name]
    kwargs: dict[str, Any] = dict(spec.pinned)
    kwargs.update({key: getattr(cfg, attr) for key, attr in zip(spec.names, _MAPPED, strict=True)})
    if spec.embedding_size:
        kwargs["embedding_size"] = cfg.d_model
    kwargs.update(dict.fromkeys(spec.dropouts, cfg.dropout))
    if spec.positions:
        kwargs[spec.positions] = cfg.max_len + spec.position_offset
    if cfg.layer_norm_eps is not None:
        kwargs[spec.eps_field] = cfg.layer_norm_eps
    kwargs.update(cfg.hf)
    return kwargs


def hf_config(cfg: BlockConfig) -> transformers.PreTrainedConfig:
    """The HF config object built for an HF block (no tensors, cheap)."""
    return _hf_specs()[cfg.name].config_cls(**hf_config_kwargs(cfg))


# --------------------------------------------------------------------------- blocks


class SequenceBlock(nn.Module):
    """Base of every block: checks the call, then runs the block's own ``_encode``.

    ``forward(x [B, L, D], mask [B, L] bool, *, causal, perm_mask=None) -> [B, L, D]``.
    ``perm_mask`` (float ``[B, L, L]``, 1.0 where query ``i`` may not attend key
    ``j``) is for XLNet only; causal XLNet needs :func:`causal_perm_mask`.
    """

    config: BlockConfig

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        self.config = config

    def forward(
        self, x: Tensor, mask: Tensor, *, causal: bool, perm_mask: Tensor | None = None
    ) -> Tensor:
        _check_call(self.config, x, mask, causal, perm_mask)
        return self._encode(x, mask, causal=causal, perm_mask=perm_mask)

    def _encode(self, x: Tensor, mask: Tensor, *, causal: bool, perm_mask: Tensor | None) -> Tensor:
        raise NotImplementedError


def _check_call(
    cfg: BlockConfig, x: Tensor, mask: Tensor, causal: bool, perm_mask: Tensor | None
) -> None:
    """Shapes, dtypes, devices and causal/perm_mask combinations; raises ValueError."""
    name = cfg.name
    if x.dim() != 3 or not x.is_floating_point() or x.shape[-1] != cfg.d_model:
        raise ValueError(
            f"{name}: x must be a float [B, L, D={cfg.d_model}] tensor, "
            f"got {tuple(x.shape)} {x.dtype}"
        )
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{name}: mask must be a bool [B, L] = {tuple(x.shape[:2])} tensor, "
            f"got {tuple(mask.shape)} {mask.dtype}"
        )
    if mask.device != x.device:
        raise ValueError(f"{name}: mask is on {mask.device}, x on {x.device}; move them together")
    if x.shape[1] > cfg.max_len:
        raise ValueError(
            f"{name}: sequence length {x.shape[1]} > max_len={cfg.max_len}; "
            "truncate sessions in the collator or raise max_len"
        )
    if causal and name in BIDIRECTIONAL_ONLY:
        raise ValueError(
            f"{name} is bidirectional: causal=True is not supported; "
            "use gpt2, xlnet, sasrec, gru or lstm for causal (next-item) training"
        )
    if not causal and name in CAUSAL_ONLY:
        raise ValueError(f"{name} is causal only: call it with causal=True")
    if perm_mask is not None:
        if name != "xlnet":
            raise ValueError(f"perm_mask is for xlnet only, {name} got one: drop it")
        b, length = x.shape[:2]
        if tuple(perm_mask.shape) != (b, length, length):
            raise ValueError(
                f"xlnet: perm_mask must be [B, L, L] = {(b, length, length)}, "
                f"got {tuple(perm_mask.shape)}"
            )
        if perm_mask.device != x.device:
            raise ValueError(f"xlnet: perm_mask is on {perm_mask.device}, x on {x.device}")
    elif name == "xlnet" and causal:
        raise ValueError(
            "xlnet with causal=True needs perm_mask=causal_perm_mask(mask): XLNet's "
            "default attention lets a position see later ones"
        )


class HFBlock(SequenceBlock):
    """A Hugging Face base model driven through ``inputs_embeds``.

    Padding goes in as ``attention_mask``. Attention runs on SDPA where the model
    has it: HF 5.23 builds the causal/padding masks itself for both SDPA and
    eager and the two agree at real positions (tested); rows with no real key
    stay finite with either. SDPA is the fused kernel on GPU. XLNet has eager only.
    """

    def __init__(self, config: BlockConfig) -> None:
        super().__init__(config)
        spec = _hf_specs()[config.name]
        kwargs = {"add_pooling_layer": False} if spec.pooler else {}
        self.model = spec.model_cls(hf_config(config), **kwargs)
        if spec.model_cls._supports_sdpa:  # not XLNet: its own attention code only
            self.model.set_attn_implementation("sdpa")
        # Unused parameters get no gradient; freezing them keeps optimisers and
        # DDP (unused-parameter detection) quiet.
        for pname, param in self.model.named_parameters():
            if any(pname == u or pname.endswith("." + u) for u in spec.unused):
                param.requires_grad_(False)

    def _encode(self, x: Tensor, mask: Tensor, *, causal: bool, perm_mask: Tensor | None) -> Tensor:
        if self.config.name != "xlnet":
            out = self.model(inputs_embeds=x, attention_mask=mask.long())
            return out.last_hidden_state  # [B, L, D]
        if perm_mask is not None:
            perm_mask = perm_mask.to(x.dtype)
            if causal:
                # Guarantee the promise even for a hand-made mask: OR-in the future.
                length = x.shape[1]
                future = torch.ones(length, length, device=x.device, dtype=x.dtype).triu(1)
                perm_mask = torch.maximum(perm_mask, future[None])  # [B, L, L]
        out = self.model(inputs_embeds=x, attention_mask=mask.to(x.dtype), perm_mask=perm_mask)
        return out.last_hidden_state  # [B, L, D]


class SASRecBlock(SequenceBlock):
    """SASRec (Kang & McAuley, ICDM'18): causal pre-LN self-attention.

    Learned absolute positions are added to ``x``; ``x`` is *not* multiplied by
    ``sqrt(D)`` as in SASRec.pytorch (its item table is initialised small; here
    the input block owns the embedding scale). Embedding dropout, then
    ``n_layers`` of :class:`_SASRecLayer` with padding zeroed after each, then a
    final LayerNorm.
    """

    def __init__(self, config: BlockConfig) -> None:
        super().__init__(config)
        d = config.d_model
        eps = config.layer_norm_eps or _SASREC_LAYER_NORM_EPS
        self.positions = nn.Embedding(config.max_len, d)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            _SASRecLayer(d, config.n_heads, config.ff_dim, config.dropout, eps)
            for _ in range(config.n_layers)
        )
        self.ln_final = nn.LayerNorm(d, eps=eps)
        nn.init.normal_(self.positions.weight, std=1.0 / math.sqrt(d))

    def _encode(self, x: Tensor, mask: Tensor, *, causal: bool, perm_mask: Tensor | None) -> Tensor:
        length = x.shape[1]
        keep = mask[:, :, None].to(x.dtype)  # [B, L, 1]
        pos = self.positions(torch.arange(length, device=x.device))  # [L, D]
        h = self.emb_dropout(x + pos[None]) * keep  # [B, L, D]
        allowed = _sasrec_attention_mask(mask)  # [B, 1, L, L]
        for layer in self.layers:
            h = layer(h, allowed, keep)  # [B, L, D]
        return self.ln_final(h)


class RNNBlock(SequenceBlock):
    """GRU or LSTM, ``batch_first``, hidden size ``d_model``, dropout between layers.

    No packing: with right padding a unidirectional RNN's outputs at real
    positions never depend on the padding after them (tested).
    """

    def __init__(self, config: BlockConfig) -> None:
        super().__init__(config)
        rnn_cls = nn.GRU if config.name == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            input_size=config.d_model,
            hidden_size=config.d_model,
            num_layers=config.n_layers,
            batch_first=True,
            # torch warns about (and ignores) dropout with a single layer
            dropout=config.dropout if config.n_layers > 1 else 0.0,
        )

    def _encode(self, x: Tensor, mask: Tensor, *, causal: bool, perm_mask: Tensor | None) -> Tensor:
        out, _ = self.rnn(x)  # [B, L, D]
        return out


def build_block(cfg: BlockConfig) -> SequenceBlock:
    """The block named by ``cfg.name``, freshly initialised (seed with ``torch.manual_seed``).

    >>> type(build_block(BlockConfig(name="sasrec", d_model=8, n_layers=1))).__name__
    'SASRecBlock'
    """
    if cfg.name in HF_BLOCKS:
        block: SequenceBlock = HFBlock(cfg)
    elif cfg.name == "sasrec":
        block = SASRecBlock(cfg)
    else:
        block = RNNBlock(cfg)
    n_params = sum(p.numel() for p in block.parameters() if p.requires_grad)
    logger.debug("built %s block with %d trainable parameters", cfg.name, n_params)
    return block
