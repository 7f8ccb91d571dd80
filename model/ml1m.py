"""MovieLens-1M as the SASRec authors preprocessed it: read, encode once, cache.

:func:`build_ml1m` turns ``ml-1m.txt`` into a fitted workflow and a training
sequences file (full histories, so leave-one-out takes the real last items),
and reuses them while the source file and the schema are unchanged. The
accuracy benchmark (``bench/accuracy.py``) and the tests use it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from features.schema import Feature, Kind, Schema, Tag
from features.sequences import sequences_metadata, write_sequences
from features.workflow import Workflow
from model.data import _check_count

__all__ = ["build_ml1m", "ml1m_schema", "read_ml1m"]

logger = logging.getLogger(__name__)

_ML1M_STAMP = "build.json"
_ML1M_FORMAT = "streamrec.ml1m-build/1"


def read_ml1m(path: str | os.PathLike[str]) -> pa.Table:
    """SASRec's preprocessed MovieLens-1M (``user item`` per line) -> an events table.

    Columns of the event contract: ``session_id`` (string: the user), ``item_id``
    (string) and ``ts`` (int64). The file has no timestamps, only each user's
    lines in time order, so ``ts`` is the position of the line among its user's
    lines (0, 1, ...): it keeps the order, it is not a time.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; it is SASRec's data/ml-1m.txt (see ../shared/data/README.md)"
        )
    table = pcsv.read_csv(
        path,
        read_options=pcsv.ReadOptions(column_names=["user", "item"]),
        parse_options=pcsv.ParseOptions(delimiter=" "),
        convert_options=pcsv.ConvertOptions(column_types={"user": pa.int64(), "item": pa.string()}),
    )
    users = table["user"].to_numpy()
    # Position of each line within its user: a stable sort keeps file order per user.
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    starts = np.r_[True, sorted_users[1:] != sorted_users[:-1]]
    idx = np.arange(users.size)
    ts = np.empty(users.size, np.int64)
    ts[order] = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    return pa.table(
        {
            "session_id": pc.cast(table["user"], pa.string()),
            "item_id": table["item"],
            "ts": pa.array(ts, pa.int64()),
        }
    )


def ml1m_schema() -> Schema:
    """The item id alone, ``categorify`` with ``min_freq=1`` (every movie gets an id)."""
    categorify = {"op": "categorify", "min_freq": 1}
    return Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID}, transform=categorify)])


def _ml1m_stamp(source: Path, max_len: int) -> dict[str, Any]:
    stat = source.stat()
    return {
        "format": _ML1M_FORMAT,
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "max_len": max_len,
        "schema": ml1m_schema().to_dict(),
    }


def _reuse_ml1m(out: Path, stamp: dict[str, Any]) -> Workflow | None:
    """The saved workflow if ``out`` holds a build of the same source and settings, else None."""
    try:
        saved = json.loads((out / _ML1M_STAMP).read_text(encoding="utf-8"))
        fingerprint = saved.pop("fingerprint")
        if saved != stamp:
            return None
        workflow = Workflow.load(out / "workflow")
        meta = sequences_metadata(out / "ml1m.parquet")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    if not workflow.fingerprint == meta["fingerprint"] == fingerprint:
        return None
    return workflow


def build_ml1m(
    path_txt: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    max_len: int = 200,
    *,
    progress: bool = False,
) -> tuple[Workflow, Path]:
    """MovieLens-1M -> (fitted workflow, ``out_dir/ml1m.parquet`` of FULL user histories).

    The workflow (``Workflow(ml1m_schema(), max_len)``, saved in
    ``out_dir/workflow``) is fitted on the whole file; the sequences are written
    with ``max_len`` raised to the longest user history, so no event is cut
    (leave-one-out must take the real last items; :meth:`Sequences.batches`
    cuts to the model's length). A stamp (``out_dir/build.json``: source size
    and mtime, ``max_len``, schema, fingerprint) lets a second call reuse the
    files instead of rebuilding.
    """
    source = Path(path_txt)
    out = Path(out_dir)
    max_len = _check_count("max_len", max_len, 1)
    parquet = out / "ml1m.parquet"
    stamp = _ml1m_stamp(source, max_len)
    workflow = _reuse_ml1m(out, stamp)
    if workflow is not None:
        logger.info("ml1m: reusing %s (same source and settings)", out)
        return workflow, parquet
    logger.info("ml1m: building %s from %s", out, source)
    events = read_ml1m(source)
    workflow = Workflow(ml1m_schema(), max_len=max_len).fit(events)
    longest = int(pc.max(pc.value_counts(events["session_id"]).field("counts")).as_py())
    out.mkdir(parents=True, exist_ok=True)
    (out / _ML1M_STAMP).unlink(missing_ok=True)  # no stale stamp while files change
    write_sequences(
        events, workflow, parquet, max_len=max(max_len, longest), min_len=1, progress=progress
    )
    workflow.save(out / "workflow")
    tmp = out / f".{_ML1M_STAMP}.tmp"
    tmp.write_text(json.dumps({**stamp, "fingerprint": workflow.fingerprint}, indent=1) + "\n")
    os.replace(tmp, out / _ML1M_STAMP)
    return workflow, parquet
