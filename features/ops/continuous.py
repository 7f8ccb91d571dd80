"""Continuous-input ops: ``Normalize``, ``LogOp`` and ``Bucketize``.

Rule for bad values, the same in all three: a null, NaN or infinite input is
"missing". ``Normalize`` and ``LogOp`` output 0.0 for it (for ``Normalize``
that is the fitted mean); ``Bucketize`` gives it ``NULL_ID`` (1). Fitting
skips missing values. The arithmetic runs in float64 as torch ops on the
target device and is rounded to float32 once at the end.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from features.ops.base import NULL_ID, CategoricalOp, ContinuousOp, to_tensor

logger = logging.getLogger(__name__)


def _float64(column: pa.Array, op: str) -> np.ndarray:
    """Numeric column -> float64 numpy, nulls as NaN."""
    t = column.type
    if not (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_decimal(t)
        or pa.types.is_null(t)
    ):
        raise ValueError(f"{op} takes a numeric column, got {t}")
    values = pc.cast(column, pa.float64(), safe=False)
    if values.null_count:
        values = pc.fill_null(values, math.nan)
    return values.to_numpy()


def _log1p_pos(x: torch.Tensor) -> torch.Tensor:
    """``log1p(max(x, 0))``; NaN stays NaN, +inf stays +inf."""
    return torch.log1p(torch.clamp_min(x, 0.0))


def _check_clip(clip: Any) -> float | None:
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not clip > 0:
        raise ValueError(f"clip must be a positive number or None, got {clip!r}")
    if not math.isfinite(clip):
        raise ValueError("clip must be finite; use clip=None for no clipping")
    return float(clip)


class Normalize(ContinuousOp):
    """``(x - mean) / std`` with statistics fitted on the finite values.

    ``log=True`` first maps ``x -> log1p(max(x, 0))`` (fit and transform alike),
    for heavy-tailed values such as prices. ``clip`` then bounds the result to
    ``[-clip, clip]``. ``std`` is the population standard deviation; if it is 0
    up to rounding (``std <= 1e-10 * |mean|``), the feature is constant and is
    only centred (scale 1). Fitted on no finite value at all: mean 0, scale 1.
    Null / NaN / ±inf inputs -> 0.0 (the mean), with or without ``log``.
    ``partial_fit`` merges running statistics with Chan et al.'s parallel
    formula, so fitting chunk by chunk gives the statistics of the concatenation.

    >>> import pyarrow as pa
    >>> op = Normalize().fit(pa.array([1.0, 2.0, 3.0, None, float("nan")]))
    >>> round(op.mean, 6), round(op.std, 6)
    (2.0, 0.816497)
    >>> op.transform(pa.array([2.0, 4.0, None, float("inf")]))
    tensor([0.0000, 2.4495, 0.0000, 0.0000])
    """

    name: ClassVar[str] = "normalize"

    def __init__(self, log: bool = False, clip: float | None = None):
        super().__init__()
        if not isinstance(log, bool):
            raise ValueError(f"log must be True or False, got {log!r}")
        self.log = log
        self.clip = _check_clip(clip)
        self._reset()

    def _reset(self) -> None:
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    @property
    def count(self) -> int:
        """Number of finite values fitted."""
        return self._count

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        """Population standard deviation of the fitted values (0 before fit)."""
        return math.sqrt(self._m2 / self._count) if self._count else 0.0

    @property
    def scale(self) -> float:
        """The divisor used by ``transform``: ``std``, or 1 for a constant feature."""
        std = self.std
        return 1.0 if std == 0.0 or std <= 1e-10 * abs(self._mean) else std

    def _partial_fit(self, column: pa.Array, offsets: np.ndarray | None) -> None:
        x = _float64(column, self.name)
        x = x[np.isfinite(x)]  # missing values are not data
        if self.log:
            x = np.log1p(np.maximum(x, 0.0))
        n_b = int(x.size)
        if n_b == 0:
            if self._count == 0:
                logger.debug("normalize: no finite value fitted yet")
            return
        mean_b = float(x.mean())
        m2_b = float(np.square(x - mean_b).sum())
        n_a, n = self._count, self._count + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * n_a * n_b / n
        self._count = n

    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        x = to_tensor(_float64(column, self.name), device)
        present = torch.isfinite(x)  # decided on the raw value, before log
        if self.log:
            x = _log1p_pos(x)
        y = (x - self._mean) / self.scale
        y = torch.where(present, y, torch.zeros((), dtype=y.dtype, device=device))
        if self.clip is not None:
            y = torch.clamp(y, -self.clip, self.clip)
        return y.to(torch.float32)

    def _fit_state(self) -> dict[str, Any]:
        return {"count": self._count, "mean": self._mean, "m2": self._m2}

    def _load_fit(self, fit: Mapping[str, Any], arrays: Mapping[str, pa.Array]) -> None:
        self._count = int(fit["count"])
        self._mean = float(fit["mean"])
        self._m2 = float(fit["m2"])


class LogOp(ContinuousOp):
    """``log1p(max(x, 0))`` as float32; null / NaN / +inf -> 0.0. Stateless.

    >>> import pyarrow as pa
    >>> LogOp().transform(pa.array([0.0, 1.718281828, -5.0, None]))
    tensor([0., 1., 0., 0.])
    """

    name: ClassVar[str] = "log"
    stateless: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()

    def _check_column(self, column: pa.Array) -> None:
        _float64(column.slice(0, 0), self.name)

    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        y = _log1p_pos(to_tensor(_float64(column, self.name), device))
        y = torch.where(torch.isfinite(y), y, torch.zeros((), dtype=y.dtype, device=device))
        return y.to(torch.float32)


class Bucketize(CategoricalOp):
    """Value -> bucket id; ``boundaries`` strictly increasing, finite.

    Ids: 0 padding, 1 missing (null / NaN), then ``2 + i`` where ``i`` is the
    number of boundaries ``<= x``: ``x < b[0]`` -> 2, ``b[0] <= x < b[1]`` -> 3,
    ..., ``x >= b[-1]`` -> ``len(b) + 2``. ``-inf`` and ``+inf`` fall in the
    first and last bucket. Stateless.

    >>> import pyarrow as pa
    >>> op = Bucketize(boundaries=[0.0, 10.0])
    >>> op.transform(pa.array([-1.0, 0.0, 9.9, 10.0, None, float("inf")])), op.cardinality
    (tensor([2, 3, 3, 4, 1, 4]), 5)
    """

    name: ClassVar[str] = "bucketize"
    stateless: ClassVar[bool] = True

    def __init__(self, boundaries: Sequence[float]):
        super().__init__()
        if isinstance(boundaries, str | bytes) or not isinstance(boundaries, Sequence):
            raise ValueError("boundaries must be a list of numbers")
        values = []
        for b in boundaries:
            if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b):
                raise ValueError(f"boundaries must be finite numbers, got {b!r}")
            values.append(float(b))
        if not values:
            raise ValueError("boundaries must not be empty")
        if any(a >= b for a, b in itertools.pairwise(values)):
            raise ValueError(f"boundaries must be strictly increasing, got {values}")
        self.boundaries = values

    @property
    def cardinality(self) -> int:
        return NULL_ID + 2 + len(self.boundaries)

    def _check_column(self, column: pa.Array) -> None:
        _float64(column.slice(0, 0), self.name)

    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        x = to_tensor(_float64(column, self.name), device)
        edges = torch.tensor(self.boundaries, dtype=torch.float64, device=device)
        ids = torch.bucketize(x, edges, right=True) + (NULL_ID + 1)
        return torch.where(torch.isnan(x), torch.full_like(ids, NULL_ID), ids)
