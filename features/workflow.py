"""The feature workflow: a fitted schema that turns micro-batches of sessions into tensors.

:class:`Workflow` builds one op (``features.ops``) per schema feature, fits
them on a window of events (a ``pa.Table``, an iterable of tables for
streaming fits, or anything with ``to_arrow()`` such as a cuDF DataFrame),
saves them as plain files (``workflow.json`` + one Parquet file per op with
arrays; never pickle), and transforms a :class:`~features.batch.SessionBatch`
into a :class:`FeatureBatch` of ``[B, L]`` tensors on the requested device.
Rules for bad input (unseen values, missing fields, empty or long sessions,
NaN) are in ``docs/features.md``.

>>> import pyarrow as pa
>>> from features.schema import default_schema
>>> events = pa.table({"session_id": ["s1", "s1", "s2"], "ts": [0, 60_000, 0],
...                    "item_id": ["a", "b", "a"], "event_type": ["view", "click", "view"]})
>>> wf = Workflow(default_schema(), max_len=3).fit(events)
>>> wf.cardinalities["item_id"]  # pad, null, OOV, a, b
5
>>> out = wf.transform_table(events)
>>> out.session_ids, out.features["item_id"], out.lengths
(['s1', 's2'], tensor([[3, 4, 0],
        [3, 0, 0]]), tensor([2, 1]))
>>> out.features["price"]  # no price column: missing -> 0.0
tensor([[0., 0., 0.],
        [0., 0., 0.]])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.batch import FeatureBatch, SessionBatch, as_table, pad_features
from features.ops import NotFittedError, Op, PadTruncate, op_from_spec
from features.ops.base import as_array
from features.ops.sequence import PadTo
from features.schema import Feature, Kind, Schema, SchemaError, Tag

__all__ = ["FORMAT", "FeatureBatch", "Workflow"]

logger = logging.getLogger(__name__)

FORMAT = "streamrec.workflow/1"
WORKFLOW_FILE = "workflow.json"
_JSON_KEYS = {
    "format",
    "fingerprint",
    "max_len",
    "pad_to",
    "session_col",
    "ts_col",
    "rows_fitted",
    "schema",
    "ops",
}


def _file_stem(index: int, name: str) -> str:
    return f"op-{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


def _digest_array(h: Any, name: str, arr: pa.Array | pa.ChunkedArray) -> None:
    """Feed a canonical form of ``arr``'s content (not its encoding) to hash ``h``."""
    arr = as_array(arr)
    h.update(f"{name}\0{len(arr)}\0".encode())
    if pa.types.is_null(arr.type) or len(arr) == 0:
        return
    if arr.null_count:
        h.update(np.packbits(arr.is_null().to_numpy(zero_copy_only=False)).tobytes())
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        arr = arr.cast(pa.large_string())
        bufs = arr.buffers()
        offs = np.frombuffer(bufs[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
        h.update((offs - offs[0]).tobytes())
        if bufs[2] is not None:
            h.update(memoryview(bufs[2])[int(offs[0]) : int(offs[-1])])
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        h.update(str(t).encode() + arr.fill_null(0).to_numpy().tobytes())
    else:
        h.update(json.dumps(arr.to_pylist(), default=str).encode())


class Workflow:
    """One fitted op per schema feature; ``transform(SessionBatch) -> FeatureBatch``.

    Args:
        schema: the features. The ``session_id``-tagged feature, if any, is
            the grouping key (transform ``{"op": "identity"}``), not a model
            input; ``kind=list`` features are not supported yet.
        max_len: sequence length ``L``: the last ``max_len`` events of each
            session are kept, and features are computed from those events.
        pad_to: ``"max_len"`` (static ``L``) or ``"longest"`` (see ``PadTruncate``).
        session_col: the session key column; default the session feature's
            source column, else ``"session_id"``.
        ts_col: the event time column (int64 ms), used to order events.
    """

    def __init__(
        self,
        schema: Schema,
        max_len: int = 50,
        *,
        pad_to: PadTo = "max_len",
        session_col: str | None = None,
        ts_col: str = "ts",
    ) -> None:
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a features.schema.Schema, got {type(schema).__name__}")
        self._pad = PadTruncate(max_len, pad_to)
        sessions = schema.select_by_tag(Tag.SESSION_ID)
        if len(sessions) > 1:
            raise SchemaError(f"at most one feature may be tagged session_id, got {sessions.names}")
        for f in sessions:
            if f.transform != {"op": "identity"}:
                raise SchemaError(
                    f"feature {f.name!r} is tagged session_id: it is the grouping key, not a "
                    f"model input; give it transform {{'op': 'identity'}} or remove it"
                )
            if session_col not in (None, f.source_column):
                raise SchemaError(
                    f"session_col={session_col!r} but the schema's session "
                    f"feature reads {f.source_column!r}"
                )
            session_col = f.source_column
        lists = schema.select_by_kind(Kind.LIST).names
        if lists:
            raise NotImplementedError(
                f"kind=list features are not supported by the workflow yet: {list(lists)}; "
                "drop them (schema.without(name)) or make them categorical/continuous"
            )
        self._features = tuple(f for f in schema if Tag.SESSION_ID not in f.tags)
        if not self._features:
            raise SchemaError("the schema has no model features (only the session key)")
        self._schema = schema
        self._session_col = session_col or "session_id"
        self._ts_col = ts_col
        self._ops = {f.name: self._new_op(f) for f in self._features}
        self._rows_fitted = 0

    @staticmethod
    def _new_op(feature: Feature) -> Op:
        try:
            op = op_from_spec(feature.transform)
        except ValueError as e:
            raise SchemaError(f"feature {feature.name!r}: {e}") from None
        if op.kind != feature.kind.value:
            raise SchemaError(
                f"feature {feature.name!r} is {feature.kind.value} but op "
                f"{op.name!r} gives {op.kind} values"
            )
        return op

    def __repr__(self) -> str:
        return (
            f"Workflow(features={list(self.feature_names)}, max_len={self.max_len}, "
            f"fitted={self.fitted})"
        )

    # -- description ------------------------------------------------------------------

    @property
    def max_len(self) -> int:
        return self._pad.max_len

    @property
    def session_col(self) -> str:
        """The column events are grouped by (not a model input)."""
        return self._session_col

    @property
    def ts_col(self) -> str:
        """The event time column (int64 ms): orders events, feeds the time features."""
        return self._ts_col

    @property
    def pad_to(self) -> PadTo:
        return self._pad.pad_to

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Model inputs, in schema order (the keys of ``FeatureBatch.features``)."""
        return tuple(f.name for f in self._features)

    @property
    def ops(self) -> Mapping[str, Op]:
        """Feature name -> its op (read-only view; do not fit the ops directly)."""
        return MappingProxyType(self._ops)

    @property
    def event_columns(self) -> tuple[str, ...]:
        """The event fields a batch needs: ``ts_col`` and every feature's source column."""
        return tuple(dict.fromkeys([self.ts_col, *(f.source_column for f in self._features)]))

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Columns that must be present: ts, and the item id's source. Others are optional."""
        item = [f.source_column for f in self._features if Tag.ITEM_ID in f.tags]
        return tuple(dict.fromkeys([self.ts_col, *item]))

    @property
    def fitted(self) -> bool:
        return all(op.fitted for op in self._ops.values())

    @property
    def rows_fitted(self) -> int:
        """Events seen by ``fit`` / ``partial_fit`` since the last ``fit``."""
        return self._rows_fitted

    @property
    def cardinalities(self) -> dict[str, int]:
        """Categorical feature -> number of ids (embedding table size, padding included)."""
        self._require_fitted()
        return {n: op.cardinality for n, op in self._ops.items() if op.kind == "categorical"}

    @property
    def schema(self) -> Schema:
        """The schema, with each categorical feature's ``cardinality`` set once fitted."""
        if not self.fitted:
            return self._schema
        schema = self._schema
        for name, card in self.cardinalities.items():
            schema = schema.with_feature(dataclasses.replace(schema[name], cardinality=card))
        return schema

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of everything that determines ``transform``'s output."""
        h = hashlib.sha256()
        head = {
            "format": FORMAT,
            "max_len": self.max_len,
            "pad_to": self.pad_to,
            "session_col": self.session_col,
            "ts_col": self.ts_col,
            "features": [[f.name, f.source_column, f.kind.value] for f in self._features],
            "ops": [op.state() for op in self._ops.values()],
        }
        h.update(json.dumps(head, sort_keys=True, allow_nan=False).encode())
        for name, op in self._ops.items():
            for key, arr in sorted(op.arrays().items()):
                _digest_array(h, f"{name}/{key}", arr)
        return f"sha256:{h.hexdigest()}"

    def _require_fitted(self) -> None:
        unfitted = [n for n, op in self._ops.items() if not op.fitted]
        if unfitted:
            raise NotFittedError(
                f"the workflow is not fitted (features {unfitted}): call "
                "fit(window) or Workflow.load(dir) first"
            )

    # -- fitting ----------------------------------------------------------------------

    def fit(self, data: pa.Table | Iterable[pa.Table] | Any) -> Self:
        """Fit every op from scratch on a window of events (any order).

        ``data``: a table, an iterable of tables (chunks of one window, fitted
        one after the other with ``partial_fit``), or a cuDF / polars frame
        (``to_arrow()``). Statistics of chunks merge exactly; only the order
        of vocabulary ids can differ from a one-table fit.
        """
        self._ops = {f.name: self._new_op(f) for f in self._features}
        self._rows_fitted = 0
        chunks = (
            [data]
            if isinstance(data, pa.Table | pa.RecordBatch) or hasattr(data, "to_arrow")
            else data
        )
        count = 0
        for chunk in chunks:
            self.partial_fit(chunk)
            count += 1
        if count == 0:
            raise ValueError("fit needs at least one table of events")
        return self

    def partial_fit(self, data: pa.Table | Any) -> Self:
        """Learn from more events, keeping what was learnt: vocabularies only grow and
        an id once given never changes (a model trained earlier stays valid).

        Not safe while another thread transforms with this workflow: extend a
        copy (``load`` the saved one) and swap it in.
        """
        table = as_table(data)
        start = time.perf_counter()
        n = table.num_rows
        grouped = any(op.needs_offsets and not op.stateless for op in self._ops.values())
        offsets = None
        if grouped:  # no such op today; kept so that one can be added without changes here
            batch = SessionBatch.from_table(
                table, self.session_col, self.ts_col, columns=self._present(table)
            )
            table, offsets = batch.columns, batch.offsets
        columns = self._columns(table, n, "fit")
        for f in self._features:
            op = self._ops[f.name]
            op.partial_fit(columns[f.source_column], offsets if op.needs_offsets else None)
        self._rows_fitted += n
        logger.info(
            "workflow: fitted on %d events in %.2f s (%d in all)",
            n,
            time.perf_counter() - start,
            self._rows_fitted,
        )
        return self

    extend = partial_fit

    def _present(self, table: pa.Table) -> list[str]:
        return [c for c in self.event_columns if c in table.column_names]

    def _columns(self, table: pa.Table, n: int, what: str) -> dict[str, pa.Array]:
        """Source column -> one contiguous array; absent optional columns are all null."""
        missing = [c for c in self.required_columns if c not in table.column_names]
        if missing:
            raise ValueError(
                f"{what}: the events have no {missing} column(s); required: "
                f"{list(self.required_columns)}, got {table.column_names}"
            )
        out = {}
        for c in dict.fromkeys(f.source_column for f in self._features):
            if c in table.column_names:
                out[c] = as_array(table[c])
            else:
                logger.debug("%s: optional column %r absent: all values missing", what, c)
                out[c] = pa.nulls(n)
        return out

    # -- transforming -----------------------------------------------------------------

    def encode(
        self, batch: SessionBatch, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Every feature of every event, unpadded: name -> ``[N]`` on ``device``.

        One op call per feature over the flat column (no truncation: ``transform``
        truncates first). Rows align with ``batch.columns``.
        """
        self._require_fitted()
        dev = torch.device(device)
        n = batch.num_events
        if n == 0:  # nothing to look up; columns of an all-empty batch may lack types
            return {
                f.name: torch.zeros(0, dtype=self._ops[f.name].out_dtype, device=dev)
                for f in self._features
            }
        columns = self._columns(batch.columns, n, "transform")
        out = {}
        for f in self._features:
            op = self._ops[f.name]
            offsets = batch.offsets if op.needs_offsets else None
            out[f.name] = op.transform(columns[f.source_column], offsets, device=dev)
        return out

    def transform(self, batch: SessionBatch, device: torch.device | str = "cpu") -> FeatureBatch:
        """Micro-batch -> padded tensors on ``device``: keep the last ``max_len`` events of
        each session, encode each feature with one op call, pad each with one
        ``PadTruncate`` call. No Python loop over sessions or events."""
        if not isinstance(batch, SessionBatch):
            raise TypeError(
                f"transform takes a SessionBatch, got {type(batch).__name__}; "
                "see SessionBatch.from_table / from_sessions, or transform_table"
            )
        batch = batch.truncate(self.max_len)
        flat = self.encode(batch, device)
        return pad_features(flat, batch.offsets, self._pad, batch.session_ids, device)

    def transform_table(self, table: pa.Table, device: torch.device | str = "cpu") -> FeatureBatch:
        """``transform(SessionBatch.from_table(table))``: group by session, sort by time."""
        table = as_table(table)
        batch = SessionBatch.from_table(
            table, self.session_col, self.ts_col, columns=self._present(table)
        )
        return self.transform(batch, device)

    # -- persistence ------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``workflow.json`` and one Parquet file per op with arrays into ``directory``.

        Files are written under temporary names and renamed; ``workflow.json``
        goes last and names the other files, so a reader never sees a mix.
        """
        self._require_fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        ops = []
        for i, (name, op) in enumerate(self._ops.items()):
            entry: dict[str, Any] = {"feature": name, "state": op.state(), "arrays": None}
            arrays = {k: as_array(v) for k, v in op.arrays().items()}
            if arrays:
                size = max(len(a) for a in arrays.values())
                # One table per op: shorter arrays are padded with nulls to the longest
                # and cut back to their recorded length on load.
                table = pa.table(
                    {
                        k: pa.concat_arrays([a, pa.nulls(size - len(a), a.type)])
                        for k, a in arrays.items()
                    }
                )
                file = f"{_file_stem(i, name)}.parquet"
                tmp = out / f".{file}.tmp"
                pq.write_table(table, tmp)
                os.replace(tmp, out / file)
                entry["arrays"] = {"file": file, "lengths": {k: len(a) for k, a in arrays.items()}}
            ops.append(entry)
        doc = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "max_len": self.max_len,
            "pad_to": self.pad_to,
            "session_col": self.session_col,
            "ts_col": self.ts_col,
            "rows_fitted": self._rows_fitted,
            "schema": self.schema.to_dict(),
            "ops": ops,
        }
        tmp = out / f".{WORKFLOW_FILE}.tmp"
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, out / WORKFLOW_FILE)
        logger.info("saved workflow %s to %s", doc["fingerprint"][:19], out)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Workflow:
        """Read a directory written by :meth:`save`; the fingerprint is checked."""
        root = Path(directory)
        path = root / WORKFLOW_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no saved workflow here (Workflow.save writes it)"
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"{path}: format {got!r} is not {FORMAT!r}")
        unknown = sorted(set(doc) - _JSON_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(_JSON_KEYS)}")
        wf = cls(
            Schema.from_dict(doc["schema"]),
            doc["max_len"],
            pad_to=doc["pad_to"],
            session_col=doc["session_col"],
            ts_col=doc["ts_col"],
        )
        entries = doc["ops"]
        if [e["feature"] for e in entries] != list(wf.feature_names):
            raise ValueError(
                f"{path}: ops {[e['feature'] for e in entries]} do not match the "
                f"schema's features {list(wf.feature_names)}"
            )
        for entry in entries:
            name, arrays = entry["feature"], {}
            if entry["arrays"] is not None:
                table = pq.read_table(root / entry["arrays"]["file"])
                arrays = {
                    k: table[k].slice(0, n).combine_chunks()
                    for k, n in entry["arrays"]["lengths"].items()
                }
            op = Op.from_state(entry["state"], arrays)
            if op.spec() != wf._ops[name].spec():
                raise ValueError(
                    f"{path}: feature {name!r}: saved op {op.spec()} differs from "
                    f"the schema's {wf._ops[name].spec()}"
                )
            wf._ops[name] = op
        wf._rows_fitted = int(doc["rows_fitted"])
        if wf.fingerprint != doc["fingerprint"]:
            raise ValueError(
                f"{path}: fingerprint mismatch: the files in {root} do not belong "
                "together (copied from different saves?); save the workflow again"
            )
        logger.info("loaded workflow %s from %s", doc["fingerprint"][:19], root)
        return wf
