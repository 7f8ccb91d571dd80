"""The batch path: an archive window -> encoded training sequences in Parquet, and back.

:func:`write_sequences` groups events by session, sorts each session by time,
keeps its last ``max_len`` events, drops sessions with fewer than ``min_len``
events, encodes the kept events with a fitted :class:`~features.workflow.Workflow`
and writes one row per session (``docs/features.md``, "Training sequences"):

======================  ===============================  ==========================
column                  type                             value
======================  ===============================  ==========================
``session_id``          string                           the session key
one per feature         list<int64> / list<float32>      encoded values, oldest first
``length``              int32                            events kept (list length)
``last_ts``             int64                            ``ts`` of the newest event
======================  ===============================  ==========================

Truncate, then encode: the features of a row are computed from the kept
events only, exactly as ``Workflow.transform`` computes them at serving time
from the last ``max_len`` events the session store holds, so the trainer and
the live scorer see the same numbers. The trainer does no string work: it
reads ids. :func:`read_sequences` turns row groups back into padded
:class:`~features.batch.FeatureBatch` es, vectorised over Arrow list offsets.

>>> import tempfile, pyarrow as pa
>>> from features.schema import default_schema
>>> from features.workflow import Workflow
>>> events = pa.table({"session_id": ["s1", "s2", "s1", "s1"], "ts": [0, 5, 9, 7],
...                    "item_id": ["a", "b", "c", "a"]})
>>> wf = Workflow(default_schema(), max_len=2).fit(events)
>>> path = tempfile.mkdtemp() + "/train.parquet"
>>> write_sequences(events, wf, path, min_len=2, progress=False)  # s2 has 1 event
1
>>> pa.parquet.read_table(path, columns=["session_id", "item_id", "length", "last_ts"]).to_pylist()
[{'session_id': 's1', 'item_id': [3, 5], 'length': 2, 'last_ts': 9}]
>>> next(read_sequences(path, batch_size=8)).features["item_id"]
tensor([[3, 5]])
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from features.batch import FeatureBatch, SessionBatch, as_table, pad_features
from features.ops import PadTruncate
from features.ops.base import to_tensor
from features.ops.hashing import hash_strings
from features.workflow import Workflow

__all__ = ["SEQUENCES_FORMAT", "read_sequences", "sequences_metadata", "write_sequences"]

logger = logging.getLogger(__name__)

SEQUENCES_FORMAT = "streamrec.sequences/1"
_META_KEY = b"streamrec.sequences"
_RESERVED = ("session_id", "length", "last_ts")
_ARROW = {torch.int64: pa.int64(), torch.float32: pa.float32()}


class _SeenSessions:
    """Detects a session split over two input tables (its sequence would be cut in two).

    Hashes of every id seen so far are searched for each new table (one
    vectorised ``np.isin``); only a hash hit is checked exactly.
    """

    def __init__(self) -> None:
        self._hashes = np.zeros(0, np.uint64)
        self._ids: list[pa.Array] = []

    def add(self, ids: pa.Array) -> None:
        hashes = hash_strings(ids)
        if self._hashes.size:
            hit = np.isin(hashes, self._hashes)
            if hit.any():
                dup = ids.filter(pa.array(hit)).filter(
                    pc.is_in(ids.filter(pa.array(hit)), value_set=pa.concat_arrays(self._ids))
                )
                if len(dup):
                    raise ValueError(
                        f"session {dup[0].as_py()!r} (and {len(dup) - 1} more) appear in two input "
                        "tables; every table must hold whole sessions (split the window by "
                        "session, e.g. by hash of session_id, not by time), or pass one table"
                    )
        self._hashes = np.concatenate([self._hashes, hashes])
        self._ids.append(ids)


def _output_schema(workflow: Workflow, meta: dict[str, Any]) -> pa.Schema:
    fields = [pa.field("session_id", pa.string(), nullable=False)]
    for name, op in workflow.ops.items():
        fields.append(pa.field(name, pa.list_(_ARROW[op.out_dtype]), nullable=False))
    fields += [
        pa.field("length", pa.int32(), nullable=False),
        pa.field("last_ts", pa.int64(), nullable=False),
    ]
    return pa.schema(fields, metadata={_META_KEY: json.dumps(meta).encode()})


def _rows(batch: SessionBatch, workflow: Workflow, schema: pa.Schema) -> pa.Table:
    """One output row per session of ``batch`` (non-empty sessions, already truncated)."""
    flat = workflow.encode(batch)  # name -> [N] on CPU
    list_offsets = pa.array(batch.offsets.astype(np.int32))
    columns: dict[str, pa.Array] = {"session_id": pa.array(batch.session_ids, pa.string())}
    for name, values in flat.items():
        columns[name] = pa.ListArray.from_arrays(list_offsets, pa.array(values.numpy()))
    ts = batch.columns[workflow.ts_col].combine_chunks().cast(pa.int64())
    columns["length"] = pa.array(batch.lengths.astype(np.int32))
    columns["last_ts"] = ts.take(pa.array(batch.offsets[1:] - 1))
    return pa.Table.from_pydict(columns, schema=schema)


def write_sequences(
    table_or_batches: pa.Table | Iterable[pa.Table],
    workflow: Workflow,
    out_path: str | os.PathLike[str],
    *,
    max_len: int | None = None,
    min_len: int = 2,
    progress: bool = True,
    sessions_per_group: int = 16_384,
) -> int:
    """Write one encoded training sequence per session to Parquet; return how many.

    Args:
        table_or_batches: events of an archive window in any order (e.g.
            ``ingest.archive.read_window``'s table), or an iterable of tables
            that each hold whole sessions (a session in two tables is a
            ``ValueError``).
        workflow: a fitted workflow; its features become the list columns.
        out_path: the Parquet file (written to a temporary name, then renamed).
        max_len: keep the last ``max_len`` events (default ``workflow.max_len``).
        min_len: drop sessions with fewer events (1 <= min_len <= max_len).
        progress: show a tqdm bar (sessions) on stderr.
        sessions_per_group: sessions per Parquet row group.
    """
    max_len = workflow.max_len if max_len is None else int(max_len)
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if sessions_per_group < 1:
        raise ValueError(f"sessions_per_group must be >= 1, got {sessions_per_group}")
    clash = sorted(set(workflow.feature_names) & set(_RESERVED))
    if clash:
        raise ValueError(f"feature names {clash} clash with the output columns {list(_RESERVED)}")
    meta = {
        "format": SEQUENCES_FORMAT,
        "fingerprint": workflow.fingerprint,
        "max_len": max_len,
        "min_len": min_len,
        "features": {n: str(_ARROW[op.out_dtype]) for n, op in workflow.ops.items()},
    }
    schema = _output_schema(workflow, meta)
    single = isinstance(table_or_batches, pa.Table | pa.RecordBatch) or hasattr(
        table_or_batches, "to_arrow"
    )
    tables = [table_or_batches] if single else table_or_batches
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.tmp")
    try:  # a failed write leaves no file behind
        seen, written, dropped = _SeenSessions(), 0, 0
        with (
            pq.ParquetWriter(tmp, schema) as writer,
            tqdm(
                total=0, unit="session", desc="sequences", disable=not progress, file=sys.stderr
            ) as bar,
        ):
            for data in tables:
                table = as_table(data)
                columns = [c for c in workflow.event_columns if c in table.column_names]
                batch = SessionBatch.from_table(
                    table, workflow.session_col, workflow.ts_col, columns=columns
                )
                if not single:
                    seen.add(pa.array(batch.session_ids, pa.string()))
                keep = batch.lengths >= min_len
                dropped += int((~keep).sum())
                batch = batch.select(keep).truncate(max_len)
                bar.total += batch.num_sessions
                bar.refresh()
                for start in range(0, batch.num_sessions, sessions_per_group):
                    part = batch.slice(start, start + sessions_per_group)
                    writer.write_table(_rows(part, workflow, schema))
                    bar.update(part.num_sessions)
                    written += part.num_sessions
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    logger.info(
        "wrote %d sequences to %s (%d sessions shorter than %d dropped)",
        written,
        out,
        dropped,
        min_len,
    )
    return written


def sequences_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata ``write_sequences`` stored: format, fingerprint, max_len, min_len, features."""
    raw = (pq.read_schema(path).metadata or {}).get(_META_KEY)
    meta = json.loads(raw) if raw else None
    if not isinstance(meta, dict) or meta.get("format") != SEQUENCES_FORMAT:
        raise ValueError(f"{path}: not a {SEQUENCES_FORMAT} file (write it with write_sequences)")
    return meta


def read_sequences(
    path: str | os.PathLike[str], batch_size: int = 1024, *, device: torch.device | str = "cpu"
) -> Iterator[FeatureBatch]:
    """Batches of ``batch_size`` sessions as :class:`FeatureBatch` of ``[B, max_len]`` tensors.

    Vectorised per batch: each list column's values and offsets go straight
    into one ``PadTruncate`` per dtype. Check ``sequences_metadata(path)
    ["fingerprint"]`` against the workflow the model is trained with.
    """
    meta = sequences_metadata(path)
    names = list(meta["features"])
    pad = PadTruncate(int(meta["max_len"]))
    dev = torch.device(device)
    for rb in pq.ParquetFile(path).iter_batches(
        batch_size=batch_size, columns=["session_id", "length", *names]
    ):
        lengths = rb.column("length").to_numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = {}
        for name in names:
            lists = rb.column(name)
            list_offsets = lists.offsets.to_numpy().astype(np.int64)
            if lists.null_count or not np.array_equal(list_offsets - list_offsets[0], offsets):
                raise ValueError(f"{path}: column {name!r} does not match 'length'")
            flat[name] = to_tensor(lists.flatten().to_numpy(), dev)
        yield pad_features(flat, offsets, pad, rb.column("session_id").to_pylist(), dev)
