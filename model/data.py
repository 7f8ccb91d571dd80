"""The trainer's data side: encoded sequences in memory, padded batches, splits.

:class:`Sequences` holds encoded sessions the way ``features.sequences.write_sequences``
writes them (ids, not strings), but flat in memory: per feature one ``[N]`` tensor of
all events, sessions back to back, oldest event first, plus ``offsets [S + 1]``.
:meth:`Sequences.batches` serves padded :class:`~features.batch.FeatureBatch` es,
shuffled per epoch and sharded per DistributedDataParallel rank;
:func:`leave_one_out` and :func:`next_item_split` build evaluation queries, and
:func:`eval_batches` serves them with the full history of each query for
"exclude already seen items". MovieLens-1M loading is in :mod:`model.ml1m`.

Everything is vectorised over offsets: no Python loop per event, one per batch.

>>> data = Sequences.from_lists({"item_id": [[3, 4, 5, 6], [7], [8, 9, 10]]})
>>> len(data), data.lengths.tolist()
(3, [4, 1, 3])
>>> batch = next(data.batches(batch_size=2, max_len=3))  # the LAST 3 events, right-padded
>>> batch.features["item_id"], batch.lengths.tolist(), batch.session_ids
(tensor([[4, 5, 6],
        [7, 0, 0]]), [3, 1], ['0', '1'])
>>> split = leave_one_out(data)  # session '1' has < 3 events: train only
>>> split.train.lengths.tolist(), split.test[1].tolist(), split.valid[1].tolist()
([2, 1, 1], [6, 10], [5, 9])
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from features.batch import FeatureBatch, pad_features
from features.ops.sequence import PadTruncate
from features.sequences import sequences_metadata

__all__ = [
    "EvalBatch",
    "LeaveOneOut",
    "Sequences",
    "epoch_order",
    "eval_batches",
    "item_counts",
    "leave_one_out",
    "next_item_split",
    "rank_batches",
]

logger = logging.getLogger(__name__)

_DTYPES = (torch.int64, torch.float32)


# -- pure index functions -------------------------------------------------------------


def _event_index(offsets: Tensor, sessions: Tensor, max_len: int | None) -> tuple[Tensor, Tensor]:
    """Events of ``sessions`` (their last ``max_len`` if given): (event index [M], offsets [K + 1]).

    >>> _event_index(torch.tensor([0, 3, 3, 5]), torch.tensor([2, 0]), max_len=2)
    (tensor([3, 4, 1, 2]), tensor([0, 2, 4]))
    """
    ends = offsets[sessions + 1]  # [K]
    starts = offsets[sessions]  # [K]
    if max_len is not None:
        starts = torch.maximum(starts, ends - max_len)
    lens = ends - starts  # [K]
    new_offsets = torch.cat([lens.new_zeros(1), torch.cumsum(lens, 0)])  # [K + 1]
    total = int(new_offsets[-1])
    shift = torch.repeat_interleave(starts - new_offsets[:-1], lens, output_size=total)  # [M]
    return torch.arange(total, device=offsets.device) + shift, new_offsets


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def epoch_order(
    lengths: Tensor, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> Tensor:
    """Indices of the non-empty sessions for one epoch, shuffled from ``(seed, epoch)`` only.

    The permutation is drawn on the CPU from a generator seeded by a hash of
    ``(seed, epoch)`` (so ``(0, 1)`` and ``(1, 0)`` differ), identical on every
    rank and every device. Empty sessions are left out.

    >>> epoch_order(torch.tensor([2, 0, 1, 4])).tolist()
    [0, 2, 3]
    >>> a = epoch_order(torch.ones(50), shuffle=True, seed=3, epoch=1)
    >>> torch.equal(a, epoch_order(torch.ones(50), shuffle=True, seed=3, epoch=1))
    True
    """
    _check_count("seed", seed, 0)
    _check_count("epoch", epoch, 0)
    order = torch.nonzero(lengths.cpu() > 0).flatten()  # [T]
    if shuffle and order.numel() > 1:
        state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)
        gen = torch.Generator().manual_seed(int(state[0]))
        order = order[torch.randperm(order.numel(), generator=gen)]
    return order


def rank_batches(
    order: Tensor, batch_size: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[Tensor]:
    """Rank ``rank``'s batches of ``order`` (session indices) for DistributedDataParallel.

    ``order`` is padded to a multiple of ``world_size`` by repeating its first
    entries (as torch's ``DistributedSampler`` does), then cut into global
    batches of ``batch_size * world_size`` consecutive entries; rank ``r`` takes
    the ``r``-th of ``world_size`` equal parts of each global batch. Every rank
    yields the same number of batches, and the ranks' batches of step ``i``, put
    side by side in rank order, are the single-process batch ``i`` of size
    ``batch_size * world_size`` (plus, in the last step only, the < ``world_size``
    repeated entries).

    >>> [b.tolist() for b in rank_batches(torch.arange(7), 2, rank=1, world_size=2)]
    [[2, 3], [6, 0]]
    """
    batch_size = _check_count("batch_size", batch_size, 1)
    world_size = _check_count("world_size", world_size, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    n = order.numel()
    if n == 0:
        return
    total = -(-n // world_size) * world_size
    padded = order[torch.arange(total, device=order.device) % n]  # [total]
    step = batch_size * world_size
    for start in range(0, total, step):
        part = (min(start + step, total) - start) // world_size
        yield padded[start + rank * part : start + (rank + 1) * part]


# -- sequences ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Sequences:
    """Encoded sessions in memory: per feature one flat tensor of all events, and session offsets.

    Fields:
        features: name -> ``[N]`` tensor (int64 ids or float32 values), sessions
            back to back, each oldest event first.
        offsets: int64 ``[S + 1]`` from 0 to ``N``, non-decreasing: session ``s``
            is events ``offsets[s]:offsets[s + 1]`` (equal neighbours: empty session).
        session_ids: the ``S`` session keys.

    Checked on construction (a ``ValueError`` says what is wrong); treat as
    read-only. All tensors live on one device; batches come out on it.
    """

    features: dict[str, Tensor]
    offsets: Tensor
    session_ids: list[str]

    def __post_init__(self) -> None:
        offs, ids = self.offsets, list(self.session_ids)
        if not isinstance(offs, Tensor) or offs.dim() != 1 or offs.dtype != torch.int64:
            raise ValueError("offsets must be a 1-D int64 tensor of S + 1 entries")
        if offs.numel() != len(ids) + 1:
            raise ValueError(f"offsets has {offs.numel()} entries for {len(ids)} sessions")
        if not self.features:
            raise ValueError("Sequences needs at least one feature")
        n = int(offs[-1])
        if int(offs[0]) != 0 or bool((offs[1:] < offs[:-1]).any()):
            raise ValueError("offsets must start at 0 and be non-decreasing")
        for name, values in self.features.items():
            if not isinstance(values, Tensor) or values.shape != (n,):
                shape = getattr(values, "shape", type(values).__name__)
                raise ValueError(f"feature {name!r}: need a [N={n}] tensor, got {shape}")
            if values.dtype not in _DTYPES or values.device != offs.device:
                raise ValueError(
                    f"feature {name!r}: need int64 or float32 on {offs.device}, "
                    f"got {values.dtype} on {values.device}"
                )
        object.__setattr__(self, "features", dict(self.features))
        object.__setattr__(self, "session_ids", ids)

    def __repr__(self) -> str:
        return (
            f"Sequences(sessions={len(self)}, events={self.num_events}, "
            f"features={list(self.features)}, device={self.offsets.device})"
        )

    def __len__(self) -> int:
        return len(self.session_ids)

    @property
    def lengths(self) -> Tensor:
        """Events per session, int64 ``[S]``."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    # -- constructors -----------------------------------------------------------------

    @classmethod
    def from_parquet(
        cls, path: str | os.PathLike[str], features: Sequence[str] | None = None
    ) -> Sequences:
        """Read a ``write_sequences`` file (all its features, or ``features``) into memory.

        The sessions are what the file holds: already cut to the ``max_len``
        it was written with (``sequences_metadata(path)``), in file order.
        """
        names = list(sequences_metadata(path)["features"])
        wanted = names if features is None else list(features)
        unknown = [f for f in wanted if f not in names]
        if unknown or not wanted:
            raise ValueError(f"{path}: no feature(s) {unknown}; the file has {names}")
        table = pq.read_table(path, columns=["session_id", "length", *wanted])
        lengths = table["length"].to_numpy().astype(np.int64)
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        flat = {}
        for name in wanted:
            lists = table[name]
            if lists.null_count or not np.array_equal(
                pc.list_value_length(lists).to_numpy(), lengths
            ):
                raise ValueError(f"{path}: column {name!r} does not match 'length'")
            flat[name] = torch.from_numpy(np.array(pc.list_flatten(lists).to_numpy(), copy=True))
        return cls(flat, offsets, table["session_id"].to_pylist())

    @classmethod
    def from_lists(
        cls,
        features: Mapping[str, Sequence[Sequence[float | int]]],
        session_ids: Sequence[str] | None = None,
    ) -> Sequences:
        """Small data from Python lists: ``{name: [session values, ...]}`` (tests, examples).

        A feature whose values are all integers becomes int64, otherwise float32.

        >>> s = Sequences.from_lists({"item_id": [[3, 4], []], "price": [[0.5, 1], []]})
        >>> s.offsets.tolist(), s.features["price"].dtype, s.session_ids
        ([0, 2, 2], torch.float32, ['0', '1'])
        """
        if not features:
            raise ValueError("from_lists needs at least one feature")
        per_name = {name: [list(s) for s in sessions] for name, sessions in features.items()}
        lengths = {name: [len(s) for s in sessions] for name, sessions in per_name.items()}
        first = next(iter(lengths.values()))
        bad = [name for name, lens in lengths.items() if lens != first]
        if bad:
            raise ValueError(f"features {bad} have other session lengths than the first feature")
        offsets = torch.tensor([0, *np.cumsum(first, dtype=np.int64).tolist()], dtype=torch.int64)
        flat = {}
        for name, sessions in per_name.items():
            values = np.asarray([v for s in sessions for v in s])
            integer = values.size == 0 or np.issubdtype(values.dtype, np.integer)
            flat[name] = torch.as_tensor(values, dtype=torch.int64 if integer else torch.float32)
        ids = [str(i) for i in range(len(first))] if session_ids is None else list(session_ids)
        return cls(flat, offsets, ids)

    # -- reshaping ----------------------------------------------------------------------

    def to(self, device: torch.device | str) -> Sequences:
        """The same sequences on ``device``."""
        return Sequences(
            {k: v.to(device) for k, v in self.features.items()},
            self.offsets.to(device),
            self.session_ids,
        )

    def _keep_first(self, keep: Tensor) -> Sequences:
        """Each session cut to its first ``keep[s]`` events (``keep <= lengths``)."""
        lengths = self.lengths
        session = torch.repeat_interleave(
            torch.arange(len(self), device=lengths.device), lengths, output_size=self.num_events
        )  # [N]
        pos = torch.arange(self.num_events, device=lengths.device) - self.offsets[session]  # [N]
        rows = pos < keep[session]  # [N]
        offsets = torch.cat([keep.new_zeros(1), torch.cumsum(keep, 0)])  # [S + 1]
        return Sequences({k: v[rows] for k, v in self.features.items()}, offsets, self.session_ids)

    def drop_last(self, n: int = 1) -> Sequences:
        """Every session without its last ``n`` events (shorter ones become empty, not dropped).

        >>> Sequences.from_lists({"x": [[1, 2, 3], [4]]}).drop_last(1).features["x"].tolist()
        [1, 2]
        """
        n = _check_count("n", n, 0)
        return self if n == 0 else self._keep_first(torch.clamp_min(self.lengths - n, 0))

    def select(self, index: Tensor) -> Sequences:
        """Sessions ``index`` (int64 ``[K]``, repeats allowed) or where a bool ``[S]`` is True.

        >>> data = Sequences.from_lists({"x": [[1, 2], [3], [4]]})
        >>> data.select(torch.tensor([2, 0])).session_ids
        ['2', '0']
        """
        index = torch.as_tensor(index, device=self.offsets.device)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(f"a bool mask must have shape [{len(self)}], got {index.shape}")
            index = torch.nonzero(index).flatten()
        if index.dim() != 1 or index.dtype != torch.int64:
            raise ValueError("index must be a 1-D int64 tensor of session indices or a bool mask")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise ValueError(f"session indices must be in [0, {len(self)})")
        events, offsets = _event_index(self.offsets, index, None)
        ids = np.asarray(self.session_ids, dtype=object)[index.cpu().numpy()].tolist()
        return Sequences({k: v[events] for k, v in self.features.items()}, offsets, ids)

    # -- batches ------------------------------------------------------------------------

    def _padded(self, sessions: Tensor, max_len: int, ids: np.ndarray) -> FeatureBatch:
        """``sessions`` cut to their last ``max_len`` events, right-padded to ``max_len``."""
        sessions = sessions.to(self.offsets.device)
        events, offsets = _event_index(self.offsets, sessions, max_len)
        flat = {k: v[events] for k, v in self.features.items()}  # each [M]
        names = ids[sessions.cpu().numpy()].tolist()
        return pad_features(
            flat, offsets.cpu().numpy(), PadTruncate(max_len), names, self.offsets.device
        )

    def batches(
        self,
        batch_size: int,
        max_len: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[FeatureBatch]:
        """One epoch of padded batches for rank ``rank`` of ``world_size``.

        Empty sessions are skipped before anything else. Each session is cut to
        its **last** ``max_len`` events and right-padded to ``L = max_len``
        (``FeatureBatch``: features ``[B, L]``, 0 / 0.0 at padding, ``mask``,
        ``lengths``, ``session_ids``). ``shuffle``: the order is a permutation
        drawn from ``(seed, epoch)`` only (:func:`epoch_order`), the same on
        every rank; pass the epoch number to get a new order each epoch.
        Sharding: :func:`rank_batches` (every rank yields
        ``num_batches(batch_size, world_size)`` batches; the last one may be
        smaller, and holds < ``world_size`` repeated sessions over all ranks).
        """
        max_len = _check_count("max_len", max_len, 1)
        order = epoch_order(self.lengths, shuffle=shuffle, seed=seed, epoch=epoch)
        ids = np.asarray(self.session_ids, dtype=object)
        for sessions in rank_batches(order, batch_size, rank=rank, world_size=world_size):
            yield self._padded(sessions, max_len, ids)

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Batches ``batches(batch_size, ..., world_size=world_size)`` yields on every rank."""
        batch_size = _check_count("batch_size", batch_size, 1)
        world_size = _check_count("world_size", world_size, 1)
        n = int((self.lengths > 0).sum())
        total = -(-n // world_size) * world_size
        return -(-total // (batch_size * world_size))


# -- evaluation queries -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class EvalBatch:
    """Evaluation queries: a history, the held-out next item, every item already seen.

    Fields:
        inputs: the history (last ``max_len`` events), right-padded ``[B, L]``.
        targets: int64 ``[B, 1]``, the item id to predict.
        seen: int64 ``[2, nnz]``: (row in batch, item id) for every event of the
            full, untruncated history (repeats kept), to exclude seen items
            beyond ``max_len`` too. If a target also occurs in its history,
            excluding ``seen`` excludes the target: put it back if wanted.
    """

    inputs: FeatureBatch
    targets: Tensor
    seen: Tensor


def _item_feature(data: Sequences, item_feature: str) -> Tensor:
    if item_feature not in data.features:
        have = list(data.features)
        raise KeyError(f"no item feature {item_feature!r}; the sequences have {have}")
    items = data.features[item_feature]
    if items.dtype != torch.int64:
        raise ValueError(f"item feature {item_feature!r} must hold int64 ids, got {items.dtype}")
    return items


def next_item_split(data: Sequences, item_feature: str = "item_id") -> tuple[Sequences, Tensor]:
    """Each session -> (its events but the last, the last item id ``[S']``).

    Sessions with fewer than 2 events are dropped (nothing to predict from).

    >>> hist, targets = next_item_split(Sequences.from_lists({"item_id": [[3, 4, 5], [6]]}))
    >>> hist.features["item_id"].tolist(), targets.tolist(), hist.session_ids
    ([3, 4], [5], ['0'])
    """
    items = _item_feature(data, item_feature)
    keep = torch.nonzero(data.lengths >= 2).flatten()  # [S']
    if keep.numel() < len(data):
        logger.info("next_item_split: %d sessions with < 2 events dropped", len(data) - len(keep))
    targets = items[data.offsets[keep + 1] - 1]  # [S']
    return data.select(keep).drop_last(1), targets


def eval_batches(
    history: Sequences,
    targets: Tensor,
    batch_size: int,
    max_len: int,
    item_feature: str = "item_id",
) -> Iterator[EvalBatch]:
    """Queries in order, ``batch_size`` at a time: history cut to ``max_len``, target, seen items.

    >>> hist = Sequences.from_lists({"item_id": [[3, 4, 5]]})
    >>> b = next(eval_batches(hist, torch.tensor([6]), batch_size=8, max_len=2))
    >>> b.inputs.features["item_id"].tolist(), b.targets.tolist(), b.seen.tolist()
    ([[4, 5]], [[6]], [[0, 0, 0], [3, 4, 5]])
    """
    batch_size = _check_count("batch_size", batch_size, 1)
    max_len = _check_count("max_len", max_len, 1)
    items = _item_feature(history, item_feature)
    targets = torch.as_tensor(targets).reshape(-1)  # [S]
    if targets.numel() != len(history) or targets.dtype != torch.int64:
        raise ValueError(
            f"targets must be {len(history)} int64 item ids (one per history), "
            f"got {targets.numel()} {targets.dtype}"
        )
    empty = int((history.lengths == 0).sum())
    if empty:
        raise ValueError(
            f"{empty} histories are empty; build queries with next_item_split or leave_one_out, "
            "which drop sessions too short to have a history"
        )
    device = history.offsets.device
    ids = np.asarray(history.session_ids, dtype=object)
    for start in range(0, len(history), batch_size):
        sessions = torch.arange(start, min(start + batch_size, len(history)), device=device)
        events, offsets = _event_index(history.offsets, sessions, None)  # full histories
        rows = torch.repeat_interleave(
            torch.arange(sessions.numel(), device=device), offsets[1:] - offsets[:-1]
        )  # [nnz]
        yield EvalBatch(
            inputs=history._padded(sessions, max_len, ids),
            targets=targets[start : start + sessions.numel()].to(device).unsqueeze(1),  # [B, 1]
            seen=torch.stack([rows, items[events]]),  # [2, nnz]
        )


@dataclasses.dataclass(frozen=True, eq=False)
class LeaveOneOut:
    """The leave-one-out split (``train``; ``valid`` and ``test`` as (history, targets [U]))."""

    train: Sequences
    valid: tuple[Sequences, Tensor]
    test: tuple[Sequences, Tensor]


def leave_one_out(data: Sequences, item_feature: str = "item_id") -> LeaveOneOut:
    """The SASRec / BERT4Rec protocol (Kang & McAuley 2018) over each user's sequence.

    ``train``: every user without the last 2 items; ``valid``: history = all but
    the last 2, target = the 2nd-to-last item; ``test``: history = all but the
    last, target = the last item. Users with fewer than 3 events keep all of
    them in ``train`` and have no valid / test query (counted in a log line).
    """
    items = _item_feature(data, item_feature)
    lengths = data.lengths
    full = lengths >= 3  # [S]
    train = data._keep_first(torch.where(full, lengths - 2, lengths))
    users = torch.nonzero(full).flatten()  # [U]
    queries = data.select(users)
    ends = data.offsets[users + 1]  # [U]
    logger.info(
        "leave_one_out: %d users, %d with < 3 events kept in train without valid/test queries",
        len(data),
        len(data) - users.numel(),
    )
    return LeaveOneOut(
        train=train,
        valid=(queries.drop_last(2), items[ends - 2]),
        test=(queries.drop_last(1), items[ends - 1]),
    )


def item_counts(data: Sequences, num_items: int, item_feature: str = "item_id") -> Tensor:
    """How often each id ``0 .. num_items - 1`` occurs: int64 ``[num_items]``.

    >>> item_counts(Sequences.from_lists({"item_id": [[3, 4], [4]]}), 6).tolist()
    [0, 0, 0, 1, 2, 0]
    """
    items = _item_feature(data, item_feature)
    num_items = _check_count("num_items", num_items, 1)
    if items.numel() and int(items.max()) >= num_items:
        raise ValueError(
            f"item id {int(items.max())} >= num_items={num_items}; pass the item feature's "
            "cardinality (Workflow.cardinalities)"
        )
    return torch.bincount(items, minlength=num_items)
