"""Categorical ops: ``Categorify`` (a growing vocabulary) and ``HashBucket``.

Id layout of both (``PAD_ID`` and ``NULL_ID`` from ``features.ops.base``)::

    0                      padding (only ever written by PadTruncate)
    1                      value missing (null)
    Categorify: 2 .. 1+oov_buckets      unseen values (out of vocabulary)
                2+oov_buckets ..        the vocabulary, in order of admission
    HashBucket: 2 .. 1+num_buckets      hash buckets
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from features.ops import hashing
from features.ops.base import (
    NULL_ID,
    CategoricalOp,
    NotFittedError,
    _check_int,
    to_tensor,
)

logger = logging.getLogger(__name__)

_STRING = "string"
_INT = "int64"
_ARROW_TYPE = {_STRING: pa.large_string(), _INT: pa.int64()}


def _canonical(column: pa.Array, op: str) -> tuple[str | None, pa.Array]:
    """(value type, values as large_string or int64); value type None for an all-null column."""
    t = column.type
    if pa.types.is_dictionary(t):
        column = column.dictionary_decode()
        t = column.type
    if pa.types.is_null(t):
        return None, column
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return _STRING, pc.cast(column, pa.large_string())
    if pa.types.is_integer(t):
        try:
            return _INT, pc.cast(column, pa.int64())
        except pa.ArrowInvalid as e:
            raise ValueError(f"{op}: integer values must fit in int64 ({e})") from e
    raise ValueError(
        f"{op} takes string or integer columns, got {t}; bucketize continuous values "
        "(Bucketize) or cast them to string first"
    )


def _null_mask(column: pa.Array) -> np.ndarray | None:
    """Bool mask of null rows, or None when there are none."""
    if column.null_count == 0:
        return None
    return column.is_null().to_numpy(zero_copy_only=False)


class _VocabIndex:
    """Exact value -> vocabulary position lookup (-1 when absent or null), built once.

    ``pc.index_in`` rebuilds its hash table from the whole value set on every
    call, which costs far more than a small micro-batch against a big
    vocabulary. So strings are looked up by binary search over the sorted
    ``stable_hash64`` of the vocabulary, then compared for exact equality
    (hash collisions can never give a wrong id). Batches at least as long as
    the vocabulary, and vocabularies with a 64-bit hash collision inside them,
    use ``index_in`` instead; both paths give the same positions.
    """

    def __init__(self, values: pa.Array, value_type: str) -> None:
        self.values = values
        self.value_type = value_type
        keys = values.to_numpy() if value_type == _INT else hashing.hash_strings(values)
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]
        self._collision = bool(np.any(self._sorted[1:] == self._sorted[:-1]))
        if self._collision and value_type == _STRING:
            logger.warning(
                "categorify: two vocabulary values share a 64-bit hash; lookups fall back "
                "to pyarrow index_in (exact, slower for small batches)"
            )

    def lookup(self, column: pa.Array) -> np.ndarray:
        n, size = len(column), len(self.values)
        if n == 0 or size == 0:
            return np.full(n, -1, dtype=np.int64)
        if self.value_type == _STRING and (self._collision or n >= size):
            found = pc.index_in(column, value_set=self.values)
            return pc.fill_null(found, -1).to_numpy().astype(np.int64)
        if self.value_type == _INT:
            keys = pc.fill_null(column, 0).to_numpy()
        else:
            keys = hashing.hash_strings(column)
        at = np.minimum(np.searchsorted(self._sorted, keys), size - 1)
        candidate = self._order[at]
        hit = self._sorted[at] == keys
        if self.value_type == _STRING:
            same = pc.equal(column, self.values.take(pa.array(candidate)))
            hit &= pc.fill_null(same, False).to_numpy(zero_copy_only=False)
        elif column.null_count:
            hit &= ~_null_mask(column)
        return np.where(hit, candidate, -1).astype(np.int64)


class Categorify(CategoricalOp):
    """Values -> ids from a vocabulary that only ever grows.

    ``fit`` counts values and admits those seen at least ``min_freq`` times,
    most frequent first (ties by value), up to ``max_size``. ``partial_fit``
    after that keeps counting and appends newly qualifying values after the
    current last id: an id, once given, never changes, so a model trained on
    an older vocabulary stays valid. Unseen values go to one of
    ``oov_buckets`` out-of-vocabulary ids (by stable hash when more than one);
    nulls get ``NULL_ID`` (1), distinct from "unseen".

    Takes string or integer columns (dictionary-encoded ones too).

    >>> import pyarrow as pa
    >>> op = Categorify(min_freq=2).fit(pa.array(["b", "a", "b", "a", "b", "c"]))
    >>> op.vocabulary.to_pylist(), op.cardinality
    (['b', 'a'], 5)
    >>> op.transform(pa.array(["a", "b", "zzz", None]))
    tensor([4, 3, 2, 1])
    >>> op.partial_fit(pa.array(["c", "d"])).vocabulary.to_pylist()  # "c" now seen twice
    ['b', 'a', 'c']
    """

    name: ClassVar[str] = "categorify"

    def __init__(self, min_freq: int = 1, max_size: int | None = None, oov_buckets: int = 1):
        super().__init__()
        self.min_freq = _check_int("min_freq", min_freq, minimum=1)
        self.max_size = None if max_size is None else _check_int("max_size", max_size, minimum=1)
        self.oov_buckets = _check_int("oov_buckets", oov_buckets, minimum=1)
        self._reset()

    # -- id layout -------------------------------------------------------------------

    @property
    def first_oov_id(self) -> int:
        """First out-of-vocabulary id (2); they run to ``first_vocab_id - 1``."""
        return NULL_ID + 1

    @property
    def first_vocab_id(self) -> int:
        """Id of the first vocabulary value."""
        return NULL_ID + 1 + self.oov_buckets

    @property
    def cardinality(self) -> int:
        self._require_fitted()
        return self.first_vocab_id + len(self._counts)

    @property
    def vocabulary(self) -> pa.Array:
        """Vocabulary values in id order: value ``i`` has id ``first_vocab_id + i``."""
        self._require_fitted()
        if self._values is None:
            return pa.array([], pa.null())
        return self._values

    @property
    def counts(self) -> np.ndarray:
        """How often each vocabulary value was seen while fitting (id order)."""
        self._require_fitted()
        return self._counts.copy()

    @property
    def value_type(self) -> str | None:
        """``"string"`` or ``"int64"`` once a non-null value was fitted, else None."""
        return self._value_type

    def decode(self, ids: torch.Tensor | np.ndarray) -> pa.Array:
        """Ids -> vocabulary values (null for padding, missing and OOV ids).

        >>> import pyarrow as pa
        >>> op = Categorify().fit(pa.array(["x", "y", "x"]))
        >>> op.decode(op.transform(pa.array(["y", "new", "x"]))).to_pylist()
        ['y', None, 'x']
        """
        self._require_fitted()
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        pos = np.asarray(ids, dtype=np.int64).reshape(-1) - self.first_vocab_id
        valid = (pos >= 0) & (pos < len(self._counts))
        if self._values is None:
            return pa.nulls(len(pos))
        return self._values.take(pa.array(np.where(valid, pos, 0), mask=~valid))

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError("Categorify is not fitted: call fit(column) first")

    # -- fitting ---------------------------------------------------------------------

    def _reset(self) -> None:
        self._value_type: str | None = None
        self._values: pa.Array | None = None  # vocabulary, id order
        self._counts = np.zeros(0, dtype=np.int64)
        self._pending_values: pa.Array | None = None  # seen, below min_freq
        self._pending_counts = np.zeros(0, dtype=np.int64)
        self._index: _VocabIndex | None = None

    def _full(self) -> bool:
        return self.max_size is not None and len(self._counts) >= self.max_size

    def _partial_fit(self, column: pa.Array, offsets: np.ndarray | None) -> None:
        value_type, values = _canonical(column, self.name)
        values = values.drop_null()
        if value_type is None or len(values) == 0:
            return
        if self._value_type is None:
            self._value_type = value_type
            empty = pa.array([], _ARROW_TYPE[value_type])
            self._values, self._pending_values = empty, empty
            self._index = _VocabIndex(empty, value_type)
        elif value_type != self._value_type:
            raise ValueError(
                f"categorify was fitted on {self._value_type} values, got {column.type}"
            )
        assert self._index is not None and self._pending_values is not None
        seen = pc.value_counts(values)
        seen_values = seen.field("values")
        seen_counts = seen.field("counts").to_numpy().astype(np.int64)
        pos = self._index.lookup(seen_values)
        known = pos >= 0
        counts = self._counts.copy()
        counts[pos[known]] += seen_counts[known]
        self._counts = counts
        if self._full():
            self._drop_pending()
            return
        # Merge the new values' counts into the pending ones.
        table = (
            pa.table(
                {
                    "value": pa.concat_arrays([self._pending_values, seen_values.filter(~known)]),
                    "count": np.concatenate([self._pending_counts, seen_counts[~known]]),
                }
            )
            .group_by("value", use_threads=False)
            .aggregate([("count", "sum")])
        )
        ready = pc.greater_equal(table["count_sum"], self.min_freq)
        admitted = table.filter(ready).sort_by(
            [("count_sum", "descending"), ("value", "ascending")]
        )
        if self.max_size is not None:
            admitted = admitted.slice(0, self.max_size - len(self._counts))
        if admitted.num_rows:
            self._values = pa.concat_arrays(
                [self._values, admitted["value"].combine_chunks().cast(self._values.type)]
            )
            self._counts = np.concatenate([self._counts, admitted["count_sum"].to_numpy()])
            self._index = _VocabIndex(self._values, self._value_type)
            logger.debug(
                "categorify: admitted %d values, vocabulary %d",
                admitted.num_rows,
                len(self._counts),
            )
        if self._full():
            self._drop_pending()
            return
        pending = table.filter(pc.invert(ready))
        self._pending_values = pending["value"].combine_chunks().cast(self._values.type)
        self._pending_counts = pending["count_sum"].to_numpy().astype(np.int64)

    def _drop_pending(self) -> None:
        # A full vocabulary admits nothing more, so counts below min_freq are useless.
        if self._pending_values is not None:
            self._pending_values = self._pending_values.slice(0, 0)
        self._pending_counts = np.zeros(0, dtype=np.int64)

    # -- transforming ----------------------------------------------------------------

    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        value_type, values = _canonical(column, self.name)
        if value_type is not None and self._value_type not in (None, value_type):
            raise ValueError(
                f"categorify was fitted on {self._value_type} values, got {column.type}"
            )
        n = len(values)
        if self._index is None or value_type is None:
            pos = np.full(n, -1, dtype=np.int64)
        else:
            pos = self._index.lookup(values)
        ids = np.where(pos >= 0, pos + self.first_vocab_id, self.first_oov_id)
        nulls = _null_mask(values)
        if self.oov_buckets > 1:
            unseen = pos < 0 if nulls is None else (pos < 0) & ~nulls
            if unseen.any():
                h = hashing.hash_strings(values.filter(pa.array(unseen)))
                ids[unseen] = self.first_oov_id + (h % np.uint64(self.oov_buckets)).astype(np.int64)
        if nulls is not None:
            ids[nulls] = NULL_ID
        return to_tensor(ids.astype(np.int64, copy=False), device)

    # -- persistence -----------------------------------------------------------------

    def _fit_state(self) -> dict[str, Any]:
        return {
            "value_type": self._value_type,
            "vocab_size": len(self._counts),
            "pending_size": len(self._pending_counts),
        }

    def arrays(self) -> dict[str, pa.Array]:
        """``vocab_values`` / ``vocab_counts`` (id order) and ``pending_values`` /
        ``pending_counts`` (seen fewer than ``min_freq`` times so far); arrays with
        the same prefix have the same length. Empty before fit."""
        if not self._fitted or self._values is None or self._pending_values is None:
            empty = pa.array([], pa.null())
            counts = pa.array([], pa.int64())
            return {
                "vocab_values": empty,
                "vocab_counts": counts,
                "pending_values": empty,
                "pending_counts": counts,
            }
        return {
            "vocab_values": self._values,
            "vocab_counts": pa.array(self._counts, pa.int64()),
            "pending_values": self._pending_values,
            "pending_counts": pa.array(self._pending_counts, pa.int64()),
        }

    def _load_fit(self, fit: Mapping[str, Any], arrays: Mapping[str, pa.Array]) -> None:
        self._reset()
        value_type = fit["value_type"]
        if value_type is None:
            return
        if value_type not in _ARROW_TYPE:
            raise ValueError(f"categorify state: unknown value_type {value_type!r}")
        missing = {"vocab_values", "vocab_counts", "pending_values", "pending_counts"} - set(arrays)
        if missing:
            raise ValueError(f"categorify state needs its arrays; missing {sorted(missing)}")

        def load(key: str, size: int) -> pa.Array:
            arr = arrays[key]
            arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
            if len(arr) != size:
                raise ValueError(f"categorify state: {key} has {len(arr)} rows, expected {size}")
            return arr

        vocab_size, pending_size = int(fit["vocab_size"]), int(fit["pending_size"])
        arrow_type = _ARROW_TYPE[value_type]
        self._value_type = value_type
        self._values = load("vocab_values", vocab_size).cast(arrow_type)
        self._counts = load("vocab_counts", vocab_size).to_numpy().astype(np.int64)
        self._pending_values = load("pending_values", pending_size).cast(arrow_type)
        self._pending_counts = load("pending_counts", pending_size).to_numpy().astype(np.int64)
        self._index = _VocabIndex(self._values, value_type)


class HashBucket(CategoricalOp):
    """Values -> ``2 + stable_hash64(value) % num_buckets``; null -> ``NULL_ID`` (1).

    For very high cardinality features where a vocabulary is not worth keeping.
    Stateless (fitted from construction). Integers hash as their decimal text.
    See :mod:`features.ops.hashing` for the hash.

    >>> import pyarrow as pa
    >>> HashBucket(num_buckets=1000).transform(pa.array(["sku-1", None, "sku-1"]))
    tensor([267,   1, 267])
    """

    name: ClassVar[str] = "hash_bucket"
    stateless: ClassVar[bool] = True

    def __init__(self, num_buckets: int):
        super().__init__()
        self.num_buckets = _check_int("num_buckets", num_buckets, minimum=1)

    @property
    def cardinality(self) -> int:
        return NULL_ID + 1 + self.num_buckets

    def _check_column(self, column: pa.Array) -> None:
        _canonical(column, self.name)

    def _transform(
        self, column: pa.Array, offsets: np.ndarray | None, device: torch.device
    ) -> torch.Tensor:
        _, values = _canonical(column, self.name)
        h = hashing.hash_strings(values)
        ids = (h % np.uint64(self.num_buckets)).astype(np.int64) + (NULL_ID + 1)
        nulls = _null_mask(values)
        if nulls is not None:
            ids[nulls] = NULL_ID
        return to_tensor(ids, device)
