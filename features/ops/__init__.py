"""Feature transform ops: one flat event column in, one flat tensor out.

Every op has ``fit`` / ``partial_fit`` / ``transform`` / ``state`` /
``arrays`` / ``from_state`` (see :class:`Op`); ``PadTruncate`` turns the flat
outputs into ``[B, L]`` batches. The behaviour of each op on every edge case
is written down in ``docs/features-ops.md``.

>>> import pyarrow as pa
>>> op = op_from_spec({"op": "categorify", "min_freq": 1})
>>> op.fit(pa.array(["a", "b", "a"])).transform(pa.array(["b", "c"]))
tensor([4, 2])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from features.ops.base import (
    NULL_ID,
    PAD_ID,
    STATE_VERSION,
    CategoricalOp,
    ContinuousOp,
    NotFittedError,
    Op,
)
from features.ops.categorical import Categorify, HashBucket
from features.ops.continuous import Bucketize, LogOp, Normalize
from features.ops.hashing import hash_strings
from features.ops.sequence import Padded, PadTruncate
from features.ops.temporal import Hour, SessionAge, TimeSincePrev, Weekday

#: Every column op by its ``"op"`` id.
OPS: dict[str, type[Op]] = {
    cls.name: cls
    for cls in (
        Categorify,
        HashBucket,
        Normalize,
        LogOp,
        Bucketize,
        Hour,
        Weekday,
        TimeSincePrev,
        SessionAge,
    )
}


def op_from_spec(spec: Mapping[str, Any]) -> Op:
    """Build an unfitted op from ``{"op": name, **params}``; unknown names or keys raise.

    >>> op_from_spec({"op": "hash_bucket", "num_buckets": 10, "buckets": 3})
    Traceback (most recent call last):
    ...
    ValueError: hash_bucket: unknown parameter(s) ['buckets']; allowed: ['num_buckets']
    """
    params = dict(spec)
    name = params.pop("op", None)
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; known ops: {sorted(OPS)}")
    cls = OPS[name]
    allowed = cls.param_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        return cls(**params)
    except TypeError as e:  # a required parameter is missing
        raise ValueError(f"{name}: {e}; allowed parameters: {sorted(allowed)}") from e


__all__ = [
    "NULL_ID",
    "OPS",
    "PAD_ID",
    "STATE_VERSION",
    "Bucketize",
    "CategoricalOp",
    "Categorify",
    "ContinuousOp",
    "HashBucket",
    "Hour",
    "LogOp",
    "Normalize",
    "NotFittedError",
    "Op",
    "PadTruncate",
    "Padded",
    "SessionAge",
    "TimeSincePrev",
    "Weekday",
    "hash_strings",
    "op_from_spec",
]
