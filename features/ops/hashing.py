"""A stable 64-bit hash of strings, vectorised over Arrow buffers with numpy.

``stable_hash64(s)`` = MurmurHash3's ``fmix64`` finaliser applied to the
64-bit FNV-1a hash of the UTF-8 bytes of ``s``. FNV-1a alone is a fine hash
but its low bits mix poorly (the lowest bit is the parity of the bytes'
lowest bits), and buckets are taken modulo small numbers, so the finaliser
spreads every input bit over every output bit. Both steps are fixed
published constants: the value is the same in every process, on every
machine and in every Python version (unlike ``hash()``).

The loop runs over byte positions, not over strings: at step ``j`` every
string longer than ``j`` folds in its ``j``-th byte in one numpy operation.
Strings are visited longest first, so the active ones are always a prefix
and the total work is the total number of bytes.

>>> import pyarrow as pa
>>> [hex(int(h)) for h in hash_strings(pa.array(["", "a", "sku-1"]))]
['0xefd01f60ba992926', '0x82a2a958a9bece5b', '0xb360dc87d45aee69']
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 finaliser (in place on ``h``, uint64); returns ``h``."""
    h ^= h >> _S33
    h *= _M1
    h ^= h >> _S33
    h *= _M2
    h ^= h >> _S33
    return h


def _as_bytes_array(column: pa.Array) -> pa.Array:
    """Strings as ``large_string``, binaries as ``large_binary``, integers as decimal text."""
    t = column.type
    if pa.types.is_dictionary(t):
        return _as_bytes_array(column.dictionary_decode())
    if pa.types.is_integer(t):
        column = pc.cast(column, pa.string())
        t = column.type
    if pa.types.is_large_binary(t) or pa.types.is_large_string(t):
        return column
    if pa.types.is_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t):
        return pc.cast(column, pa.large_string())
    if pa.types.is_binary(t) or pa.types.is_binary_view(t):
        return pc.cast(column, pa.large_binary())
    raise ValueError(f"can only hash strings, binaries or integers, got {t}")


def hash_strings(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``stable_hash64`` of every value: uint64 ``[N]``.

    Integers are hashed as their decimal text (``42`` hashes like ``"42"``).
    The hash of a null slot is unspecified: callers mask nulls themselves.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    arr = _as_bytes_array(column)
    n = len(arr)
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = (
        np.frombuffer(bufs[2], dtype=np.uint8)
        if len(bufs) > 2 and bufs[2] is not None
        else np.zeros(0, np.uint8)
    )
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    max_len = int(lengths.max())
    if max_len > 0:
        # Longest first (radix sort on small ints), so the strings still active at
        # byte j are the prefix [:active[j]].
        key = (max_len - lengths).astype(np.uint16 if max_len < 65536 else np.int64)
        order = np.argsort(key, kind="stable")
        s_starts = starts[order]
        hist = np.bincount(lengths, minlength=max_len + 1)
        active = n - np.cumsum(hist)  # active[j] = number of strings longer than j
        hs = h.copy()  # hashes in length order
        for j in range(max_len):
            c = int(active[j])
            head = hs[:c]
            head ^= data[s_starts[:c] + j]
            head *= FNV_PRIME
        h[order] = hs
    return fmix64(h)


def stable_hash64_py(value: bytes | str) -> int:
    """Reference pure-Python ``stable_hash64`` of one value (slow; for tests and docs)."""
    data = value.encode() if isinstance(value, str) else value
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & mask
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & mask
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & mask
    h ^= h >> 33
    return h
