"""The ``Op`` interface shared by every column transform, and its input checks.

An op turns one flat event column (``N`` rows, all sessions of a micro-batch
back to back) into one flat tensor of ``N`` rows. ``offsets`` (int64,
``[B + 1]``) says where each session starts; ops that need session structure
(time since the previous event, session age) take it, the others ignore it.
Padding to ``[B, L]`` is :class:`features.ops.sequence.PadTruncate`.

The host part of a transform (string -> id lookups, hashing, reading Arrow
buffers) runs in pyarrow / numpy; the numeric part runs as torch ops on the
requested device, so CPU and CUDA give the same numbers.
"""

from __future__ import annotations

import copy
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

import numpy as np
import pyarrow as pa
import torch

logger = logging.getLogger(__name__)

#: Bumped when the layout of ``Op.state()`` changes incompatibly.
STATE_VERSION = 1

#: Id 0 of every categorical output is padding (written by ``PadTruncate``).
PAD_ID = 0
#: Id 1 of ``Categorify``, ``HashBucket`` and ``Bucketize`` outputs means "value missing".
NULL_ID = 1

Column = pa.Array | pa.ChunkedArray
Device = torch.device | str


class NotFittedError(RuntimeError):
    """``transform`` (or a fitted-only property) was used before ``fit``."""


def as_array(column: Column, *, what: str = "column") -> pa.Array:
    """One contiguous ``pa.Array`` (ChunkedArrays are combined; arrays pass through)."""
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks()
    if isinstance(column, pa.Array):
        return column
    raise TypeError(
        f"{what} must be a pyarrow Array or ChunkedArray, got {type(column).__name__}; "
        "wrap Python lists / numpy arrays with pyarrow.array(...)"
    )


def check_offsets(offsets: Any, n_rows: int, *, required: bool, op: str) -> np.ndarray | None:
    """Validate session offsets: int64 ``[B + 1]``, from 0 to ``n_rows``, non-decreasing."""
    if offsets is None:
        if required:
            raise ValueError(
                f"{op} needs session offsets (int64 [B + 1]; session b is rows "
                "offsets[b]:offsets[b + 1]); pass offsets=..."
            )
        return None
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.detach().cpu().numpy()
    offs = np.asarray(offsets)
    if offs.ndim != 1 or offs.size == 0 or not np.issubdtype(offs.dtype, np.integer):
        raise ValueError(f"{op}: offsets must be a 1-D integer array of B + 1 entries")
    offs = offs.astype(np.int64, copy=False)
    if offs[0] != 0 or offs[-1] != n_rows:
        raise ValueError(
            f"{op}: offsets must start at 0 and end at the number of rows ({n_rows}); "
            f"got {int(offs[0])} .. {int(offs[-1])}"
        )
    if offs.size > 1 and bool(np.any(offs[1:] < offs[:-1])):
        raise ValueError(f"{op}: offsets must be non-decreasing")
    return offs


def to_tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host numpy -> torch on ``device``; copies read-only (Arrow-backed) buffers first."""
    if not values.flags.writeable or not values.flags.c_contiguous:
        values = np.array(values, copy=True, order="C")
    return torch.from_numpy(values).to(device)


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class Op(ABC):
    """One column transform: ``fit`` on an archive window, ``transform`` a micro-batch.

    Subclasses set ``name`` (the ``"op"`` id of specs and states), ``kind`` and
    ``out_dtype``, take their parameters as keyword arguments stored under the
    same attribute names (so ``params()`` can read them back), and implement
    ``_transform`` (plus ``_partial_fit`` / ``_reset`` / ``_fit_state`` /
    ``_load_fit`` when they learn something from data).

    Stateless ops (``stateless = True``) are fitted from construction; their
    ``fit`` only checks the column. Every other op raises
    :class:`NotFittedError` on ``transform`` before ``fit``.
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["categorical", "continuous"]]
    out_dtype: ClassVar[torch.dtype]
    stateless: ClassVar[bool] = False
    needs_offsets: ClassVar[bool] = False

    def __init__(self) -> None:
        self._fitted = self.stateless

    # -- configuration ---------------------------------------------------------------

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """The constructor's keyword parameters, i.e. the keys a spec may carry."""
        sig = inspect.signature(cls.__init__)
        return tuple(p for p in sig.parameters if p != "self")

    def params(self) -> dict[str, Any]:
        """Constructor parameters as JSON-able values."""
        return {p: copy.deepcopy(getattr(self, p)) for p in self.param_names()}

    def spec(self) -> dict[str, Any]:
        """``{"op": name, **params}``: what :func:`features.ops.op_from_spec` takes."""
        return {"op": self.name, **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    @property
    def fitted(self) -> bool:
        """Whether ``transform`` may be called."""
        return self._fitted

    # -- fitting ---------------------------------------------------------------------

    def fit(self, column: Column, offsets: np.ndarray | None = None) -> Self:
        """Forget what was learnt, then learn from ``column``."""
        self._reset()
        self._fitted = self.stateless
        return self.partial_fit(column, offsets)

    def partial_fit(self, column: Column, offsets: np.ndarray | None = None) -> Self:
        """Learn from one more chunk, keeping what was learnt before (streaming fit)."""
        arr = as_array(column)
        offs = check_offsets(offsets, len(arr), required=False, op=self.name)
        self._partial_fit(arr, offs)
        self._fitted = True
        return self

    def _reset(self) -> None:  # noqa: B027 - stateless ops have nothing to forget
        """Forget fitted state (stateful ops override)."""

    def _partial_fit(self, column: pa.Array, offsets: np.ndarray | None) -> None:
        """Learn from ``column`` (stateful ops override); stateless ops only check it."""
        self._check_column(column)

    def _check_column(self, column: pa.Array) -> None:  # noqa: B027 - optional hook
        """Raise ValueError when the column's type cannot be transformed."""

    # -- transforming ----------------------------------------------------------------

    def transform(
        self, column: Column, offsets: np.ndarray | None = None, *, device: Device = "cpu"
    ) -> torch.Tensor:
        """Flat column of ``N`` rows -> tensor ``[N]`` of ``out_dtype`` on ``device``.

        Never mutates ``column`` or ``offsets``, and never changes the op.
        """
        if not self._fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted: call fit(column) (or load a fitted "
                "state with from_state) before transform"
            )
        arr = as_array(column)
        offs = check_offsets(offsets, len(arr), required=self.needs_offsets, op=self.name)
        out = self._transform(arr, offs, torch.device(device))
        # Cheap contract checks: a wrong dtype or length here is a bug in the op.
        assert out.dtype == self.out_dtype and out.shape == (len(arr),), (out.dtype, out.shape)
        return out

    @abstractmethod
    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        """The op itself, on validated inputs."""

    # -- persistence -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """JSON-able description: spec plus fitted statistics (big arrays: ``arrays()``)."""
        return {
            "op": self.name,
            "version": STATE_VERSION,
            "params": self.params(),
            "fitted": self._fitted,
            "fit": self._fit_state() if self._fitted and not self.stateless else None,
        }

    def arrays(self) -> dict[str, pa.Array]:
        """Big fitted arrays (e.g. a vocabulary), stored by the workflow as Parquet."""
        return {}

    def _fit_state(self) -> dict[str, Any]:
        return {}

    def _load_fit(  # noqa: B027 - stateless ops have nothing to restore
        self, fit: Mapping[str, Any], arrays: Mapping[str, pa.Array]
    ) -> None:
        """Restore what ``_fit_state`` / ``arrays`` saved (stateful ops override)."""

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], arrays: Mapping[str, pa.Array] | None = None
    ) -> Op:
        """Rebuild an op from ``state()`` (and ``arrays()``); ``Op.from_state`` dispatches
        on ``state["op"]``."""
        from features.ops import OPS  # the registry imports every op module

        name = state.get("op")
        if name not in OPS:
            raise ValueError(f"unknown op {name!r} in state; known ops: {sorted(OPS)}")
        target = OPS[name]
        if not issubclass(target, cls):
            raise ValueError(f"state is for op {name!r}, not {cls.__name__}")
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"op state version {version!r} is not supported (this code reads "
                f"version {STATE_VERSION}); refit the workflow"
            )
        op = target(**state["params"])
        if state.get("fitted") and not target.stateless:
            op._load_fit(state["fit"], arrays or {})
            op._fitted = True
        return op


class CategoricalOp(Op):
    """An op whose output is int64 ids in ``[0, cardinality)``; id 0 is padding."""

    kind: ClassVar[Literal["categorical", "continuous"]] = "categorical"
    out_dtype: ClassVar[torch.dtype] = torch.int64

    @property
    @abstractmethod
    def cardinality(self) -> int:
        """Number of ids, padding and reserved ids included (the embedding table size)."""


class ContinuousOp(Op):
    """An op whose output is float32 values, always finite."""

    kind: ClassVar[Literal["categorical", "continuous"]] = "continuous"
    out_dtype: ClassVar[torch.dtype] = torch.float32
