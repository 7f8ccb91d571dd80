"""The served record: what each session was recommended, kept briefly in Redis.

The drift monitor scores the live model on real traffic by comparing what a
session was shown with the item it clicks next. The server therefore writes,
per answer, one entry to the session's list (spec: ``docs/redis-layout.md``)::

    <prefix>:{<session_id>}:srv   LIST, newest first, at most `keep` entries, TTL `ttl_s`
    entry = {"ts": <ms>, "model_version": "v1" | null, "fallback": null | "<reason>",
             "k": 10, "items": ["i3", "i7", ...]}

The key shares the session's hash tag, so on Redis Cluster it lives in the
same slot as the session's events and one script can read both. Writing is
best effort and off the answer's critical path: a failed write is counted,
never an error for the client.

>>> rec = ServedRecord(ts=5, model_version="v1", fallback=None, k=2, items=("a", "b"))
>>> decode_record(encode_record(rec)) == rec
True
>>> served_key("sr", "s1")
'sr:{s1}:srv'
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import redis
from redis.cluster import RedisCluster

from ingest.store import session_tag

__all__ = ["ServedRecord", "ServedRecorder", "answer_before", "decode_record", "encode_record",
           "rank_of", "served_key"]

logger = logging.getLogger(__name__)


def served_key(prefix: str, session_id: str) -> str:
    """The served-record list of a session (same hash tag as its events)."""
    return f"{prefix}:{session_tag(session_id)}:srv"


@dataclasses.dataclass(frozen=True)
class ServedRecord:
    """One answer as served: when (ms), by which model version, why a fallback, top items."""

    ts: int
    model_version: str | None
    fallback: str | None
    k: int
    items: tuple[str, ...]


_encoder = msgspec.json.Encoder()


def encode_record(rec: ServedRecord) -> bytes:
    return _encoder.encode({"ts": rec.ts, "model_version": rec.model_version,
                            "fallback": rec.fallback, "k": rec.k, "items": list(rec.items)})


def decode_record(raw: bytes | str) -> ServedRecord:
    d = msgspec.json.decode(raw)
    return ServedRecord(ts=int(d["ts"]), model_version=d.get("model_version"),
                        fallback=d.get("fallback"), k=int(d["k"]), items=tuple(d["items"]))


def answer_before(records: Sequence[ServedRecord], click_ts: int) -> ServedRecord | None:
    """The latest answer served at or before ``click_ts``: the one the click reacts to.

    >>> rs = [ServedRecord(30, "v", None, 1, ("c",)), ServedRecord(10, "v", None, 1, ("a",))]
    >>> answer_before(rs, 20).items, answer_before(rs, 5)
    (('a',), None)
    """
    best: ServedRecord | None = None
    for r in records:
        if r.ts <= click_ts and (best is None or r.ts > best.ts):
            best = r
    return best


def rank_of(record: ServedRecord, item: str) -> int | None:
    """1-based rank of ``item`` in the answer, ``None`` if it was not shown.

    >>> rank_of(ServedRecord(0, "v", None, 3, ("a", "b", "c")), "b")
    2
    """
    try:
        return record.items.index(item) + 1
    except ValueError:
        return None


class ServedRecorder:
    """Writes and reads the served record (see the module docstring).

    Args:
        client: Redis or RedisCluster.
        prefix: the key prefix (``STREAMREC_REDIS_KEY_PREFIX``).
        ttl_s: the list expires this long after the session's last answer.
        keep: entries kept per session (the newest).
        max_items: top items of each answer kept.
    """

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str, *, ttl_s: int = 900,
                 keep: int = 10, max_items: int = 100):
        if ttl_s < 1 or keep < 1 or max_items < 1:
            raise ValueError("ttl_s, keep and max_items must be >= 1")
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.keep = keep
        self.max_items = max_items

    def record(self, served: Iterable[tuple[str, ServedRecord]]) -> int:
        """Append ``(session_id, record)`` pairs in one pipelined round trip; returns the count.

        Raises Redis errors (the caller counts them and carries on).
        """
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for sid, rec in served:
            if len(rec.items) > self.max_items:
                rec = dataclasses.replace(rec, items=rec.items[: self.max_items])
            key = served_key(self.prefix, sid)
            pipe.lpush(key, encode_record(rec))
            pipe.ltrim(key, 0, self.keep - 1)
            pipe.expire(key, self.ttl_s)
            n += 1
        if n:
            pipe.execute()
        return n

    def read(self, session_id: str) -> list[ServedRecord]:
        """The session's served answers, newest first (what the drift monitor reads)."""
        raw: list[Any] = self.client.lrange(served_key(self.prefix, session_id), 0, -1)
        return [decode_record(r) for r in raw]
