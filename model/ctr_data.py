"""MovieLens-100k as a click-through task for the two-tower pre-ranker, without leakage.

The setup of the IntTower paper's MovieLens experiment:

- **labels**: rating ``>= 4`` is a click (1), ``<= 2`` a non-click (0), 3 is dropped;
- **user features**: age (dense), gender, occupation (sparse) and the user's
  *liked-history* list: the items the user rated ``>= 4`` **strictly before**
  the row's timestamp (oldest first, the last ``max_history``), never the row
  itself, never the future, never an item rated at the same second;
- **item features**: item id (sparse), genres (list), release year (dense).

Rows are split **by time** (:func:`time_split`): the last ``test_fraction`` of
the labelled rows is the test split, the last ``valid_fraction`` of the rest
the validation slice (for early stopping), the remainder trains. Every train
timestamp is ``<=`` every validation timestamp ``<=`` every test timestamp
(rows sharing the boundary second go by their file order).

**Every encoder and scaler is fitted on the training rows only** (not the
validation slice, not test): vocabularies of item ids, genres, gender and
occupation; mean / std of age and year over the training rows. A value not
seen in training maps to the out-of-vocabulary id 2 (a missing one to 1, padding
is 0, fitted values start at 3); a missing dense value becomes 0.0, the training
mean. Histories use the item vocabulary, so items first liked after the
training period are OOV too.

>>> labels = label_ratings(np.array([5.0, 3.0, 2.0, 4.0]))
>>> labels.tolist()
[1, -1, 0, 1]
>>> [s.tolist() for s in time_split(np.array([40, 10, 30, 20, 50]), 0.2, 0.25)]
[[1, 3, 2], [0], [4]]
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pa_csv
import torch
from torch import Tensor

from model.config_base import ConfigError, from_dict, to_dict
from model.inttower import FieldConfig

__all__ = [
    "MISSING_ID",
    "OOV_ID",
    "CTRDataConfig",
    "CTRDataset",
    "CTREncoders",
    "CTRTensors",
    "Interactions",
    "Items",
    "Scaler",
    "Tables",
    "Users",
    "Vocabulary",
    "build_ctr",
    "label_ratings",
    "liked_histories",
    "load_ml100k_ctr",
    "read_ml100k",
    "time_split",
]

logger = logging.getLogger(__name__)

PAD_ID, MISSING_ID, OOV_ID, FIRST_ID = 0, 1, 2, 3


# --- raw tables --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interactions:
    """One row per rating: numpy arrays of equal length."""

    user_id: np.ndarray  # int64 [N]
    item_id: np.ndarray  # int64 [N]
    rating: np.ndarray  # float64 [N]
    timestamp: np.ndarray  # int64 [N], seconds


@dataclasses.dataclass(frozen=True)
class Users:
    """User side features; ``nan`` / ``None`` = missing."""

    user_id: np.ndarray  # int64 [U]
    age: np.ndarray  # float64 [U]
    gender: list[str | None]
    occupation: list[str | None]


@dataclasses.dataclass(frozen=True)
class Items:
    """Item side features; ``nan`` = unknown year, ``()`` = no genre."""

    item_id: np.ndarray  # int64 [I]
    year: np.ndarray  # float64 [I]
    genres: list[tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class Tables:
    interactions: Interactions
    users: Users
    items: Items


def _rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.split("\t") for line in lines[1:] if line]  # skip the header


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


def read_ml100k(directory: str | Path) -> Tables:
    """Read ``ml-100k.inter``, ``.user`` and ``.item`` (RecBole TSVs) from ``directory``."""
    root = Path(directory)
    paths = [root / f"ml-100k.{ext}" for ext in ("inter", "user", "item")]
    if missing := [str(p) for p in paths if not p.is_file()]:
        raise FileNotFoundError(f"MovieLens-100k files not found: {missing}; put them there "
                                "or set STREAMREC_DATA_DIR")
    table = pa_csv.read_csv(paths[0], parse_options=pa_csv.ParseOptions(delimiter="\t"))
    inter = np.stack([table.column(i).to_numpy().astype(np.float64) for i in range(4)], 1)
    users = _rows(paths[1])
    items = _rows(paths[2])
    return Tables(
        Interactions(inter[:, 0].astype(np.int64), inter[:, 1].astype(np.int64),
                     inter[:, 2], inter[:, 3].astype(np.int64)),
        Users(np.array([int(r[0]) for r in users], np.int64),
              np.array([_float(r[1]) for r in users]),
              [r[2] or None for r in users], [r[3] or None for r in users]),
        Items(np.array([int(r[0]) for r in items], np.int64),
              np.array([_float(r[2]) for r in items]),  # "unkonwn" / "V" -> nan
              [tuple(r[3].split()) if len(r) > 3 else () for r in items]),
    )


# --- pure row functions ------------------------------------------------------------------------


def label_ratings(ratings: np.ndarray, positive_min: float = 4.0,
                  negative_max: float = 2.0) -> np.ndarray:
    """``int8`` label per rating: 1 (``>= positive_min``), 0 (``<= negative_max``), -1 dropped."""
    out = np.full(ratings.shape, -1, np.int8)
    out[ratings >= positive_min] = 1
    out[ratings <= negative_max] = 0
    return out


def time_split(timestamps: np.ndarray, test_fraction: float,
               valid_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, valid, test)`` row indices, each in time order (ties: row order).

    Test is the last ``round(n * test_fraction)`` rows by time, validation the last
    ``round(rest * valid_fraction)`` of the rest.
    """
    order = np.argsort(timestamps, kind="stable")
    n_test = round(len(order) * test_fraction)
    rest = order[: len(order) - n_test]
    n_valid = round(len(rest) * valid_fraction)
    return rest[: len(rest) - n_valid], rest[len(rest) - n_valid:], order[len(order) - n_test:]


def liked_histories(user_ids: np.ndarray, item_ids: np.ndarray, timestamps: np.ndarray,
                    liked: np.ndarray, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the user's liked items with a timestamp **strictly before** the row's.

    Returns ``(items [N, max_history] int64, lengths [N])``: row ``r`` holds its
    ``lengths[r]`` most recent earlier liked items, oldest first (ties by row
    order), then zeros. Vectorised: one sort and two binary searches.

    >>> items, lengths = liked_histories(np.array([7, 7, 7, 7, 8]), np.array([10, 11, 12, 13, 14]),
    ...     np.array([1, 2, 2, 3, 0]), np.array([True, True, True, False, True]), 2)
    >>> [items[r, :n].tolist() for r, n in enumerate(lengths)]
    [[], [10], [10], [11, 12], []]
    """
    n = len(user_ids)
    order = np.lexsort((np.arange(n), timestamps, user_ids))  # by user, time, row
    _, user_rank = np.unique(user_ids, return_inverse=True)
    _, ts_rank = np.unique(timestamps, return_inverse=True)
    key = user_rank.astype(np.int64) * (n + 1) + ts_rank  # orders (user, time) pairs
    liked_rows = order[liked[order]]  # liked rows sorted by (user, time, row)
    liked_key, liked_items = key[liked_rows], item_ids[liked_rows]
    end = np.searchsorted(liked_key, key, side="left")  # [N] liked entries strictly before
    begin = np.searchsorted(liked_key, user_rank.astype(np.int64) * (n + 1), side="left")
    lengths = np.minimum(end - begin, max_history)  # [N]
    slots = np.arange(max_history)  # [H]
    pos = (end - lengths)[:, None] + slots  # [N, H] positions into liked_items
    valid = slots < lengths[:, None]  # [N, H]
    items = np.where(valid, liked_items[np.minimum(pos, max(len(liked_items) - 1, 0))]
                     if len(liked_items) else 0, 0)
    return items.astype(np.int64), lengths.astype(np.int64)


# --- encoders ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Values -> ids ``3 ..``; ``None`` -> 1 (missing), unseen -> 2 (OOV), 0 = padding.

    >>> vocab = Vocabulary.fit(["b", "a", "b", None])
    >>> vocab.values, vocab.cardinality, vocab.encode(["a", "b", "zzz", None]).tolist()
    (('b', 'a'), 5, [4, 3, 2, 1])
    """

    values: tuple[str, ...]

    @classmethod
    def fit(cls, values: Iterable[Any]) -> Vocabulary:
        """Most frequent first, ties by value; ``None`` is not a value."""
        counts = Counter(str(v) for v in values if v is not None)
        return cls(tuple(v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))

    @property
    def cardinality(self) -> int:
        return FIRST_ID + len(self.values)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {v: FIRST_ID + i for i, v in enumerate(self.values)}

    def encode(self, values: Iterable[Any]) -> np.ndarray:
        index = self._index
        return np.array([MISSING_ID if v is None else index.get(str(v), OOV_ID) for v in values],
                        np.int64)


@dataclasses.dataclass(frozen=True)
class Scaler:
    """Standardisation ``(x - mean) / std``; ``nan`` (missing) -> 0.0, the mean.

    >>> s = Scaler.fit(np.array([1.0, 3.0, np.nan]))
    >>> s, s.transform(np.array([3.0, np.nan])).tolist()
    (Scaler(mean=2.0, std=1.0), [1.0, 0.0])
    """

    mean: float
    std: float

    @classmethod
    def fit(cls, values: np.ndarray) -> Scaler:
        x = values[~np.isnan(values)]
        if x.size == 0:
            return cls(0.0, 1.0)
        std = float(x.std())
        return cls(float(x.mean()), std if std > 0 else 1.0)

    def transform(self, values: np.ndarray) -> np.ndarray:
        return np.nan_to_num((values - self.mean) / self.std, nan=0.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CTREncoders:
    """Everything fitted on the training rows; JSON round trip through :meth:`to_dict`."""

    item: Vocabulary
    gender: Vocabulary
    occupation: Vocabulary
    genre: Vocabulary
    age: Scaler
    year: Scaler

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CTREncoders:
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: (Vocabulary(tuple(v["values"])) if kinds[k] == "Vocabulary"
                          else from_dict(Scaler, v)) for k, v in data.items()})


# --- tensors -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CTRTensors:
    """Encoded rows: ``user`` / ``item`` feature dicts (tower inputs), ``labels`` float ``[N]``,
    ``timestamps`` int64 ``[N]``. Sparse ``[N]`` int64, dense ``[N]`` float32, lists
    ``[N, S]`` int64 right-padded with 0."""

    user: dict[str, Tensor]
    item: dict[str, Tensor]
    labels: Tensor
    timestamps: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: Tensor) -> CTRTensors:
        return CTRTensors({k: v[index] for k, v in self.user.items()},
                          {k: v[index] for k, v in self.item.items()},
                          self.labels[index], self.timestamps[index])

    def to(self, device: torch.device | str) -> CTRTensors:
        return CTRTensors({k: v.to(device) for k, v in self.user.items()},
                          {k: v.to(device) for k, v in self.item.items()},
                          self.labels.to(device), self.timestamps.to(device))

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[CTRTensors]:
        """Consecutive batches (time order), or a shuffled order drawn from ``generator``."""
        n = len(self)
        dev = self.labels.device
        order = (torch.randperm(n, generator=generator, device=dev) if shuffle
                 else torch.arange(n, device=dev))
        for start in range(0, n, batch_size):
            yield self.select(order[start:start + batch_size])


def _encode_padded(vocab: Vocabulary, values: np.ndarray, valid: np.ndarray) -> Tensor:
    """Encode the ``valid`` entries of an int array through its distinct values; 0 elsewhere."""
    uniq, inverse = np.unique(values, return_inverse=True)
    codes = vocab.encode(uniq.tolist())[inverse.reshape(values.shape)]
    return torch.from_numpy(np.where(valid, codes, PAD_ID).astype(np.int64))


def _pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int64)  # 0 = padding
    for i, r in enumerate(rows):
        r = r[:width]
        out[i, :len(r)] = r
    return out


# --- the dataset -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CTRDataConfig:
    """How MovieLens ratings become CTR rows (module docstring).

    Fields:
        positive_min / negative_max: rating thresholds of clicks / non-clicks.
        test_fraction: share of the labelled rows, the latest, held out as test.
        valid_fraction: share of the remaining rows, the latest, for early stopping.
        max_history: longest liked-history list (the most recent items).
        max_genres: longest genre list.
    """

    positive_min: float = 4.0
    negative_max: float = 2.0
    test_fraction: float = 0.2
    valid_fraction: float = 0.1
    max_history: int = 50
    max_genres: int = 6

    def __post_init__(self) -> None:
        if not self.negative_max < self.positive_min:
            raise ConfigError("negative_max must be below positive_min")
        if not (0 < self.test_fraction < 1 and 0 <= self.valid_fraction < 1):
            raise ConfigError("test_fraction must be in (0, 1), valid_fraction in [0, 1)")
        if self.max_history < 1 or self.max_genres < 1:
            raise ConfigError("max_history and max_genres must be >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CTRDataConfig:
        return from_dict(cls, data)


@dataclasses.dataclass(frozen=True)
class CTRDataset:
    """The three time-ordered splits, the encoders fitted on ``train``, and the split info."""

    train: CTRTensors
    valid: CTRTensors
    test: CTRTensors
    encoders: CTREncoders
    config: CTRDataConfig
    info: dict[str, Any]

    def user_fields(self, pooling: str = "mean") -> tuple[FieldConfig, ...]:
        e = self.encoders
        return (FieldConfig("age", "dense"),
                FieldConfig("gender", "sparse", e.gender.cardinality),
                FieldConfig("occupation", "sparse", e.occupation.cardinality),
                FieldConfig("history", "sequence", e.item.cardinality, pooling))

    def item_fields(self, pooling: str = "mean") -> tuple[FieldConfig, ...]:
        e = self.encoders
        return (FieldConfig("item_id", "sparse", e.item.cardinality),
                FieldConfig("genres", "sequence", e.genre.cardinality, pooling),
                FieldConfig("year", "dense"))


def build_ctr(tables: Tables, config: CTRDataConfig | None = None) -> CTRDataset:
    """Label, split by time, fit the encoders on the train rows, encode every split."""
    cfg = config or CTRDataConfig()
    it, us, im = tables.interactions, tables.users, tables.items
    labels_all = label_ratings(it.rating, cfg.positive_min, cfg.negative_max)
    hist_items, hist_len = liked_histories(it.user_id, it.item_id, it.timestamp,
                                           labels_all == 1, cfg.max_history)  # every rating
    slots = np.arange(cfg.max_history)
    labelled = np.flatnonzero(labels_all >= 0)
    train, valid, test = (labelled[s] for s in time_split(it.timestamp[labelled],
                                                          cfg.test_fraction, cfg.valid_fraction))
    if len(train) == 0:
        raise ValueError("no training rows after labelling and splitting; lower test_fraction")
    u_index = {int(u): i for i, u in enumerate(us.user_id)}
    i_index = {int(m): i for i, m in enumerate(im.item_id)}
    u_rows = np.array([u_index.get(int(u), -1) for u in it.user_id])  # -1: no user record
    i_rows = np.array([i_index.get(int(m), -1) for m in it.item_id])

    def user_col(values: Sequence[Any], rows: np.ndarray) -> list[Any]:
        return [values[r] if r >= 0 else None for r in u_rows[rows]]

    def num(values: np.ndarray, index: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.where(index[rows] >= 0, values[np.maximum(index[rows], 0)], np.nan)

    enc = CTREncoders(  # fitted on the training rows only
        item=Vocabulary.fit(it.item_id[train]),
        gender=Vocabulary.fit(user_col(us.gender, train)),
        occupation=Vocabulary.fit(user_col(us.occupation, train)),
        genre=Vocabulary.fit(g for r in i_rows[train] if r >= 0 for g in im.genres[r]),
        age=Scaler.fit(num(us.age, u_rows, train)),
        year=Scaler.fit(num(im.year, i_rows, train)),
    )

    # genres: encoded once per item (row -1: an item without a record), gathered per row
    item_genres = np.vstack([_pad([enc.genre.encode(g).tolist() for g in im.genres],
                                  cfg.max_genres), np.zeros((1, cfg.max_genres), np.int64)])

    def encode(rows: np.ndarray) -> CTRTensors:
        hist = _encode_padded(enc.item, hist_items[rows], slots < hist_len[rows, None])
        user = {"age": torch.from_numpy(enc.age.transform(num(us.age, u_rows, rows))),
                "gender": torch.from_numpy(enc.gender.encode(user_col(us.gender, rows))),
                "occupation": torch.from_numpy(enc.occupation.encode(user_col(us.occupation, rows))),
                "history": hist}
        item = {"item_id": torch.from_numpy(enc.item.encode(it.item_id[rows].tolist())),
                "genres": torch.from_numpy(item_genres[i_rows[rows]]),
                "year": torch.from_numpy(enc.year.transform(num(im.year, i_rows, rows)))}
        return CTRTensors(user, item, torch.from_numpy(labels_all[rows].astype(np.float32)),
                          torch.from_numpy(it.timestamp[rows].astype(np.int64)))

    splits = {name: encode(rows) for name, rows in (("train", train), ("valid", valid),
                                                    ("test", test))}
    info = {name: {"rows": len(s), "positive_rate": float(s.labels.mean()) if len(s) else None,
                   "first_ts": int(s.timestamps.min()) if len(s) else None,
                   "last_ts": int(s.timestamps.max()) if len(s) else None}
            for name, s in splits.items()}
    logger.info("CTR splits: %s", info)
    return CTRDataset(splits["train"], splits["valid"], splits["test"], enc, cfg, info)


def load_ml100k_ctr(directory: str | Path, config: CTRDataConfig | None = None) -> CTRDataset:
    """:func:`read_ml100k` then :func:`build_ctr`."""
    return build_ctr(read_ml100k(directory), config)
