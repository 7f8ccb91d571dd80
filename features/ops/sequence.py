"""``PadTruncate``: flat per-event tensor + session offsets -> ``[B, L]`` padded batch.

Sessions keep their **last** ``max_len`` events (the most recent ones, which
matter most for predicting the next item) and are padded on the **right**:
position 0 is the oldest kept event, position ``length - 1`` the newest, the
rest is padding (value 0, mask False). This is Transformers4Rec's layout, so
causal masks and "last position" indexing work unchanged.

Unlike the column ops it takes a torch tensor (an op's output), not an Arrow
column, and returns two tensors; it is therefore not in ``OPS``, but it has
the same ``spec`` / ``state`` / ``from_state`` persistence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch

from features.ops.base import STATE_VERSION, _check_int, check_offsets, to_tensor

PadTo = Literal["max_len", "longest"]


class Padded(NamedTuple):
    """A padded batch: ``values [B, L, *]`` and ``mask [B, L]`` (True = real event)."""

    values: torch.Tensor
    mask: torch.Tensor


class PadTruncate:
    """Keep the last ``max_len`` events of each session; pad on the right with 0.

    ``pad_to="max_len"`` (default) always gives ``L = max_len`` (static shapes);
    ``pad_to="longest"`` gives ``L = min(max_len, longest session)`` but at least
    1, to save work on batches of short sessions. Empty sessions give an
    all-padding row. Runs on the device of ``values``, with no host sync.

    >>> import numpy as np, torch
    >>> ids = torch.tensor([11, 12, 13, 14, 21])  # sessions [11..14], [], [21]
    >>> out = PadTruncate(max_len=3).transform(ids, np.array([0, 4, 4, 5]))
    >>> out.values
    tensor([[12, 13, 14],
            [ 0,  0,  0],
            [21,  0,  0]])
    >>> out.mask.sum(dim=1)
    tensor([3, 0, 1])
    """

    name: ClassVar[str] = "pad_truncate"

    def __init__(self, max_len: int, pad_to: PadTo = "max_len"):
        self.max_len = _check_int("max_len", max_len, minimum=1)
        if pad_to not in ("max_len", "longest"):
            raise ValueError(f"pad_to must be 'max_len' or 'longest', got {pad_to!r}")
        self.pad_to: PadTo = pad_to

    def __repr__(self) -> str:
        return f"PadTruncate(max_len={self.max_len}, pad_to={self.pad_to!r})"

    def params(self) -> dict[str, Any]:
        return {"max_len": self.max_len, "pad_to": self.pad_to}

    def spec(self) -> dict[str, Any]:
        return {"op": self.name, **self.params()}

    def state(self) -> dict[str, Any]:
        return {
            "op": self.name,
            "version": STATE_VERSION,
            "params": self.params(),
            "fitted": True,
            "fit": None,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], arrays: Any = None) -> PadTruncate:
        if state.get("op") != cls.name or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a version-{STATE_VERSION} pad_truncate state: "
                f"op={state.get('op')!r} version={state.get('version')!r}"
            )
        return cls(**state["params"])

    def length(self, offsets: np.ndarray) -> int:
        """The padded length ``L`` this op gives for ``offsets``."""
        if self.pad_to == "max_len":
            return self.max_len
        longest = int(np.diff(np.asarray(offsets)).max(initial=0))
        return max(1, min(self.max_len, longest))

    def transform(self, values: torch.Tensor, offsets: np.ndarray) -> Padded:
        """``values [N, *]`` (N = all events) + ``offsets [B + 1]`` -> ``Padded``."""
        if not isinstance(values, torch.Tensor) or values.dim() < 1:
            raise ValueError("values must be a torch.Tensor of shape [N, ...]")
        n = values.shape[0]
        offs = check_offsets(offsets, n, required=True, op=self.name)
        assert offs is not None
        num_sessions, seq_len = offs.size - 1, self.length(offs)
        device = values.device
        offs_t = to_tensor(offs, device)
        lengths = offs_t[1:] - offs_t[:-1]  # [B]
        kept = torch.clamp_max(lengths, seq_len)  # [B]
        session = torch.repeat_interleave(
            torch.arange(num_sessions, device=device), lengths, output_size=n
        )  # [N]
        # Position of each row in its output row; negative for rows truncated away.
        pos = torch.arange(n, device=device) - (offs_t[1:] - kept)[session]
        trash = num_sessions * seq_len  # truncated rows are written to one extra slot
        slot = torch.where(pos >= 0, session * seq_len + pos, trash)
        out = values.new_zeros((trash + 1, *values.shape[1:]))
        out[slot] = values
        padded = out[:trash].view(num_sessions, seq_len, *values.shape[1:])  # [B, L, *]
        mask = torch.arange(seq_len, device=device)[None, :] < kept[:, None]  # [B, L]
        return Padded(padded, mask)
