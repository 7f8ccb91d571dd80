"""Event sources and sinks that need no broker: real logs replayed as click
events, a Parquet writer, and the paced sender shared by ``simulate`` and
``replay``.

Readers yield event dicts (the wire format of DESIGN section 1) in event-time
order, ties kept in file order, with event ids derived from the source row's
content, so replaying a log twice yields the same ids and downstream dedup
drops the second copy. Mapping of each source: ``docs/simulator.md``.

>>> class Recorder:
...     def __init__(self): self.sent = []
...     def produce(self, topic, value, key=None, headers=None): self.sent.append((key, value))
...     def flush(self, timeout=30.0): return 0
>>> p = Recorder()
>>> send_events([{"event_id": "e0", "session_id": "s1", "item_id": "i7", "ts": 1}], p, "t",
...             progress=False)
1
>>> p.sent
[(b's1', b'{"event_id":"e0","session_id":"s1","item_id":"i7","ts":1}')]
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from ingest.kafka import Producer

__all__ = [
    "DATASETS",
    "EVENT_SCHEMA",
    "default_data_dir",
    "read_movielens_100k",
    "read_yoochoose",
    "send_events",
    "write_parquet",
]

logger = logging.getLogger(__name__)

Event = dict[str, Any]

#: Parquet/Arrow columns of an event file; ``user_id``, ``category`` and
#: ``price`` are null where an event lacks them.
EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("category", pa.string()),
        pa.field("price", pa.float64()),
    ]
)


def _progress(total: int | None, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="ev",
        unit_scale=True,
        mininterval=1.0,
        file=sys.stderr,
        disable=not enabled,
    )


# ---------------------------------------------------------------------- sending
def send_events(
    events: Iterable[Event],
    producer: Producer,
    topic: str,
    *,
    speedup: float | None = None,
    live_timestamps: bool = False,
    progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall_clock: Callable[[], float] = time.time,
    flush_timeout: float = 30.0,
) -> int:
    """Produce each event as JSON keyed by its UTF-8 ``session_id``; return the count.

    ``speedup=None`` sends as fast as the producer takes them. Otherwise event
    ``i`` is due at ``clock0 + (ts_i - ts_0) / 1000 / speedup`` seconds: due
    times are computed from the first event, never by adding up sleeps, so
    slow produce calls do not make the replay drift. ``live_timestamps``
    rewrites ``ts`` to the wall-clock ms at send time (``event_id`` is kept).
    Raises RuntimeError if messages are still undelivered after the final flush.
    """
    if speedup is not None and not (speedup > 0 and np.isfinite(speedup)):
        raise ValueError(f"speedup must be a positive number or None, got {speedup!r}")
    encode = msgspec.json.Encoder().encode
    total = len(events) if hasattr(events, "__len__") else None  # type: ignore[arg-type]
    sent = 0
    t0_wall = ts0 = 0.0
    with _progress(total, f"send {topic}", progress) as bar:
        for ev in events:
            if speedup is not None:
                if sent == 0:
                    t0_wall, ts0 = clock(), ev["ts"]
                delay = t0_wall + (ev["ts"] - ts0) / 1000.0 / speedup - clock()
                if delay > 0:
                    sleep(delay)
            if live_timestamps:
                ev = {**ev, "ts": int(wall_clock() * 1000)}
            producer.produce(topic, encode(ev), key=ev["session_id"].encode())
            sent += 1
            bar.update(1)
    undelivered = producer.flush(flush_timeout)
    if undelivered:
        raise RuntimeError(
            f"{undelivered} of {sent} messages to topic {topic!r} were still undelivered after "
            f"flushing for {flush_timeout} s; check that the broker is reachable and the topic exists"
        )
    logger.info("sent %d events to %s", sent, topic)
    return sent


# ---------------------------------------------------------------------- Parquet
def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            cols.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"batch has no {field.name!r} column; it is required")
    return pa.Table.from_arrays(cols, schema=schema)


def write_parquet(
    events_or_batches: Iterable[Any] | pa.Table | pa.RecordBatch,
    path: str | os.PathLike[str],
    progress: bool = True,
    *,
    row_group_size: int = 100_000,
    extra_columns: Mapping[str, pa.DataType] | None = None,
) -> int:
    """Write events to one Parquet file with :data:`EVENT_SCHEMA` columns (plus
    ``extra_columns``, e.g. ``{"rating": pa.float64()}``; other keys are dropped),
    in row groups of ``row_group_size``. Accepts event dicts, lists of them,
    Arrow record batches or tables, mixed. Written to ``path.tmp`` and renamed
    when complete. Returns the number of rows."""
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    schema = EVENT_SCHEMA
    if extra_columns:
        schema = pa.schema([*EVENT_SCHEMA, *(pa.field(k, t) for k, t in extra_columns.items())])
    if isinstance(events_or_batches, pa.Table | pa.RecordBatch):
        events_or_batches = [events_or_batches]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    dicts: list[Event] = []
    tables: list[pa.Table] = []
    buffered = written = 0

    def take_dicts() -> None:
        nonlocal buffered
        if dicts:
            tables.append(pa.Table.from_pylist(dicts, schema=schema))
            buffered += len(dicts)
            dicts.clear()

    def drain(writer: pq.ParquetWriter, final: bool) -> None:
        nonlocal buffered, written, tables
        take_dicts()
        if buffered < row_group_size and not (final and buffered):
            return
        table = pa.concat_tables(tables).combine_chunks()
        full = table.num_rows if final else table.num_rows - table.num_rows % row_group_size
        writer.write_table(table.slice(0, full), row_group_size=row_group_size)
        rest = table.slice(full)
        tables, buffered, written = [rest], rest.num_rows, written + full
        bar.update(full)

    try:
        with (
            _progress(None, f"write {path.name}", progress) as bar,
            pq.ParquetWriter(tmp, schema) as writer,
        ):
            for item in events_or_batches:
                if isinstance(item, dict):
                    dicts.append(item)
                elif isinstance(item, pa.Table | pa.RecordBatch):
                    take_dicts()  # keep input order
                    table = item if isinstance(item, pa.Table) else pa.Table.from_batches([item])
                    tables.append(_conform(table, schema))
                    buffered += item.num_rows
                else:
                    dicts.extend(item)
                if len(dicts) + buffered >= row_group_size:
                    drain(writer, final=False)
            drain(writer, final=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %d events to %s", written, path)
    return written


# ---------------------------------------------------------------------- readers
def default_data_dir() -> Path:
    """``STREAMREC_DATA_DIR``, else ``shared/data`` beside the repository."""
    env = os.environ.get("STREAMREC_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _read_tsv(path: Path, types: Mapping[str, pa.DataType]) -> pa.Table:
    """A headed TSV; RecBole-style ``name:type`` headers are cut to ``name``."""
    with path.open(encoding="utf-8") as f:
        names = [h.split(":")[0] for h in f.readline().rstrip("\r\n").split("\t")]
    missing = sorted(set(types) - set(names))
    if missing:
        raise ValueError(f"{path}: columns {missing} missing; header has {names}")
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(skip_rows=1, column_names=names),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={n: types.get(n, pa.string()) for n in names}, strings_can_be_null=False
        ),
    )


def _ms(seconds: pa.ChunkedArray) -> np.ndarray:
    return np.rint(seconds.to_numpy() * 1000.0).astype(np.int64)


def _unique_ids(ids: list[str]) -> list[str]:
    """Suffix ``-1``, ``-2``... to repeats (exact duplicate rows in the log)."""
    seen: dict[str, int] = {}
    out = []
    for eid in ids:
        k = seen.get(eid)
        seen[eid] = 0 if k is None else k + 1
        out.append(eid if k is None else f"{eid}-{k + 1}")
    return out


def _ordered(ts: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return np.argsort(ts, kind="stable")[:limit]  # stable: ties keep file order


def read_movielens_100k(
    data_dir: str | os.PathLike[str], *, limit: int | None = None
) -> Iterator[Event]:
    """MovieLens-100k ratings as click events, oldest first.

    ``data_dir`` holds ``ml-100k.inter`` and ``ml-100k.item`` (or is their
    parent). Each user's history is one session: ``session_id`` = ``user_id``
    = the raw user token; ``ts`` = seconds * 1000; ``event_type`` "click"; side
    features ``rating`` (float), ``category`` (first genre) and ``year`` (int,
    absent when unknown). ``event_id`` = ``ml100k-<user>-<item>``.
    """
    d = Path(data_dir)
    if not (d / "ml-100k.inter").exists() and (d / "ml-100k" / "ml-100k.inter").exists():
        d = d / "ml-100k"
    inter_path, item_path = d / "ml-100k.inter", d / "ml-100k.item"
    if not inter_path.exists():
        raise FileNotFoundError(f"{inter_path} not found; pass the folder holding ml-100k.inter")
    t = _read_tsv(
        inter_path,
        {
            "user_id": pa.string(),
            "item_id": pa.string(),
            "rating": pa.float64(),
            "timestamp": pa.float64(),
        },
    )
    features: dict[str, Event] = {}
    if item_path.exists():
        it = _read_tsv(item_path, {"item_id": pa.string(), "class": pa.string()})
        years = (
            it.column("release_year").to_pylist()
            if "release_year" in it.column_names
            else [None] * it.num_rows
        )
        for item, genres, year in zip(
            it.column("item_id").to_pylist(), it.column("class").to_pylist(), years, strict=True
        ):
            f: Event = {}
            if genres:
                f["category"] = genres.split(" ")[0]
            if year and year.isdigit():
                f["year"] = int(year)
            features[item] = f
    else:
        logger.warning("%s not found: events carry no category/year", item_path)
    ts = _ms(t.column("timestamp"))
    order = _ordered(ts, limit)
    users = t.column("user_id").take(order).to_pylist()
    items = t.column("item_id").take(order).to_pylist()
    ratings = t.column("rating").take(order).to_pylist()
    ids = _unique_ids([f"ml100k-{u}-{i}" for u, i in zip(users, items, strict=True)])
    logger.info("read %d MovieLens-100k events from %s", len(ids), inter_path)

    def gen() -> Iterator[Event]:
        empty: Event = {}
        for eid, u, i, tms, r in zip(ids, users, items, ts[order].tolist(), ratings, strict=True):
            yield {
                "event_id": eid,
                "session_id": u,
                "item_id": i,
                "ts": tms,
                "event_type": "click",
                "user_id": u,
                "rating": r,
                **features.get(i, empty),
            }

    return gen()


def read_yoochoose(path: str | os.PathLike[str], *, limit: int | None = None) -> Iterator[Event]:
    """YOOCHOOSE clicks (TSV ``SessionId ItemId Time``, seconds) as events, oldest first.

    ``path`` is one file, or a folder (or its parent) with the 100k sample, of
    which the ``*train_full*.txt`` and ``*test*.txt`` files are read (they are
    disjoint and together the whole sample). ``session_id``/``item_id`` are the
    raw tokens, ``ts`` = round(Time * 1000), ``event_type`` "click", and
    ``event_id`` = ``yc-<session>-<item>-<ts>`` (``-1``.. on exact repeats), so
    the same click has the same id in every split file.
    """
    p = Path(path)
    if p.is_dir() and (p / "yoochoose-100k").is_dir():
        p = p / "yoochoose-100k"
    if p.is_dir():
        files = sorted(p.glob("*train_full*.txt")) + sorted(p.glob("*test*.txt"))
        if not files:
            raise FileNotFoundError(
                f"no *train_full*.txt / *test*.txt in {p}; pass one TSV file instead"
            )
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"{p} not found; pass a YOOCHOOSE TSV file or its folder")
    types = {"SessionId": pa.string(), "ItemId": pa.string(), "Time": pa.float64()}
    t = pa.concat_tables([_read_tsv(f, types).select(list(types)) for f in files])
    ts = _ms(t.column("Time"))
    order = _ordered(ts, limit)
    sessions = t.column("SessionId").take(order).to_pylist()
    items = t.column("ItemId").take(order).to_pylist()
    ts_sorted = ts[order].tolist()
    ids = _unique_ids(
        [f"yc-{s}-{i}-{m}" for s, i, m in zip(sessions, items, ts_sorted, strict=True)]
    )
    logger.info("read %d YOOCHOOSE events from %s", len(ids), ", ".join(map(str, files)))
    return (
        {"event_id": e, "session_id": s, "item_id": i, "ts": m, "event_type": "click"}
        for e, s, i, m in zip(ids, sessions, items, ts_sorted, strict=True)
    )


#: Dataset name -> reader, for the CLI: ``DATASETS[name](default_data_dir())``.
DATASETS: dict[str, Callable[..., Iterator[Event]]] = {
    "ml-100k": read_movielens_100k,
    "yoochoose": read_yoochoose,
}
