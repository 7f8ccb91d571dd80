"""IntTower (CIKM'22) and the plain two-tower DSSM baseline, sharing one tower.

A *tower* turns one side's features into a vector: sparse ids ``[B]``, dense
values ``[B]`` and variable-length id lists ``[B, S]`` (right-padded with id 0,
pooled by mean, sum or max over the real ids only) are embedded to ``E`` each,
stacked to ``[B, F, E]``, optionally re-weighted by **LightSE** (a per-example
softmax over the fields), flattened and fed through an MLP.

- **DSSM**: score = ``<user last layer, item last layer>``.
- **IntTower**: the **FE-Block** projects every MLP layer's output into head
  vectors, ``u[l, h]`` (user) and ``v[l, h']`` (item); the fine-grained early
  interaction score is ``sum_l sum_h max_h' <u[l, h], v[l, h']>``. Training adds
  **CIR** (contrastive interaction regularisation): InfoNCE between the last
  layers of the towers over the positive pairs of the batch, in-batch items as
  negatives and the matching pair on the diagonal.

Both models represent each side as head vectors ``[B, L, H, d]`` (DSSM: one
layer, one head, the last layer itself), so scoring, the pre-ranker index
(:mod:`model.preranker`) and save/load are shared. The click probability is
``sigmoid(exp(log_scale) * score + bias)``, a learned positive scale, so the
order of the raw scores is the order of the probabilities. Design notes:
``docs/inttower.md``.

>>> user = TowerConfig(fields=(FieldConfig("gender", "sparse", cardinality=5),
...                            FieldConfig("history", "sequence", cardinality=20)), hidden=(8, 4))
>>> item = TowerConfig(fields=(FieldConfig("item_id", "sparse", cardinality=20),), hidden=(8, 4))
>>> model = build_two_tower(TwoTowerConfig(user=user, item=item, head_dim=4))
>>> u = {"gender": torch.tensor([3, 4]), "history": torch.tensor([[5, 6], [7, 0]])}
>>> out = model(u, {"item_id": torch.tensor([9, 10])}, torch.tensor([1.0, 0.0]))
>>> out.logits.shape, out.loss.shape, model.user_heads(u).shape  # [B, L, H, d]
(torch.Size([2]), torch.Size([]), torch.Size([2, 2, 2, 4]))
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from model.config_base import ConfigError, from_dict, to_dict
from model.versiondir import new_version_dir, utc_stamp

__all__ = [
    "DSSM", "FORMAT", "FieldConfig", "IntTower", "LightSE", "Tower", "TowerConfig",
    "TwoTowerConfig", "TwoTowerModel", "TwoTowerOutput", "TwoTowerVersion", "build_two_tower",
    "catalogue_scores", "cir_loss", "index_layout", "load_two_tower", "paired_scores", "pool_sequence",
    "save_two_tower",
]

logger = logging.getLogger(__name__)

FORMAT = "streamrec.two_tower/1"
CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE = "config.json", "model.safetensors", "metrics.json"
FIELD_KINDS = ("sparse", "dense", "sequence")
POOLINGS = ("mean", "sum", "max")
MODEL_KINDS = ("inttower", "dssm")


# --- pure functions ----------------------------------------------------------------------------


def pool_sequence(emb: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Pool ``[B, S, E]`` over the real positions of ``mask`` ``[B, S]`` -> ``[B, E]``.

    Padded positions never matter; an empty row pools to zeros.

    >>> emb = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]])
    >>> mask = torch.tensor([[True, True, False], [False, False, False]])
    >>> [pool_sequence(emb, mask, p)[:, 0].tolist() for p in POOLINGS]
    [[2.0, 0.0], [4.0, 0.0], [3.0, 0.0]]
    """
    m = mask[..., None]  # [B, S, 1]
    if pooling == "max":
        best = emb.masked_fill(~m, float("-inf")).max(dim=1).values  # [B, E]
        return torch.where(mask.any(dim=1, keepdim=True), best, 0.0)
    total = (emb * m).sum(dim=1)  # [B, E]; * not masked_fill: NaN-free for finite emb
    if pooling == "sum":
        return total
    return total / mask.sum(dim=1, keepdim=True).clamp_min(1).to(emb.dtype)  # [B, E]


def paired_scores(user_heads: Tensor, item_heads: Tensor) -> Tensor:
    """Score of each (user b, item b) pair: ``sum_l sum_h max_h' <u[b,l,h], v[b,l,h']>``.

    ``[B, L, H, d]`` and ``[B, L, H', d]`` -> ``[B]``.

    >>> u = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # L=1, H=2, d=2
    >>> v = torch.tensor([[[[2.0, 1.0], [-1.0, 3.0]]]])  # H'=2
    >>> paired_scores(u, v)  # max(2, -1) + max(1, 3)
    tensor([5.])
    """
    dots = torch.einsum("blhd,blkd->blhk", user_heads, item_heads)  # [B, L, H, H']
    return dots.max(dim=-1).values.sum(dim=(1, 2))  # [B]


def index_layout(item_heads: Tensor) -> Tensor:
    """Item heads ``[N, L, H', d]`` -> the search layout ``[L, H', d, N]`` (contiguous).

    With the items last, each ``(layer, head)`` block is a ``[d, N]`` matrix that a
    query multiplies in one well-shaped product (about 2.5x faster on CPU than
    ``[N, d]`` rows), and a chunk of items is a plain slice.
    """
    return item_heads.permute(1, 2, 3, 0).contiguous()


def catalogue_scores(user_heads: Tensor, item_index: Tensor) -> Tensor:
    """Score of every user against every item -> ``[B, N]``.

    ``user_heads`` ``[B, L, H, d]``; ``item_index`` ``[L, H', d, N]``
    (:func:`index_layout`). Memory ``O(B * H * N)``, so callers chunk ``N``.

    >>> u, v = torch.randn(3, 2, 2, 4), torch.randn(5, 2, 3, 4)  # v: [N, L, H', d]
    >>> full = catalogue_scores(u, index_layout(v))
    >>> bool(torch.allclose(full[1, 4], paired_scores(u[1:2], v[4:5])[0], atol=1e-6))
    True
    """
    b, n_layers, h, d = user_heads.shape
    _, k, _, n = item_index.shape
    out = user_heads.new_zeros(b, n)  # [B, N]
    for layer in range(n_layers):
        u = user_heads[:, layer].reshape(b * h, d)  # [B*H, d]
        best = u @ item_index[layer, 0]  # [B*H, N]
        for head in range(1, k):
            best = torch.maximum(best, u @ item_index[layer, head])  # max over item heads
        out += best.view(b, h, n).sum(dim=1)  # [B, N]: sum over user heads
    return out


def cir_loss(user_vecs: Tensor, item_vecs: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Contrastive interaction regularisation: InfoNCE over the positive pairs of a batch.

    Rows with ``labels == 1`` give ``P`` (user, item) pairs; both sides are
    L2-normalised, ``sim = u @ v.T / temperature`` is ``[P, P]``, and the loss is
    the cross-entropy of each row with its own item, **the diagonal**, as target
    (other rows' items are the negatives). Fewer than two positives: 0.

    >>> u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    >>> v = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 9.0]])  # row 2 is a negative: unused
    >>> round(float(cir_loss(u, v, torch.tensor([1.0, 1.0, 0.0]), 1.0)), 4)  # log(1 + e^-1)
    0.3133
    """
    pos = labels > 0.5  # [B]
    if int(pos.sum()) < 2:
        return user_vecs.sum() * 0.0 + item_vecs.sum() * 0.0  # keeps the graph, no NaN
    u = F.normalize(user_vecs[pos], dim=-1)  # [P, D]
    v = F.normalize(item_vecs[pos], dim=-1)  # [P, D]
    sim = u @ v.T / temperature  # [P, P]
    return F.cross_entropy(sim, torch.arange(sim.shape[0], device=sim.device))


# --- configs -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldConfig:
    """One input field of a tower.

    Fields:
        name: the key of the feature in the input dict.
        kind: ``"sparse"`` (int64 ``[B]``), ``"dense"`` (float ``[B]``, 0.0 = missing /
            mean) or ``"sequence"`` (int64 ``[B, S]``, right-padded with 0).
        cardinality: ids ``0 .. cardinality - 1`` (0 padding, 1 missing, 2 OOV, then
            values); sparse and sequence only.
        pooling: ``"mean"``, ``"sum"`` or ``"max"``; sequence only.
    """

    name: str
    kind: str
    cardinality: int = 0
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.kind not in FIELD_KINDS:
            raise ConfigError(f"field {self.name!r}: kind {self.kind!r} not in {FIELD_KINDS}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"field {self.name!r}: pooling {self.pooling!r} not in {POOLINGS}")
        if self.kind == "dense" and self.cardinality != 0:
            raise ConfigError(f"field {self.name!r}: a dense field has no cardinality; drop it")
        if self.kind != "dense" and (not isinstance(self.cardinality, int) or self.cardinality < 2):
            raise ConfigError(f"field {self.name!r}: set cardinality (number of ids, >= 2) "
                              f"from the fitted vocabulary, got {self.cardinality!r}")


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One tower: its fields and MLP.

    Fields:
        fields: the input fields, in order; names unique.
        hidden: widths of the MLP layers (the last one has no activation).
        dropout: dropout after every hidden activation.
        lightse: re-weight the fields with :class:`LightSE` before the MLP.
    """

    fields: tuple[FieldConfig, ...]
    hidden: tuple[int, ...] = (128, 64, 32)
    dropout: float = 0.0
    lightse: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "hidden", tuple(self.hidden))
        names = [f.name for f in self.fields]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"a tower needs at least one field, names unique; got {names}")
        if not self.hidden or any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError(f"hidden must be positive layer widths, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TowerConfig:
        data = dict(data)
        data["fields"] = tuple(from_dict(FieldConfig, f) for f in data.get("fields", ()))
        return from_dict(cls, data)


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    """An IntTower or DSSM model.

    Fields:
        user, item: the towers. IntTower pairs layer ``l`` of one with layer ``l`` of
            the other, so both need as many layers; DSSM needs equal last widths.
        kind: ``"inttower"`` or ``"dssm"``.
        embedding_dim: width ``E`` of every field embedding.
        user_heads, item_heads, head_dim: FE-Block heads per layer and their width.
        normalize_heads: L2-normalise every FE-Block head (scores bounded by ``L * H``;
            the learned scale restores the range). IntTower only. Off by default: the
            norm of an item's heads carries its popularity, which retrieval needs.
        cir_weight: weight of the CIR loss added to the BCE loss (0 disables it).
        cir_temperature: the InfoNCE temperature ``tau``.
    """

    user: TowerConfig
    item: TowerConfig
    kind: str = "inttower"
    embedding_dim: int = 16
    user_heads: int = 2
    item_heads: int = 2
    head_dim: int = 16
    normalize_heads: bool = False
    cir_weight: float = 0.1
    cir_temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"kind {self.kind!r} not in {MODEL_KINDS}")
        for name in ("embedding_dim", "user_heads", "item_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.cir_weight < 0 or self.cir_temperature <= 0:
            raise ConfigError("cir_weight must be >= 0 and cir_temperature > 0")
        u, i = self.user.hidden, self.item.hidden
        if self.kind == "inttower" and len(u) != len(i):
            raise ConfigError(f"IntTower pairs layers: user hidden {u} and item hidden {i} "
                              "need the same number of layers")
        if u[-1] != i[-1]:
            raise ConfigError(f"the last layers must have equal widths (dot product, CIR), "
                              f"got user {u[-1]} and item {i[-1]}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TwoTowerConfig:
        data = dict(data)
        for side in ("user", "item"):
            if side not in data:
                raise ConfigError(f"TwoTowerConfig: {side!r} (a tower config) is required")
            data[side] = TowerConfig.from_dict(data[side])
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --- modules -----------------------------------------------------------------------------------


class LightSE(nn.Module):
    """Light squeeze-excitation over fields: ``[B, F, E]`` -> (re-weighted ``[B, F, E]``, ``[B, F]``).

    ``weights = softmax_f(W z)`` with ``z[f]`` the mean of field ``f``'s embedding;
    the output is ``x + x * weights`` (residual, as in the authors' code).
    """

    def __init__(self, num_fields: int):
        super().__init__()
        self.excite = nn.Linear(num_fields, num_fields)

    def forward(self, fields: Tensor) -> tuple[Tensor, Tensor]:
        z = fields.mean(dim=-1)  # [B, F]: squeeze each field
        weights = torch.softmax(self.excite(z), dim=-1)  # [B, F]
        return fields + fields * weights[..., None], weights


class Tower(nn.Module):
    """Field embeddings -> (LightSE) -> MLP; returns every layer's output."""

    def __init__(self, config: TowerConfig, embedding_dim: int):
        super().__init__()
        self.config = config
        e = embedding_dim
        self.tables = nn.ModuleDict({f.name: nn.Embedding(f.cardinality, e, padding_idx=0)
                                     for f in config.fields if f.kind != "dense"})
        dense = [f.name for f in config.fields if f.kind == "dense"]
        self.dense_weight = nn.ParameterDict({n: nn.Parameter(torch.randn(e) * 0.1) for n in dense})
        self.dense_bias = nn.ParameterDict({n: nn.Parameter(torch.zeros(e)) for n in dense})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
            table.weight.data[0].zero_()
        self.lightse = LightSE(len(config.fields)) if config.lightse else None
        widths = (len(config.fields) * e, *config.hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.dropout = nn.Dropout(config.dropout)

    def _check(self, features: Mapping[str, Tensor]) -> None:
        names = {f.name for f in self.config.fields}
        if missing := names - set(features):
            raise KeyError(f"tower input lacks {sorted(missing)}; it needs {sorted(names)}")
        if extra := set(features) - names:
            raise ValueError(f"tower input has unknown features {sorted(extra)}; "
                             f"expected exactly {sorted(names)}")
        for f in self.config.fields:
            x = features[f.name]
            ndim = 2 if f.kind == "sequence" else 1
            if x.dim() != ndim or (x.dtype == torch.int64) == (f.kind == "dense"):
                raise ValueError(f"feature {f.name!r} ({f.kind}) must be "
                                 f"{'float' if f.kind == 'dense' else 'int64'} with {ndim} dims, "
                                 f"got {x.dtype} {tuple(x.shape)}")
            if f.kind != "dense" and x.numel() and (int(x.min()) < 0 or int(x.max()) >= f.cardinality):
                raise ValueError(f"feature {f.name!r}: ids must lie in [0, {f.cardinality}), got "
                                 f"[{int(x.min())}, {int(x.max())}]; encode with the fitted "
                                 "vocabulary (unseen values -> OOV id 2)")

    def embed(self, features: Mapping[str, Tensor]) -> Tensor:
        """``{name: [B] or [B, S]}`` -> ``[B, F, E]``, one embedding per field."""
        self._check(features)
        cols = []
        for f in self.config.fields:
            x = features[f.name]
            if f.kind == "dense":
                cols.append(x.float()[:, None] * self.dense_weight[f.name] + self.dense_bias[f.name])
            elif f.kind == "sparse":
                cols.append(self.tables[f.name](x))  # [B, E]
            else:
                cols.append(pool_sequence(self.tables[f.name](x), x != 0, f.pooling))  # [B, E]
        return torch.stack(cols, dim=1)  # [B, F, E]

    def forward(self, features: Mapping[str, Tensor]) -> tuple[list[Tensor], Tensor | None]:
        """``(layer outputs [B, D_l] for every layer, LightSE weights [B, F] or None)``."""
        fields = self.embed(features)  # [B, F, E]
        weights = None
        if self.lightse is not None:
            fields, weights = self.lightse(fields)
        x = fields.flatten(1)  # [B, F*E]
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.dropout(F.relu(x))
            outs.append(x)
        return outs, weights


@dataclasses.dataclass(frozen=True)
class TwoTowerOutput:
    """What :meth:`TwoTowerModel.forward` returns: logits ``[B]``, the loss and its parts,
    and the LightSE field weights of each side (``[B, F]`` or None)."""

    logits: Tensor
    loss: Tensor
    bce: Tensor
    cir: Tensor
    user_field_weights: Tensor | None
    item_field_weights: Tensor | None


class TwoTowerModel(nn.Module):
    """Towers, calibration and loss shared by :class:`IntTower` and :class:`DSSM`.

    Subclasses define :meth:`_heads` (tower outputs -> ``[B, L, H, d]``).
    """

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.config = config
        self.user_tower = Tower(config.user, config.embedding_dim)
        self.item_tower = Tower(config.item, config.embedding_dim)
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def _heads(self, side: str, layers: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def encode(self, side: str, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(heads [B, L, H, d], last layer [B, D], LightSE weights)`` of ``"user"`` / ``"item"``."""
        tower = self.user_tower if side == "user" else self.item_tower
        layers, weights = tower(features)
        return self._heads(side, layers), layers[-1], weights

    def user_heads(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.encode("user", features)[0]

    def item_heads(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.encode("item", features)[0]

    def calibrate(self, scores: Tensor) -> Tensor:
        """Interaction scores -> click logits (a positive scale keeps the order)."""
        return self.log_scale.exp() * scores + self.bias

    def logits(self, user: Mapping[str, Tensor], item: Mapping[str, Tensor]) -> Tensor:
        """``[B]`` click logits of the (user b, item b) pairs."""
        return self.calibrate(paired_scores(self.user_heads(user), self.item_heads(item)))

    def forward(self, user: Mapping[str, Tensor], item: Mapping[str, Tensor],
                labels: Tensor) -> TwoTowerOutput:
        """Training step: BCE on the pairs plus ``cir_weight *`` CIR on the positive pairs."""
        if labels.shape != (next(iter(user.values())).shape[0],):
            raise ValueError(f"labels must be [B] (0/1 per row), got {tuple(labels.shape)}")
        uh, ulast, uw = self.encode("user", user)
        ih, ilast, iw = self.encode("item", item)
        logits = self.calibrate(paired_scores(uh, ih))  # [B]
        bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        cfg = self.config
        cir = (cir_loss(ulast, ilast, labels, cfg.cir_temperature) if cfg.cir_weight > 0
               else bce.new_zeros(()))
        return TwoTowerOutput(logits, bce + cfg.cir_weight * cir, bce, cir, uw, iw)


class IntTower(TwoTowerModel):
    """IntTower: an FE-Block per tower layer projects it into heads (see the module doc)."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__(config)
        c = config
        self.fe = nn.ModuleDict({
            "user": nn.ModuleList(nn.Linear(w, c.user_heads * c.head_dim) for w in c.user.hidden),
            "item": nn.ModuleList(nn.Linear(w, c.item_heads * c.head_dim) for w in c.item.hidden),
        })

    def _heads(self, side: str, layers: list[Tensor]) -> Tensor:
        h = self.config.user_heads if side == "user" else self.config.item_heads
        heads = [proj(x).view(x.shape[0], h, self.config.head_dim)  # [B, H, d]
                 for proj, x in zip(self.fe[side], layers, strict=True)]
        out = torch.stack(heads, dim=1)  # [B, L, H, d]
        return F.normalize(out, dim=-1) if self.config.normalize_heads else out


class DSSM(TwoTowerModel):
    """Plain two-tower: the score is the dot product of the last layers (one layer, one head)."""

    def _heads(self, side: str, layers: list[Tensor]) -> Tensor:
        return layers[-1][:, None, None, :]  # [B, 1, 1, D]


def build_two_tower(config: TwoTowerConfig) -> TwoTowerModel:
    """The model ``config.kind`` names."""
    return IntTower(config) if config.kind == "inttower" else DSSM(config)


# --- versions ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TwoTowerVersion:
    """A loaded version: the model (eval mode), metrics, info, and extra tensor files by stem."""

    path: Path
    model: TwoTowerModel
    metrics: dict[str, Any]
    info: dict[str, Any]
    tensors: dict[str, dict[str, Tensor]]


def save_two_tower(directory: str | os.PathLike[str], model: TwoTowerModel,
                   metrics: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None,
                   tensors: Mapping[str, Mapping[str, Tensor]] | None = None) -> Path:
    """Write an immutable version directory (``config.json``, ``model.safetensors``, ...).

    ``info`` is free-form JSON (fitted encoders, data cut-off); ``tensors`` maps a
    file stem to tensors saved as ``<stem>.safetensors`` (the pre-ranker's index).
    Written under a temporary name and renamed into place; nothing is pickled.
    """
    target = Path(directory)
    with new_version_dir(target) as tmp:
        save_model(model, str(tmp / WEIGHTS_FILE))
        for stem, tensor_dict in (tensors or {}).items():
            if stem == "model":
                raise ValueError("tensor file stem 'model' is reserved for the weights")
            save_file({k: v.detach().contiguous().cpu() for k, v in tensor_dict.items()},
                      str(tmp / f"{stem}.safetensors"))
        doc = {"format": FORMAT, "model": model.config.to_dict(),
               "info": {"created": utc_stamp(), **dict(info or {})}}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        (tmp / METRICS_FILE).write_text(json.dumps(dict(metrics or {}), indent=1) + "\n")
    logger.info("saved two-tower version %s", target)
    return target


def load_two_tower(directory: str | os.PathLike[str],
                   device: torch.device | str = "cpu") -> TwoTowerVersion:
    """Read a version written by :func:`save_two_tower`; the model comes back in eval mode."""
    root = Path(directory)
    try:
        doc = json.loads((root / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: no {CONFIG_FILE}: not a two-tower version") from None
    if doc.get("format") != FORMAT:
        raise ValueError(f"{root}: format {doc.get('format')!r} is not {FORMAT!r}")
    model = build_two_tower(TwoTowerConfig.from_dict(doc["model"]))
    load_model(model, str(root / WEIGHTS_FILE), strict=True, device=str(device))
    model.to(device).eval()
    tensors = {p.stem: load_file(str(p), device=str(device))
               for p in sorted(root.glob("*.safetensors")) if p.name != WEIGHTS_FILE}
    metrics_path = root / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return TwoTowerVersion(root, model, metrics, doc["info"], tensors)
