"""Time features from the ``ts`` column (int64 milliseconds since the Unix epoch).

All in UTC: the event contract carries no time zone. ``ts`` is a required
field (the ingest validator rejects events without one), so a null ``ts`` is
an error here, not a value to impute. Timestamp-typed columns are accepted
and read as milliseconds.

Within a session, events are in time order; if two are not (clock skew), a
negative gap is clamped to 0 rather than producing a negative log input.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from features.ops.base import CategoricalOp, ContinuousOp, to_tensor

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000
#: 1970-01-01 was a Thursday: weekday 3 with Monday = 0.
_EPOCH_WEEKDAY = 3


def _ts_ms(column: pa.Array, op: str) -> np.ndarray:
    """int64 ms numpy from an integer or timestamp column; nulls are an error."""
    t = column.type
    if pa.types.is_timestamp(t):
        column = pc.cast(column, pa.timestamp("ms", t.tz), safe=False).cast(pa.int64())
    elif pa.types.is_integer(t):
        column = pc.cast(column, pa.int64())
    else:
        raise ValueError(f"{op} takes int64 milliseconds or a timestamp column, got {t}")
    if column.null_count:
        raise ValueError(
            f"{op}: ts has {column.null_count} null value(s); ts is required for every event"
        )
    return column.to_numpy()


def _session_index(offsets: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
    """Row -> index of the first row of its session, ``[N]`` int64 on ``device``."""
    offs = to_tensor(offsets, device)
    lengths = offs[1:] - offs[:-1]
    return torch.repeat_interleave(offs[:-1], lengths, output_size=n)


def _log1p_seconds(delta_ms: torch.Tensor) -> torch.Tensor:
    seconds = torch.clamp_min(delta_ms, 0).to(torch.float64) / 1000.0
    return torch.log1p(seconds).to(torch.float32)


class Hour(CategoricalOp):
    """UTC hour of day: ids 1..24 for hours 0..23 (0 is padding). Stateless.

    >>> import pyarrow as pa
    >>> Hour().transform(pa.array([0, 3_600_000 * 13 + 59_999, -1]))  # 1969-12-31 23:59
    tensor([ 1, 14, 24])
    """

    name: ClassVar[str] = "hour"
    stateless: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()

    @property
    def cardinality(self) -> int:
        return 25

    def _check_column(self, column: pa.Array) -> None:
        _ts_ms(column.slice(0, 0), self.name)

    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        ts = to_tensor(_ts_ms(column, self.name), device)
        hours = torch.div(ts, MS_PER_HOUR, rounding_mode="floor")
        return torch.remainder(hours, 24) + 1


class Weekday(CategoricalOp):
    """UTC day of week: ids 1..7 for Monday..Sunday (0 is padding). Stateless.

    >>> import pyarrow as pa
    >>> Weekday().transform(pa.array([0, 1_700_000_000_000]))  # a Thursday, a Tuesday
    tensor([4, 2])
    """

    name: ClassVar[str] = "weekday"
    stateless: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()

    @property
    def cardinality(self) -> int:
        return 8

    def _check_column(self, column: pa.Array) -> None:
        _ts_ms(column.slice(0, 0), self.name)

    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        ts = to_tensor(_ts_ms(column, self.name), device)
        days = torch.div(ts, MS_PER_DAY, rounding_mode="floor")
        return torch.remainder(days + _EPOCH_WEEKDAY, 7) + 1


class _SessionTimeOp(ContinuousOp):
    """A stateless time feature of an int64 ms ``ts`` column within sessions."""

    stateless: ClassVar[bool] = True
    needs_offsets: ClassVar[bool] = True

    def _check_column(self, column: pa.Array) -> None:
        _ts_ms(column.slice(0, 0), self.name)


class TimeSincePrev(_SessionTimeOp):
    """``log1p(seconds since the previous event of the same session)``, float32.

    The first event of each session gets 0. Needs ``offsets``. Stateless.

    >>> import numpy as np, pyarrow as pa
    >>> ts = pa.array([0, 1000, 4000, 10_000, 10_500])  # sessions [0, 3) and [3, 5)
    >>> TimeSincePrev().transform(ts, np.array([0, 3, 5])).expm1()
    tensor([0.0000, 1.0000, 3.0000, 0.0000, 0.5000])
    """

    name: ClassVar[str] = "time_since_prev"

    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        assert offsets is not None
        ts = to_tensor(_ts_ms(column, self.name), device)
        n = ts.numel()
        first = _session_index(offsets, n, device)
        rows = torch.arange(n, device=device)
        prev = ts[torch.clamp_min(rows - 1, 0)]
        delta = torch.where(rows == first, torch.zeros_like(ts), ts - prev)
        return _log1p_seconds(delta)


class SessionAge(_SessionTimeOp):
    """``log1p(seconds since the first event of the same session)``, float32.

    Needs ``offsets``. Stateless.

    >>> import numpy as np, pyarrow as pa
    >>> ts = pa.array([0, 1000, 4000, 10_000, 10_500])
    >>> SessionAge().transform(ts, np.array([0, 3, 5])).expm1()
    tensor([0.0000, 1.0000, 4.0000, 0.0000, 0.5000])
    """

    name: ClassVar[str] = "session_age"

    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        assert offsets is not None
        ts = to_tensor(_ts_ms(column, self.name), device)
        first = _session_index(offsets, ts.numel(), device)
        return _log1p_seconds(ts - ts[first])
