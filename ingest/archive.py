"""The event archive: valid click events as hour-partitioned Parquet files.

:class:`ArchiveHandler` is the :class:`ingest.worker.Handler` of the
``streamrec-archiver`` consumer group. It buffers valid events and flushes
them, one file per event hour, to ``<root>/date=YYYY-MM-DD/hour=HH/part-<uuid>.parquet``
(written under a dot-prefixed temporary name, then renamed); only then does
it hand the covered offsets to the worker to commit. A crash can therefore
duplicate events in the archive, never lose them, and :func:`read_window`
drops the duplicates by ``event_id``. Layout, schema and protocol:
``docs/archive.md``.

>>> from ingest.kafka import Record
>>> root = "memory://doctest/archive"  # any fsspec URL, or a local path
>>> h = ArchiveHandler(root, max_buffer_events=3)
>>> def msg(eid):
...     return f'{{"event_id":"{eid}","session_id":"s1","item_id":"i9","ts":1704067200000,"price":9.5}}'.encode()
>>> h.handle([Record("events", 0, 40, b"s1", msg("e1")), Record("events", 0, 41, b"s1", b"oops")])
{}
>>> h.handle([Record("events", 0, 42, b"s1", msg("e2")), Record("events", 0, 43, b"s1", msg("e1"))])
{('events', 0): 44}
>>> read_window(root, 1704067200000, 1704070800000, columns=["event_id", "price", "offset"]).to_pylist()
[{'event_id': 'e1', 'price': 9.5, 'offset': 40}, {'event_id': 'e2', 'price': 9.5, 'offset': 42}]
>>> list_hours(root)
[datetime.datetime(2024, 1, 1, 0, 0, tzinfo=datetime.timezone.utc)]
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal

import fsspec
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ingest.events import ClickEvent, EventValidator
from ingest.kafka import Record, TopicPartition
from ingest.metrics import ConsumerMetrics
from ingest.worker import Offsets, TransientError

__all__ = [
    "DEFAULT_FEATURES",
    "ArchiveHandler",
    "FeatureType",
    "archive_schema",
    "list_hours",
    "read_window",
]

log = logging.getLogger(__name__)

FeatureType = Literal["string", "float64", "int64"]
DEFAULT_FEATURES: Mapping[str, FeatureType] = MappingProxyType(
    {"category": "string", "price": "float64"}
)
_ARROW_TYPES = {t: pa.type_for_alias(t) for t in ("string", "float64", "int64")}
# Python types a value may have to fit a typed column (bool never reaches us:
# the validator rejects it). Anything else goes to `extra`, original kept.
_FITS: dict[str, tuple[type, ...]] = {"string": (str,), "float64": (float, int), "int64": (int,)}
_CORE = ("event_id", "session_id", "item_id", "ts", "event_type", "user_id")
_RESERVED = frozenset((*_CORE, "extra", "partition", "offset", "date", "hour"))
_HOUR_MS = 3_600_000
_HH = frozenset(f"{h:02d}" for h in range(24))
_extra_json = msgspec.json.Encoder(order="sorted").encode


def archive_schema(features: Mapping[str, FeatureType] = DEFAULT_FEATURES) -> pa.Schema:
    """The Arrow schema of archive files written with ``features`` declared.

    >>> archive_schema({"color": "string"}).names  # doctest: +NORMALIZE_WHITESPACE
    ['event_id', 'session_id', 'item_id', 'ts', 'event_type', 'user_id', 'color', 'extra',
     'partition', 'offset']
    """
    fields = [pa.field(n, pa.string(), nullable=False) for n in _CORE[:3]]
    fields += [
        pa.field("ts", pa.int64(), nullable=False),  # event time, ms since epoch (UTC)
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
    ]
    fields += [pa.field(name, _ARROW_TYPES[t]) for name, t in features.items()]
    fields += [
        pa.field("extra", pa.string()),  # JSON object of undeclared or misfit features
        pa.field("partition", pa.int32(), nullable=False),  # source Kafka record
        pa.field("offset", pa.int64(), nullable=False),
    ]
    return pa.schema(fields, metadata={b"streamrec.archive.version": b"1"})


class ArchiveHandler:
    """Buffers valid events and writes them to Parquet; see the module docstring.

    Flushes when ``max_buffer_events`` are buffered, when the oldest buffered
    event has waited ``max_buffer_age_s`` (by ``clock``; checked in
    :meth:`handle` and :meth:`tick`), and on :meth:`revoke`. Returned offsets
    only ever cover records whose events are in renamed (final) files.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        features: Mapping[str, FeatureType] = DEFAULT_FEATURES,
        max_buffer_events: int = 50_000,
        max_buffer_age_s: float = 60.0,
        validator: EventValidator | None = None,
        metrics: ConsumerMetrics | None = None,
        storage_options: Mapping[str, Any] | None = None,
        fsync: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_buffer_events < 1 or not max_buffer_age_s > 0:
            raise ValueError("max_buffer_events must be >= 1 and max_buffer_age_s > 0")
        for name, t in features.items():
            if not isinstance(name, str) or not name or name in _RESERVED:
                raise ValueError(f"archive feature name {name!r} is empty or clashes with a "
                                 f"column of its own; reserved: {sorted(_RESERVED)}")  # fmt: skip
            if t not in _ARROW_TYPES:
                raise ValueError(
                    f"archive feature {name!r} has type {t!r}; use one of {list(_ARROW_TYPES)}"
                )
        self.features = dict(features)
        self.schema = archive_schema(self.features)
        self.max_buffer_events = max_buffer_events
        self.max_buffer_age_s = max_buffer_age_s
        self.validator = validator or EventValidator()
        self.metrics = metrics
        self.fs, self.root = _url_to_fs(root, storage_options)
        self._fsync = fsync and isinstance(self.fs, LocalFileSystem)
        self._clock = clock
        self._events: list[ClickEvent] = []
        self._partitions: list[int] = []
        self._offsets: list[int] = []
        self._first_at: float | None = None  # clock() when the oldest buffered event came
        self._buffered: set[TopicPartition] = set()  # partitions with events in the buffer
        # Next offset per partition of records taken in (buffered or skipped as
        # invalid) and not yet returned to the worker.
        self._pending: Offsets = {}

    # ------------------------------------------------------------------ Handler protocol
    def handle(self, records: list[Record]) -> Offsets:
        pending = self._pending
        if pending:  # a retried batch (after TransientError) is already in the buffer
            records = [r for r in records if r.offset >= pending.get((r.topic, r.partition), -1)]
        if records:
            self._take(records)
        if len(self._events) >= self.max_buffer_events or self._too_old():
            self.flush()
        return self._release()

    def tick(self) -> Offsets:
        if self._too_old():
            self.flush()
        return self._release()

    def revoke(self, partitions: Sequence[TopicPartition]) -> Offsets:
        # Flush everything, not only the revoked partitions: simplest, and the
        # offsets of the partitions we keep are returned by the next handle/tick.
        if self._buffered.intersection(partitions):
            self.flush()
        return {tp: self._pending.pop(tp) for tp in partitions if tp in self._pending}

    def close(self) -> None:
        """Nothing to release: files are closed when written, the buffer flushed on revoke."""

    # ------------------------------------------------------------------ internals
    def _too_old(self) -> bool:
        first = self._first_at
        return first is not None and self._clock() - first >= self.max_buffer_age_s

    def _release(self) -> Offsets:
        out = {tp: o for tp, o in self._pending.items() if tp not in self._buffered}
        for tp in out:
            del self._pending[tp]
        return out

    def _take(self, records: list[Record]) -> None:
        t0 = time.perf_counter()
        events, rejected = self.validator.decode_batch(
            [r.value for r in records],  # type: ignore[misc]  # None -> rejected, never raises
            [r.key for r in records],
        )
        bad = {i for i, _ in rejected}
        kept = [r for i, r in enumerate(records) if i not in bad] if bad else records
        if events and self._first_at is None:
            self._first_at = self._clock()
        self._events += events
        self._partitions += [r.partition for r in kept]
        self._offsets += [r.offset for r in kept]
        self._buffered.update((r.topic, r.partition) for r in kept)
        for r in records:  # invalid records count as processed: the updater dead-letters them
            tp = (r.topic, r.partition)
            if r.offset >= self._pending.get(tp, -1):
                self._pending[tp] = r.offset + 1
        if rejected:
            log.debug("archive skipped %d invalid of %d records", len(rejected), len(records))
        if self.metrics:
            self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - t0)

    def flush(self) -> int:
        """Write every buffered event, one file per event hour; return the count.

        Raises :class:`TransientError` if the storage fails; the buffer is kept,
        so a retry writes it again (no final file exists yet unless a rename
        had already happened, and then the retry only adds duplicates).
        """
        n = len(self._events)
        if not n:
            return 0
        t0 = time.perf_counter()
        table = self._table().sort_by("ts")  # sorted, so each hour is one contiguous slice
        hours = table["ts"].to_numpy() // _HOUR_MS
        cuts = [0, *(np.flatnonzero(np.diff(hours)) + 1).tolist(), n]
        written: list[tuple[str, str]] = []  # (temp, final)
        try:
            # 1. every file under a temporary name that readers ignore;
            for lo, hi in itertools.pairwise(cuts):
                d = f"{self.root}/{_hour_dir(int(hours[lo]))}"
                self.fs.makedirs(d, exist_ok=True)
                name = f"part-{uuid.uuid4().hex}.parquet"
                written.append((f"{d}/.{name}.tmp", f"{d}/{name}"))
                self._write(table.slice(lo, hi - lo), written[-1][0])
            # 2. then rename all of them (atomic on a local disk; on object
            #    stores the final object appears whole or not at all);
            for tmp, final in written:
                self.fs.mv(tmp, final)
            if self._fsync:  # the new names (and new dirs) must survive a power loss too
                hour_dirs = {os.path.dirname(f) for _, f in written}
                for d in {*hour_dirs, *map(os.path.dirname, hour_dirs), self.root}:
                    _fsync_dir(d)
        except OSError as e:
            for tmp, _ in written:
                with contextlib.suppress(Exception):
                    self.fs.rm(tmp)
            raise TransientError(f"archive write to {self.root!r} failed: {e}") from e
        # 3. only now may the covered offsets be committed (see _release).
        self._events, self._partitions, self._offsets = [], [], []
        self._buffered.clear()
        self._first_at = None
        dt = time.perf_counter() - t0
        log.info("archived %d events in %d file(s) in %.3fs", n, len(written), dt)
        if self.metrics:
            self.metrics.stage_seconds.labels("write").observe(dt)
            self.metrics.applied.labels(self.metrics.role).inc(n)
        return n

    def _write(self, table: pa.Table, path: str) -> None:
        with self.fs.open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            if self._fsync:  # the data must be on disk before the rename makes it visible
                f.flush()
                os.fsync(f.fileno())

    def _table(self) -> pa.Table:
        """The buffer as one Arrow table: plain lists per column, then pa.array."""
        evs = self._events
        cols: dict[str, list[Any]] = {name: [] for name in self.features}
        typed = [(name, cols[name], _FITS[t]) for name, t in self.features.items()]
        declared = cols.keys()
        extra: list[str | None] = []
        for e in evs:
            f = e.features
            rest: dict[str, Any] | None = None
            for name, col, fits in typed:
                v = f.get(name)
                if v is None or type(v) in fits:
                    col.append(v)
                else:  # does not fit the column: null there, original kept in extra
                    col.append(None)
                    rest = {**(rest or {}), name: v}
            if not f.keys() <= declared:
                rest = {**(rest or {}), **{k: v for k, v in f.items() if k not in declared}}
            extra.append(_extra_json(rest).decode() if rest else None)
        arrays = [
            pa.array([e.event_id for e in evs], pa.string()),
            pa.array([e.session_id for e in evs], pa.string()),
            pa.array([e.item_id for e in evs], pa.string()),
            pa.array([e.ts for e in evs], pa.int64()),
            pa.array([e.event_type for e in evs], pa.string()),
            pa.array([e.user_id for e in evs], pa.string()),
            *(pa.array(cols[name], _ARROW_TYPES[t]) for name, t in self.features.items()),
            pa.array(extra, pa.string()),
            pa.array(self._partitions, pa.int32()),
            pa.array(self._offsets, pa.int64()),
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)


# ---------------------------------------------------------------------- reader


def read_window(
    root: str | os.PathLike[str],
    start_ms: int,
    end_ms: int,
    *,
    columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Archived events with ``start_ms <= ts < end_ms``, one row per ``event_id``
    (the copy from the smallest (partition, offset)), sorted by (ts, event_id).

    Opens only the date/hour directories that overlap the window, and only
    final ``part-*.parquet`` files (never temporary ones). An empty window, or
    a root with nothing archived yet, gives an empty table with the schema.
    """
    fs, base = _url_to_fs(root, storage_options)
    files = [f for _, d in _hour_dirs(fs, base, start_ms, end_ms) for f in _part_files(fs, d)]
    schema, dataset = archive_schema(), None
    if files:
        native = pafs.LocalFileSystem() if isinstance(fs, LocalFileSystem) else fs
        dataset = ds.dataset(files, format="parquet", filesystem=native)
        # Files written with other declared features: the union of their columns.
        schemas = [frag.physical_schema for frag in dataset.get_fragments()]
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        dataset = dataset.replace_schema(schema)
    wanted = list(schema.names if columns is None else columns)
    if unknown := [c for c in wanted if c not in schema.names]:
        raise ValueError(f"unknown archive column(s) {unknown}; available: {schema.names}")
    if dataset is None:
        return schema.empty_table().select(wanted)
    needed = list(dict.fromkeys([*wanted, "event_id", "ts", "partition", "offset"]))
    window = (ds.field("ts") >= start_ms) & (ds.field("ts") < end_ms)
    table = _dedup(dataset.to_table(columns=needed, filter=window))
    return table.sort_by([("ts", "ascending"), ("event_id", "ascending")]).select(wanted)


def list_hours(
    root: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> list[datetime]:
    """The UTC hours (sorted) that hold at least one final part file."""
    fs, base = _url_to_fs(root, storage_options)
    return [
        datetime.fromtimestamp(h * 3600, tz=UTC)
        for h, d in _hour_dirs(fs, base, None, None)
        if _part_files(fs, d)
    ]


def _dedup(table: pa.Table) -> pa.Table:
    """Keep, per event_id, the row with the smallest (partition, offset)."""
    if table.num_rows < 2:
        return table
    keys = [("event_id", "ascending"), ("partition", "ascending"), ("offset", "ascending")]
    table = table.sort_by(keys)
    ids = table["event_id"].combine_chunks()
    first = np.ones(len(ids), dtype=bool)  # first row of each run of equal ids
    first[1:] = ~pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(first))


# ---------------------------------------------------------------------- paths


def _url_to_fs(
    root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(os.fspath(root), **dict(storage_options or {}))
    return fs, path.rstrip("/") or "/"


def _hour_dir(hour: int) -> str:
    t = datetime.fromtimestamp(hour * 3600, tz=UTC)
    return f"date={t:%Y-%m-%d}/hour={t:%H}"


def _ls(fs: fsspec.AbstractFileSystem, path: str, prefix: str) -> list[tuple[str, str]]:
    """Sorted (name after ``prefix``, path) of the entries of ``path`` named ``prefix...``."""
    try:
        paths = [p.rstrip("/") for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = ((p.rsplit("/", 1)[-1], p) for p in paths)
    return sorted((n[len(prefix) :], p) for n, p in names if n.startswith(prefix))


def _hour_dirs(
    fs: fsspec.AbstractFileSystem, base: str, start_ms: int | None, end_ms: int | None
) -> list[tuple[int, str]]:
    """(hours since epoch, path) of the hour directories overlapping the window."""
    fs.invalidate_cache(base)  # listings are cached per instance (s3fs, gcsfs)
    lo = -(2**62) if start_ms is None else start_ms
    hi = 2**62 if end_ms is None else end_ms
    out = []
    for day, day_dir in _ls(fs, base, "date="):
        try:
            day_h = int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()) // 3600
        except ValueError:
            continue
        if not (lo < (day_h + 24) * _HOUR_MS and day_h * _HOUR_MS < hi):
            continue  # the whole day is outside the window: its hours are never listed
        hours = [(day_h + int(hh), d) for hh, d in _ls(fs, day_dir, "hour=") if hh in _HH]
        out += [(h, d) for h, d in hours if lo < (h + 1) * _HOUR_MS and h * _HOUR_MS < hi]
    return out


def _part_files(fs: fsspec.AbstractFileSystem, hour_dir: str) -> list[str]:
    return [p for name, p in _ls(fs, hour_dir, "part-") if name.endswith(".parquet")]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
