"""The Redis session store: key layout, idempotent batch apply, popularity, reads.

The layout is specified in ``docs/redis-layout.md``; the key builders here are
pure functions. Every key of a session shares the hash tag ``{<session_id>}``,
so one Lua script can touch all of them on Redis Cluster too.

A batch is applied in two round trips, each one Lua call per hash slot,
pipelined (one call in all on a single Redis):

1. :data:`SESSION_SCRIPT` per session: skip an event whose ``event_id`` the
   session has seen (a duplicate, or the same record delivered again), else add
   it to the session's time-ordered set, trim to ``max_session_len``, refresh
   the idle TTL. It answers, per event, ``A`` (applied now), ``R`` (this very
   record was applied before: a replay), ``D`` (another record with this
   ``event_id`` was applied: a duplicate) or ``S`` (stale offset of an expired
   session: ignored).
2. :data:`POPULARITY_SCRIPT` adds ``2 ** ((ts - ref) / half_life)`` per ``A``
   or ``R`` event whose offset is past the popularity's own per-partition
   watermark: exactly once per applied event, even when a crash fell between
   the two round trips. Scores are rebased before they can overflow.

Replaying any batch therefore leaves the store as a single delivery would.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis
from redis.cluster import RedisCluster

from ingest.events import ClickEvent

# ------------------------------------------------------------------ keys


def session_tag(session_id: str) -> str:
    """The hash tag of a session's keys.

    Redis hashes only the text between the first ``{`` and the next ``}``; a
    session id containing braces would cut that short, so such ids are tagged
    by a digest instead (the key still carries the id, so keys stay unique).

    >>> session_tag("s42")
    '{s42}'
    >>> session_tag("odd}id").startswith("{#") and session_tag("odd}id").endswith("}:odd}id")
    True
    """
    if "{" in session_id or "}" in session_id:
        digest = hashlib.blake2b(session_id.encode(), digest_size=8).hexdigest()
        return f"{{#{digest}}}:{session_id}"
    return f"{{{session_id}}}"


@dataclass(frozen=True, slots=True)
class SessionKeys:
    events: str  # ZSET  member = encoded event, score = ts (ms)
    state: str  # HASH  "e:<event_id>" -> "<partition>:<offset>" that applied it,
    #                   "o:<partition>" -> last offset seen, "n" -> events applied


def session_keys(prefix: str, session_id: str) -> SessionKeys:
    """
    >>> session_keys("sr", "s1")
    SessionKeys(events='sr:{s1}:ev', state='sr:{s1}:h')
    """
    base = f"{prefix}:{session_tag(session_id)}"
    return SessionKeys(f"{base}:ev", f"{base}:h")


def popularity_keys(prefix: str) -> tuple[str, str]:
    """(ZSET item -> rebased score, HASH ``ref`` + ``o:<partition>`` watermarks)."""
    return f"{prefix}:{{pop}}:z", f"{prefix}:{{pop}}:m"


# ------------------------------------------------------------------ encoding

_encoder = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


def encode_member(ev: ClickEvent) -> bytes:
    """The stored form of an event: compact JSON, keys in a fixed order.

    ``session_id`` is the key, so it is not repeated. Deterministic: the same
    event always encodes to the same bytes (the set member must be stable).
    """
    out: dict[str, Any] = {
        "event_id": ev.event_id,
        "item_id": ev.item_id,
        "ts": ev.ts,
        "event_type": ev.event_type,
    }
    if ev.user_id is not None:
        out["user_id"] = ev.user_id
    for k in sorted(ev.features):
        out[k] = ev.features[k]
    return _encoder.encode(out)


def decode_member(raw: bytes) -> dict[str, Any]:
    return msgspec.json.decode(raw)


# ------------------------------------------------------------------ scripts

# ARGV[3] is one msgpack array per session of [partition, offset, event_id, ts,
# member] (partition and offset as strings: exact in Lua whatever their size);
# packing the batch in one argument keeps the client's encoding cost low.
# Per session the script makes a fixed number of calls (HMGET, ZADD, HSET,
# 2 x EXPIRE, and ZREMRANGEBYRANK once it is full), whatever its event count.
SESSION_SCRIPT = """
local max_len = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local batch = cmsgpack.unpack(ARGV[3])
local out = {}
for j = 1, #batch do
  local ev, h = KEYS[2*j-1], KEYS[2*j]
  local evs = batch[j]
  -- 1. one read: applied count, the watermark of every partition, every event id
  local fields, slot = {'n'}, {}
  for _, e in ipairs(evs) do
    local wf = 'o:' .. e[1]
    if slot[wf] == nil then fields[#fields+1] = wf; slot[wf] = #fields end
    local idf = 'e:' .. e[3]
    if slot[idf] == nil then fields[#fields+1] = idf; slot[idf] = #fields end
  end
  local vals = redis.call('HMGET', h, unpack(fields))
  local known, wm, wm_raw = {}, {}, {}
  for f, i in pairs(slot) do
    local v = vals[i]
    if string.sub(f, 1, 2) == 'o:' then wm[f] = tonumber(v or '-1') else known[f] = v end
  end
  -- 2. decide every event without touching Redis
  local st, zargs, hargs = {}, {}, {}
  local applied = 0
  for i, e in ipairs(evs) do
    local wf, idf, o = 'o:' .. e[1], 'e:' .. e[3], tonumber(e[2])
    local where = e[1] .. ':' .. e[2]
    local prev = known[idf]
    if prev then
      if prev == where then st[i] = 'R' else st[i] = 'D' end
    elseif o <= wm[wf] then
      st[i] = 'S'
    else
      known[idf] = where
      hargs[#hargs+1] = idf; hargs[#hargs+1] = where
      zargs[#zargs+1] = e[4]; zargs[#zargs+1] = e[5]
      applied = applied + 1
      st[i] = 'A'
    end
    if o > wm[wf] then wm[wf] = o; wm_raw[wf] = e[2] end
  end
  -- 3. writes
  for f, raw in pairs(wm_raw) do hargs[#hargs+1] = f; hargs[#hargs+1] = raw end
  if applied > 0 then
    local n = tonumber(vals[1] or '0') + applied
    hargs[#hargs+1] = 'n'; hargs[#hargs+1] = n
    for k = 1, #zargs, 2000 do
      redis.call('ZADD', ev, unpack(zargs, k, math.min(k + 1999, #zargs)))
    end
    -- every applied event is a new member, so the set holds min(n, max_len)
    -- before this batch's additions were trimmed: trim only when needed
    if n > max_len then redis.call('ZREMRANGEBYRANK', ev, 0, -(max_len + 1)) end
  end
  if #hargs > 0 then
    for k = 1, #hargs, 2000 do
      redis.call('HSET', h, unpack(hargs, k, math.min(k + 1999, #hargs)))
    end
    redis.call('EXPIRE', ev, ttl)
    redis.call('EXPIRE', h, ttl)
  end
  out[j] = table.concat(st)
end
return out
"""

# Scores are kept as 2 ** ((ts - ref) / half_life); ref moves forward (and all
# scores are scaled down) once an exponent passes REBASE_AT, far below overflow.
REBASE_AT = 64.0

# ARGV[3] is a msgpack array of [partition, offset, item_id, ts] in offset order.
POPULARITY_SCRIPT = """
local z, m = KEYS[1], KEYS[2]
local hl = tonumber(ARGV[1])
local rebase_at = tonumber(ARGV[2])
local rows = cmsgpack.unpack(ARGV[3])
local ref = tonumber(redis.call('HGET', m, 'ref') or '')
local wms = {}
local acc, order = {}, {}  -- summed weight per item: one ZINCRBY per distinct item
local function flush()
  for _, item in ipairs(order) do
    redis.call('ZINCRBY', z, string.format('%.17g', acc[item]), item)
  end
  acc, order = {}, {}
end
local added = 0
for _, r in ipairs(rows) do
  local p, o_raw, item, ts = r[1], r[2], r[3], r[4]
  local o = tonumber(o_raw)
  if wms[p] == nil then
    wms[p] = {tonumber(redis.call('HGET', m, 'o:' .. p) or '-1'), nil}
  end
  local wm = wms[p]
  if o > wm[1] then
    if not ref then
      ref = ts
      redis.call('HSET', m, 'ref', string.format('%d', ref))
    end
    local e = (ts - ref) / hl
    if e > rebase_at then
      flush()
      redis.call('ZUNIONSTORE', z, 1, z, 'WEIGHTS', string.format('%.17g', 2 ^ (-e)))
      redis.call('ZREMRANGEBYSCORE', z, '-inf', '(1e-12')
      ref = ts
      redis.call('HSET', m, 'ref', string.format('%d', ref))
      e = 0
    end
    if acc[item] == nil then acc[item] = 0; order[#order+1] = item end
    acc[item] = acc[item] + 2 ^ e
    wm[1] = o
    wm[2] = o_raw
    added = added + 1
  end
end
flush()
for p, wm in pairs(wms) do
  if wm[2] then redis.call('HSET', m, 'o:' .. p, wm[2]) end
end
return added
"""


@dataclass(frozen=True)
class StoreConfig:
    prefix: str = "sr"
    max_session_len: int = 50
    session_ttl_s: int = 1800
    popularity_half_life_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_session_len < 1:
            raise ValueError(f"max_session_len must be >= 1, got {self.max_session_len}")
        if self.session_ttl_s < 1:
            raise ValueError(f"session_ttl_s must be >= 1, got {self.session_ttl_s}")
        if not self.popularity_half_life_s > 0:
            raise ValueError("popularity_half_life_s must be > 0")


@dataclass(frozen=True, slots=True)
class Positioned:
    """A valid event and where it came from."""

    event: ClickEvent
    partition: int
    offset: int


@dataclass(frozen=True)
class ApplyResult:
    applied: int
    replayed: int
    duplicates: int
    stale: int
    popularity_added: int


class SessionStore:
    """Applies batches to Redis (single node or cluster) and reads them back."""

    def __init__(self, client: redis.Redis | RedisCluster, config: StoreConfig | None = None) -> None:
        self.client = client
        self.config = config or StoreConfig()
        self.cluster = isinstance(client, RedisCluster)
        self._session_script = client.register_script(SESSION_SCRIPT)
        self._pop_script = client.register_script(POPULARITY_SCRIPT)
        self._pop_keys = popularity_keys(self.config.prefix)

    # -------------------------------------------------------------- writes
    def apply(self, batch: Sequence[Positioned]) -> ApplyResult:
        """Apply a batch idempotently. Raises redis errors; the caller retries."""
        cfg = self.config
        by_session: dict[str, list[Positioned]] = defaultdict(list)
        for pe in batch:
            by_session[pe.event.session_id].append(pe)
        groups = self._group_by_slot(list(by_session))

        # Round trip 1: one script call per slot group (one in all on a single node).
        pipe = self.client.pipeline(transaction=False)
        for sessions in groups:
            keys: list[str] = []
            payload: list[list[tuple[str, str, str, int, str]]] = []
            for sid in sessions:
                k = session_keys(cfg.prefix, sid)
                keys += (k.events, k.state)
                payload.append(
                    [
                        (str(pe.partition), str(pe.offset), pe.event.event_id, pe.event.ts,
                         encode_member(pe.event).decode())
                        for pe in by_session[sid]
                    ]
                )
            args = [cfg.max_session_len, cfg.session_ttl_s, _msgpack.encode(payload)]
            if self.cluster:  # the cluster pipeline refuses EVALSHA; plain EVAL is allowed
                pipe.execute_command("EVAL", SESSION_SCRIPT, len(keys), *keys, *args)
            else:
                self._session_script(keys=keys, args=args, client=pipe)
        replies = pipe.execute()

        counts_by_status = {"A": 0, "R": 0, "D": 0, "S": 0}
        for_pop: list[Positioned] = []
        for sessions, reply in zip(groups, replies, strict=True):
            for sid, statuses in zip(sessions, reply, strict=True):
                statuses = statuses.decode() if isinstance(statuses, bytes) else statuses
                for pe, st in zip(by_session[sid], statuses, strict=True):
                    counts_by_status[st] += 1
                    if st in "AR":
                        for_pop.append(pe)
        # The popularity watermark is per partition: feed it in offset order.
        for_pop.sort(key=lambda pe: (pe.partition, pe.offset))
        rows = [(str(pe.partition), str(pe.offset), pe.event.item_id, pe.event.ts) for pe in for_pop]

        # Round trip 2: popularity, exactly once per applied event.
        added = 0
        if rows:
            half_life_ms = cfg.popularity_half_life_s * 1000.0
            added = int(
                self._pop_script(
                    keys=list(self._pop_keys),
                    args=[half_life_ms, REBASE_AT, _msgpack.encode(rows)],
                )
            )
        return ApplyResult(
            counts_by_status["A"], counts_by_status["R"], counts_by_status["D"],
            counts_by_status["S"], added,
        )

    def _group_by_slot(self, sessions: list[str]) -> list[list[str]]:
        if not self.cluster:
            return [sessions] if sessions else []
        slots: dict[int, list[str]] = defaultdict(list)
        for sid in sessions:
            slots[self.client.keyslot(session_keys(self.config.prefix, sid).events)].append(sid)
        return list(slots.values())

    # -------------------------------------------------------------- reads
    def session(self, session_id: str) -> list[dict[str, Any]]:
        """The session's stored events, oldest first (by ts, then member bytes)."""
        raw = self.client.zrange(session_keys(self.config.prefix, session_id).events, 0, -1)
        return [decode_member(r) for r in raw]

    def sessions(self, session_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Several sessions in one pipelined round trip; missing ones are empty."""
        ids = list(session_ids)
        pipe = self.client.pipeline(transaction=False)
        for sid in ids:
            pipe.zrange(session_keys(self.config.prefix, sid).events, 0, -1)
        return {
            sid: [decode_member(r) for r in raw]
            for sid, raw in zip(ids, pipe.execute(), strict=True)
        }

    def popularity(self, k: int | None = None, now_ms: int | None = None) -> list[tuple[str, float]]:
        """Items by decayed count at ``now_ms`` (default: the newest event's time), best first."""
        z, m = self._pop_keys
        ref = self.client.hget(m, "ref")
        if ref is None:
            return []
        end = -1 if k is None else k - 1
        rows = self.client.zrevrange(z, 0, end, withscores=True)
        at = int(ref) if now_ms is None else now_ms
        scale = 2.0 ** (-(at - int(ref)) / (self.config.popularity_half_life_s * 1000.0))
        return [(item.decode() if isinstance(item, bytes) else item, s * scale) for item, s in rows]


# ------------------------------------------------------------------ reference model


def reference_state(
    events_in_partition_order: Iterable[ClickEvent], config: StoreConfig, now_ms: int
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """What the store must hold after a stream, straight from the contract.

    Per session: the ``max_session_len`` latest events by (ts, stored bytes),
    counting each ``event_id`` once (first delivery wins). Popularity: every
    such event counted once with weight ``2 ** ((ts - now) / half_life)``.
    Independent of offsets, batching and crashes: the tests compare the real
    store against it.
    """
    seen: dict[str, set[str]] = defaultdict(set)
    kept: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
    pop: dict[str, float] = defaultdict(float)
    hl = config.popularity_half_life_s * 1000.0
    for ev in events_in_partition_order:
        if ev.event_id in seen[ev.session_id]:
            continue
        seen[ev.session_id].add(ev.event_id)
        kept[ev.session_id].append((ev.ts, encode_member(ev)))
        pop[ev.item_id] += math.pow(2.0, (ev.ts - now_ms) / hl)
    sessions = {
        sid: [decode_member(m) for _, m in sorted(rows)[-config.max_session_len :]]
        for sid, rows in kept.items()
    }
    return sessions, dict(pop)
