"""Masking schemes of the Transformers4Rec meta-architecture, as pure functions.

A masking scheme decides, for a batch of right-padded item-id sequences, which
positions the model predicts (``targets``) and what it may see (``hidden``
inputs, causal attention, or XLNet's ``perm_mask``). Nothing here keeps state:
every function takes tensors (and an optional ``torch.Generator`` on the
inputs' device, for reproducible draws) and returns new tensors on that device.

- ``clm``: causal LM, predict the next item at every position (GPT-2, SASRec, RNNs).
- ``mlm``: masked LM, hide random items and predict them (BERT family, XLNet).
- ``plm``: XLNet's permutation LM with partial prediction.
- ``rtd``: ELECTRA's replaced token detection, on top of ``mlm`` (see
  :func:`sample_replacements` and :func:`rtd_corrupt`).

At inference the masked schemes predict the next item through an empty, hidden
slot after the last event (:func:`append_mask_slot`).

Id conventions (streamrec's feature pipeline): 0 = padding, 1 = missing,
2..first_item_id-1 = out-of-vocabulary buckets, then real items; ``mask`` is True
at real events and a prefix of each row.

>>> ids = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0]])
>>> clm(ids, ids > 0).targets
tensor([[6, 7, 0, 0],
        [0, 0, 0, 0]])
>>> mlm_last(ids, ids > 0).targets
tensor([[0, 0, 7, 0],
        [8, 0, 0, 0]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from model.config_base import ConfigError

__all__ = [
    "MASKINGS",
    "VALID_BLOCKS",
    "Masked",
    "append_mask_slot",
    "causal_perm_mask",
    "check_combination",
    "clm",
    "mlm",
    "mlm_last",
    "plm",
    "rtd_corrupt",
    "sample_replacements",
    "stochastic_shared_embeddings",
]

MASKINGS: tuple[str, ...] = ("clm", "mlm", "plm", "rtd")

_BIDIRECTIONAL = ("bert", "albert", "roberta", "electra", "xlnet")

VALID_BLOCKS: dict[str, tuple[str, ...]] = {
    "clm": ("gpt2", "xlnet", "sasrec", "gru", "lstm"),  # causal attention (or recurrence)
    "mlm": _BIDIRECTIONAL,  # bidirectional attention + [MASK] inputs
    "plm": ("xlnet",),  # needs XLNet's perm_mask
    "rtd": _BIDIRECTIONAL,  # MLM generator + ELECTRA discriminator
}


def check_combination(masking: str, block: str) -> None:
    """Raise :class:`ConfigError` unless ``masking`` can train the sequence ``block``.

    >>> check_combination("plm", "xlnet")
    >>> check_combination("plm", "bert")
    Traceback (most recent call last):
    ...
    model.config_base.ConfigError: masking 'plm' cannot be used with block 'bert'; valid blocks for 'plm': xlnet; block 'bert' works with masking mlm, rtd
    """
    if masking not in VALID_BLOCKS:
        raise ConfigError(f"unknown masking {masking!r}; choose one of: {', '.join(MASKINGS)}")
    valid = VALID_BLOCKS[masking]
    if block in valid:
        return
    usable = [m for m in MASKINGS if block in VALID_BLOCKS[m]]
    if usable:
        hint = f"block {block!r} works with masking {', '.join(usable)}"
    else:
        known = sorted({b for blocks in VALID_BLOCKS.values() for b in blocks})
        hint = f"block {block!r} works with no masking (known blocks: {', '.join(known)})"
    raise ConfigError(
        f"masking {masking!r} cannot be used with block {block!r}; "
        f"valid blocks for {masking!r}: {', '.join(valid)}; {hint}"
    )


@dataclass(frozen=True, eq=False)
class Masked:
    """What a masking scheme returns for one batch (all on the input's device).

    Attributes:
        targets: ``[B, L]`` int64, the item id to predict at each position; 0 = no
            prediction there.
        hidden: ``[B, L]`` bool, True where the input is hidden from the model (its
            input embedding is replaced by a learned [MASK] vector); all False for CLM.
        causal: True when each position may see only itself and earlier positions.
        perm_mask: ``[B, L, L]`` float32 for XLNet, 1.0 where query ``i`` may NOT
            attend key ``j`` (Hugging Face XLNet convention); None otherwise.
    """

    targets: Tensor
    hidden: Tensor
    causal: bool
    perm_mask: Tensor | None = None


# ---------------------------------------------------------------- input checks


def _check_mask(mask: Tensor) -> None:
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool [B, L] tensor, got {mask.dtype} of shape {tuple(mask.shape)}; "
            "build it as lengths-prefix mask in the collator"
        )
    if mask.shape[1] == 0:
        raise ValueError("sequences have length 0; the collator must pad to at least one position")
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "mask is not a prefix of each row; sequences must be right-padded (real events first)"
        )


def _check_batch(item_ids: Tensor, mask: Tensor) -> None:
    if item_ids.dim() != 2 or item_ids.dtype != torch.int64:
        raise ValueError(
            f"item_ids must be an int64 [B, L] tensor, got {item_ids.dtype} of shape "
            f"{tuple(item_ids.shape)}; cast it in the collator"
        )
    if mask.shape != item_ids.shape or mask.device != item_ids.device:
        raise ValueError(
            f"mask {tuple(mask.shape)} on {mask.device} does not match item_ids "
            f"{tuple(item_ids.shape)} on {item_ids.device}; pass the mask of the same batch"
        )
    _check_mask(mask)


def _check_probability(probability: float) -> None:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")


# ---------------------------------------------------------------- random helpers


def _uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) floats of ``like``'s shape, on its device."""
    return torch.rand(like.shape, generator=generator, device=like.device)


def _at_least_one(hidden: Tensor, mask: Tensor, generator: torch.Generator | None) -> Tensor:
    """``hidden`` plus one random real position in every non-empty row that has none."""
    batch, length = mask.shape
    lengths = mask.sum(1)  # [B]
    draw = torch.rand(batch, generator=generator, device=mask.device)  # [B]
    pick = (draw * lengths).long()  # [B] uniform in [0, length); 0 for empty rows
    pick = torch.minimum(pick, (lengths - 1).clamp(min=0))  # float rounding guard
    need = ~hidden.any(1) & (lengths > 0)  # [B]
    positions = torch.arange(length, device=mask.device)  # [L]
    extra = (positions[None, :] == pick[:, None]) & need[:, None]  # [B, L]
    return hidden | extra


# ---------------------------------------------------------------- training schemes


def clm(item_ids: Tensor, mask: Tensor) -> Masked:
    """Causal LM: at each position predict the next real item.

    >>> ids = torch.tensor([[3, 4, 5], [6, 0, 0]])
    >>> m = clm(ids, ids > 0)
    >>> m.targets, m.causal, bool(m.hidden.any())
    (tensor([[4, 5, 0],
            [0, 0, 0]]), True, False)
    """
    _check_batch(item_ids, mask)
    targets = torch.zeros_like(item_ids)  # [B, L]
    targets[:, :-1] = torch.where(mask[:, 1:], item_ids[:, 1:], 0)  # [B, L-1] shifted by one
    return Masked(targets=targets, hidden=torch.zeros_like(mask), causal=True)


def mlm(
    item_ids: Tensor,
    mask: Tensor,
    probability: float = 0.2,
    generator: torch.Generator | None = None,
) -> Masked:
    """Masked LM: hide each real position with ``probability`` and predict it.

    Every row with at least one event gets at least one hidden position.

    >>> ids = torch.tensor([[3, 4, 5, 6], [7, 0, 0, 0], [0, 0, 0, 0]])
    >>> m = mlm(ids, ids > 0, 0.5, torch.Generator().manual_seed(0))
    >>> m.hidden.sum(1).clamp(max=1)  # one or more per non-empty row, none in the empty one
    tensor([1, 1, 0])
    >>> bool(((m.targets != 0) == m.hidden).all()), bool((m.hidden <= (ids > 0)).all())
    (True, True)
    """
    _check_batch(item_ids, mask)
    _check_probability(probability)
    hidden = (_uniform(item_ids, generator) < probability) & mask  # [B, L]
    hidden = _at_least_one(hidden, mask, generator)
    targets = torch.where(hidden, item_ids, 0)  # [B, L]
    return Masked(targets=targets, hidden=hidden, causal=False)


def mlm_last(item_ids: Tensor, mask: Tensor) -> Masked:
    """Hide only the last real item of each row and predict it (T4Rec's last-item evaluation).

    >>> ids = torch.tensor([[3, 4, 0], [5, 6, 7]])
    >>> mlm_last(ids, ids > 0).hidden
    tensor([[False,  True, False],
            [False, False,  True]])
    """
    _check_batch(item_ids, mask)
    last = mask.sum(1) - 1  # [B]; -1 for empty rows, which matches no position
    positions = torch.arange(mask.shape[1], device=mask.device)  # [L]
    hidden = positions[None, :] == last[:, None]  # [B, L]
    targets = torch.where(hidden, item_ids, 0)  # [B, L]
    return Masked(targets=targets, hidden=hidden, causal=False)


def _span_start_rate(probability: float, max_span: int) -> float:
    """Rate of span starts so that a position is covered with ``probability``.

    A position is covered by a span starting ``k`` positions earlier with
    probability ``q * P(span > k)``, span lengths uniform in 1..max_span, starts
    independent; solve ``1 - prod_k (1 - q (max_span - k) / max_span) = probability``
    for ``q`` by bisection (coverage grows with ``q``).

    >>> round(_span_start_rate(0.2, 1), 6)
    0.2
    >>> 0.1 < _span_start_rate(0.2, 3) < 0.2
    True
    """

    def coverage(q: float) -> float:
        return 1.0 - math.prod(1.0 - q * (max_span - k) / max_span for k in range(max_span))

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if coverage(mid) < probability else (low, mid)
    return (low + high) / 2


def _span_targets(
    mask: Tensor, probability: float, max_span: int, generator: torch.Generator | None
) -> Tensor:
    """``[B, L]`` bool: real positions covered by random spans of 1..max_span positions."""
    batch, length = mask.shape
    width = length + max_span - 1  # starts may lie before position 0, so every position is
    # covered with the same probability (no edge effect at the start of a row)
    rate = _span_start_rate(probability, max_span)
    starts = torch.rand(batch, width, generator=generator, device=mask.device) < rate  # [B, W]
    spans = torch.randint(
        1, max_span + 1, (batch, width), generator=generator, device=mask.device
    )  # [B, W]
    spans = torch.where(starts, spans, 0)  # [B, W] span length at each start, 0 elsewhere
    covered = torch.zeros_like(mask)  # [B, L]
    offset = max_span - 1  # position t of the row is column t + offset of `spans`
    for k in range(max_span):  # covered by a span that started k positions earlier
        covered |= spans[:, offset - k : offset - k + length] > k  # [B, L]
    return covered & mask


def _factorisation_perm_mask(
    mask: Tensor, hidden: Tensor, generator: torch.Generator | None
) -> Tensor:
    """XLNet ``perm_mask`` of a random order: real non-targets, then targets, then padding."""
    # Sort key: random within each group, groups in [0, 1), [1, 2), [2, 3).
    key = _uniform(mask, generator) + hidden.float() + 2.0 * (~mask).float()  # [B, L]
    order = key.argsort(1).argsort(1)  # [B, L] rank of each position in the order
    sees = mask[:, None, :] & (order[:, None, :] < order[:, :, None])  # [B, L query, L key]
    return (~sees).float()  # [B, L, L]


def plm(
    item_ids: Tensor,
    mask: Tensor,
    probability: float = 0.2,
    max_span: int = 3,
    generator: torch.Generator | None = None,
) -> Masked:
    """XLNet permutation LM with partial prediction.

    Targets are spans of 1..``max_span`` consecutive real positions (lengths
    uniform), with span starts drawn so that each real position is a target with
    ``probability`` in expectation; every non-empty row gets at least one target.
    Targets are hidden. A random factorisation order per row puts all real
    non-targets first and the targets after them, each group in random order;
    ``perm_mask[b, i, j]`` is 0.0 iff key ``j`` is real and comes before ``i`` in
    that order. So nobody sees padding, non-targets never see targets, and a
    target sees neither itself nor later targets. Padding queries come last in the
    order (they see every real key; nothing is predicted there).

    >>> ids = torch.tensor([[3, 4, 5, 0]])
    >>> m = plm(ids, ids > 0, 0.3, 2, torch.Generator().manual_seed(0))
    >>> m.perm_mask.shape, bool(((m.targets != 0) == m.hidden).all())
    (torch.Size([1, 4, 4]), True)
    >>> m.perm_mask[0, :, 3]  # nobody sees the padding key
    tensor([1., 1., 1., 1.])
    """
    _check_batch(item_ids, mask)
    _check_probability(probability)
    if max_span < 1:
        raise ValueError(f"max_span must be >= 1, got {max_span}")
    hidden = _span_targets(mask, probability, max_span, generator)  # [B, L]
    hidden = _at_least_one(hidden, mask, generator)
    targets = torch.where(hidden, item_ids, 0)  # [B, L]
    perm_mask = _factorisation_perm_mask(mask, hidden, generator)  # [B, L, L]
    return Masked(targets=targets, hidden=hidden, causal=False, perm_mask=perm_mask)


def causal_perm_mask(mask: Tensor) -> Tensor:
    """``[B, L, L]`` float32 XLNet ``perm_mask`` for causal use: 1.0 where j > i or j is padding.

    >>> causal_perm_mask(torch.tensor([[True, True, False]]))
    tensor([[[0., 1., 1.],
             [0., 0., 1.],
             [0., 0., 1.]]])
    """
    _check_mask(mask)
    positions = torch.arange(mask.shape[1], device=mask.device)  # [L]
    future = positions[None, :] > positions[:, None]  # [L, L] key j after query i
    blocked = future[None, :, :] | ~mask[:, None, :]  # [B, L, L]
    return blocked.float()


# ---------------------------------------------------------------- replaced token detection


def sample_replacements(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one id per row from ``softmax(logits)`` (ELECTRA's generator samples), no gradient.

    >>> logits = torch.tensor([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0]])
    >>> sample_replacements(logits, torch.Generator().manual_seed(0))
    tensor([1, 0])
    """
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [N, V] with V >= 1, got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    probs = torch.softmax(logits.detach().float(), dim=-1)  # [N, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [N]


def rtd_corrupt(item_ids: Tensor, hidden: Tensor, replacements: Tensor) -> tuple[Tensor, Tensor]:
    """Put ``replacements`` at the hidden positions (row-major order, as ``item_ids[hidden]``).

    Returns ``(corrupted, replaced)``; a replacement equal to the original id is
    not "replaced" (ELECTRA's discriminator label).

    >>> ids = torch.tensor([[3, 4, 5], [6, 7, 0]])
    >>> hidden = torch.tensor([[True, False, True], [False, True, False]])
    >>> corrupted, replaced = rtd_corrupt(ids, hidden, torch.tensor([9, 5, 8]))
    >>> corrupted
    tensor([[9, 4, 5],
            [6, 8, 0]])
    >>> replaced
    tensor([[ True, False, False],
            [False,  True, False]])
    """
    if hidden.dtype != torch.bool or hidden.shape != item_ids.shape:
        raise ValueError(
            f"hidden must be a bool tensor shaped like item_ids {tuple(item_ids.shape)}, "
            f"got {hidden.dtype} {tuple(hidden.shape)}"
        )
    count = int(hidden.sum())
    if replacements.dim() != 1 or replacements.numel() != count:
        raise ValueError(
            f"need one replacement per hidden position ({count}), got shape "
            f"{tuple(replacements.shape)}; sample them for item_ids[hidden]"
        )
    corrupted = item_ids.masked_scatter(hidden, replacements.to(item_ids.dtype))  # [B, L]
    replaced = hidden & (corrupted != item_ids)  # [B, L]
    return corrupted, replaced


# ---------------------------------------------------------------- inference


def append_mask_slot(
    features: dict[str, Tensor], mask: Tensor
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """Add an empty, hidden slot right after each row's last event, to predict the next item.

    Full rows are first shifted left by one (the oldest event is dropped). Every
    feature (``[B, L]`` or ``[B, L, ...]``, any dtype) gets the same shift; the slot
    and the positions after it hold 0. Returns ``(features, mask, hidden, position)``:
    the new mask is True at the events and the slot, ``hidden`` only at the slot,
    ``position`` ``[B]`` is the slot's index (0 for rows without events).

    >>> ids = torch.tensor([[3, 4, 0], [5, 6, 7], [0, 0, 0]])
    >>> out, new_mask, hidden, position = append_mask_slot({"item": ids}, ids > 0)
    >>> out["item"]
    tensor([[3, 4, 0],
            [6, 7, 0],
            [0, 0, 0]])
    >>> position
    tensor([2, 2, 0])
    >>> new_mask.sum(1)
    tensor([3, 3, 1])
    """
    _check_mask(mask)
    batch, length = mask.shape
    lengths = mask.sum(1)  # [B]
    full = (lengths == length).long()  # [B] 1 for rows that must drop their oldest event
    position = lengths - full  # [B] slot index = number of kept events
    positions = torch.arange(length, device=mask.device)  # [L]
    source = (positions[None, :] + full[:, None]).clamp(max=length - 1)  # [B, L] gather index
    keep = positions[None, :] < position[:, None]  # [B, L] kept events
    shifted: dict[str, Tensor] = {}
    for name, feature in features.items():
        if feature.shape[:2] != mask.shape or feature.device != mask.device:
            raise ValueError(
                f"feature {name!r} has shape {tuple(feature.shape)} on {feature.device}; "
                f"expected [B, L, ...] = {tuple(mask.shape)} on {mask.device} like the mask"
            )
        trailing = (1,) * (feature.dim() - 2)
        index = source.view(batch, length, *trailing).expand_as(feature)  # [B, L, ...]
        moved = feature.gather(1, index)  # [B, L, ...]
        zero = torch.zeros((), dtype=feature.dtype, device=feature.device)
        shifted[name] = torch.where(keep.view(batch, length, *trailing), moved, zero)
    new_mask = positions[None, :] <= position[:, None]  # [B, L]
    hidden = positions[None, :] == position[:, None]  # [B, L]
    return shifted, new_mask, hidden, position


# ---------------------------------------------------------------- regularisation


def stochastic_shared_embeddings(
    item_ids: Tensor,
    mask: Tensor,
    probability: float,
    low: int,
    high: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SSE-SE (Wu et al., NeurIPS 2019): replace real ids, each with ``probability``, by a
    uniform random id in ``[low, high)``; padding is untouched; returns a new tensor.

    >>> ids = torch.tensor([[3, 4, 0]])
    >>> stochastic_shared_embeddings(ids, ids > 0, 1.0, 10, 11)
    tensor([[10, 10,  0]])
    """
    _check_batch(item_ids, mask)
    _check_probability(probability)
    if not low < high:
        raise ValueError(f"need low < high for the random ids, got [{low}, {high})")
    replace = (_uniform(item_ids, generator) < probability) & mask  # [B, L]
    random_ids = torch.randint(
        low, high, item_ids.shape, generator=generator, device=item_ids.device
    )  # [B, L]
    return torch.where(replace, random_ids, item_ids)
