"""The click-event contract: decode and validate Kafka message bytes.

One JSON object per message on ``streamrec.events``, keyed by ``session_id``.
:class:`EventValidator` turns raw bytes into a :class:`ClickEvent` or a
:class:`Rejection` naming one :class:`RejectReason`; it never raises on bad
input, so a consumer can route every rejection to the dead-letter topic.
The full spec (fields, limits, reasons, DLQ record) is ``docs/events.md``.

>>> v = EventValidator()
>>> raw = b'{"event_id":"e1","session_id":"s1","item_id":"i9","ts":1700000000000,"price":9.5}'
>>> ev = v.decode(raw, key=b"s1", now_ms=1_700_000_000_000)
>>> ev.item_id, ev.event_type, ev.user_id, ev.features
('i9', 'click', None, {'price': 9.5})
>>> v.decode(encode_event(ev), now_ms=1_700_000_000_000) == ev
True
>>> r = v.decode(b'{"event_id":"e1","session_id":"s1","item_id":"i9","ts":1700000000}')
>>> r.reason
<RejectReason.TS_TOO_OLD: 'ts_too_old'>
>>> print(r.detail)
field 'ts' = 1700000000 is before 100000000000 (1973-03-03); is it in seconds? ts must be milliseconds since epoch
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

__all__ = [
    "EVENT_TYPES",
    "ClickEvent",
    "EventValidator",
    "RejectReason",
    "Rejection",
    "encode_event",
    "event_to_dict",
]

logger = logging.getLogger(__name__)

EVENT_TYPES: tuple[str, ...] = ("click", "view", "add_to_cart", "purchase")
_EVENT_TYPE_SET = frozenset(EVENT_TYPES)

# Keys with a meaning of their own; every other top-level key is a side feature.
CORE_FIELDS: frozenset[str] = frozenset(
    ("event_id", "session_id", "item_id", "ts", "event_type", "user_id")
)

# Side-feature integers must fit Arrow/torch int64 columns downstream.
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# A ms timestamp this large is the year 5138: the producer sent micro- or nanoseconds.
_SURELY_NOT_MS = 10**14

# JSON names for Python types, so details speak the producer's language.
_JSON_TYPE_NAMES: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    list: "array",
    dict: "object",
    type(None): "null",
}


class ClickEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One valid interaction. Build it only through :class:`EventValidator`
    (or in tests); the validator is what guarantees the limits below.

    ``features`` holds the side/context features (every top-level key that is
    not a core field), with null values already dropped.
    """

    # gc=False: events hold only scalars and a flat dict, never cycles, and
    # skipping GC tracking matters at hundreds of thousands of events/s.
    event_id: str
    session_id: str
    item_id: str
    ts: int  # ms since epoch
    event_type: str = "click"
    user_id: str | None = None
    features: dict[str, str | int | float] = {}


class RejectReason(enum.StrEnum):
    """Why a message was rejected; the value is the DLQ ``streamrec.reason`` header."""

    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_STRING = "empty_string"
    TOO_LONG = "too_long"
    TS_TOO_OLD = "ts_too_old"
    TS_IN_FUTURE = "ts_in_future"
    INVALID_EVENT_TYPE = "invalid_event_type"
    INVALID_FEATURE = "invalid_feature"
    TOO_MANY_FEATURES = "too_many_features"
    KEY_MISMATCH = "key_mismatch"


class Rejection(msgspec.Struct, frozen=True):
    """A rejected message: the reason and a detail naming the field and the fix."""

    reason: RejectReason
    detail: str


def event_to_dict(ev: ClickEvent) -> dict[str, Any]:
    """The wire form of ``ev`` as a flat dict: side features are top-level keys.

    ``user_id`` is left out when None (absent and null mean the same).
    Raises ValueError if a feature name shadows a core field, since such an
    event could not survive the round trip.
    """
    clash = CORE_FIELDS.intersection(ev.features)
    if clash:
        raise ValueError(f"feature names {sorted(clash)} clash with core event fields")
    out: dict[str, Any] = {
        "event_id": ev.event_id,
        "session_id": ev.session_id,
        "item_id": ev.item_id,
        "ts": ev.ts,
        "event_type": ev.event_type,
    }
    if ev.user_id is not None:
        out["user_id"] = ev.user_id
    out.update(ev.features)
    return out


_ENCODER = msgspec.json.Encoder()


def encode_event(ev: ClickEvent) -> bytes:
    """Encode ``ev`` to message bytes; ``EventValidator().decode`` inverts it."""
    return _ENCODER.encode(event_to_dict(ev))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _type_name(v: object) -> str:
    return _JSON_TYPE_NAMES.get(type(v), type(v).__name__)


def _short(v: object, limit: int = 40) -> str:
    # Details go into Kafka headers and logs; never echo a 64 KiB value.
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _ms_to_date(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d")
    except (OverflowError, ValueError, OSError):  # a configured limit past year 9999
        return "out of calendar range"


def _required_id(obj: dict[str, Any], name: str, limit: int) -> str | Rejection:
    v = obj.get(name)
    if type(v) is str:
        n = len(v)
        if 0 < n <= limit:
            return v
        if n == 0:
            return Rejection(
                RejectReason.EMPTY_STRING, f"field '{name}' is empty; send a non-empty string"
            )
        return Rejection(
            RejectReason.TOO_LONG, f"field '{name}' has {n} chars; the limit is {limit}"
        )
    if v is None:
        # Null means absent, and absent is not allowed for a required field.
        what = "is null" if name in obj else "is missing"
        return Rejection(RejectReason.MISSING_FIELD, f"required field '{name}' {what}")
    return Rejection(
        RejectReason.WRONG_TYPE, f"field '{name}' must be a string, got {_type_name(v)}"
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EventValidator:
    """Limits of the click-event contract, and the decoder that enforces them.

    Checks run in a fixed order (size, JSON, object, event_id, session_id,
    item_id, ts, event_type, user_id, side features, key) and the first
    failure is reported, so a given message always gets the same reason.
    """

    max_bytes: int = 64 * 1024  # message value, checked before parsing
    max_event_id_len: int = 64  # characters
    max_id_len: int = 128  # session_id, item_id, user_id; characters
    min_ts_ms: int = 100_000_000_000  # 1973-03-03: anything earlier is surely seconds
    max_future_ms: int = 60 * 60 * 1000  # allowed producer clock skew ahead of ours
    max_features: int = 64  # side features (non-null extra keys) per event
    max_feature_name_len: int = 64  # characters
    max_feature_str_len: int = 256  # characters, for string side-feature values

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v < 0:
                raise ValueError(f"EventValidator.{f.name} must be an int >= 0, got {v!r}")
        if self.max_bytes == 0 or self.max_event_id_len == 0 or self.max_id_len == 0:
            raise ValueError("EventValidator max_bytes and id length limits must be > 0")

    def decode(
        self, raw: bytes, key: bytes | None = None, now_ms: int | None = None
    ) -> ClickEvent | Rejection:
        """Decode one message value. ``key``, when given, must be the UTF-8
        ``session_id``. ``now_ms`` defaults to the wall clock. Never raises."""
        try:
            size = len(raw)
        except TypeError:
            return Rejection(
                RejectReason.INVALID_JSON, f"message value must be bytes, got {type(raw).__name__}"
            )
        if size > self.max_bytes:
            return Rejection(
                RejectReason.TOO_LARGE,
                f"message is {size} bytes; the limit is {self.max_bytes}; "
                "send fewer or shorter side features",
            )
        try:
            # Untyped decode to a dict keeps the extra keys (side features);
            # msgspec already rejects NaN/Infinity literals, lone surrogates and
            # numbers outside the float range.
            obj = msgspec.json.decode(raw)
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
            return Rejection(
                RejectReason.INVALID_JSON,
                f"message is not valid UTF-8 JSON ({_short(str(exc), 80)}); "
                "send one JSON object per message",
            )
        return self.validate(obj, key=key, now_ms=now_ms)

    def validate(
        self, obj: object, key: bytes | None = None, now_ms: int | None = None
    ) -> ClickEvent | Rejection:
        """Validate an already-parsed JSON value (e.g. from an HTTP body)."""
        if type(obj) is not dict:
            return Rejection(
                RejectReason.NOT_AN_OBJECT,
                f"message must be a JSON object, got {_type_name(obj)}",
            )
        event_id = _required_id(obj, "event_id", self.max_event_id_len)
        if type(event_id) is Rejection:
            return event_id
        session_id = _required_id(obj, "session_id", self.max_id_len)
        if type(session_id) is Rejection:
            return session_id
        item_id = _required_id(obj, "item_id", self.max_id_len)
        if type(item_id) is Rejection:
            return item_id

        ts = obj.get("ts")
        # `type(...) is int` also rejects bool, which is an int subclass.
        if type(ts) is not int:
            if ts is None:
                what = "is null" if "ts" in obj else "is missing"
                return Rejection(RejectReason.MISSING_FIELD, f"required field 'ts' {what}")
            return Rejection(
                RejectReason.WRONG_TYPE,
                f"field 'ts' must be an integer (ms since epoch), got {_type_name(ts)}",
            )
        if ts < self.min_ts_ms:
            return Rejection(
                RejectReason.TS_TOO_OLD,
                f"field 'ts' = {ts} is before {self.min_ts_ms} ({_ms_to_date(self.min_ts_ms)}); "
                "is it in seconds? ts must be milliseconds since epoch",
            )
        now = _now_ms() if now_ms is None else now_ms
        if ts > now + self.max_future_ms:
            hint = "is it in micro- or nanoseconds? " if ts >= _SURELY_NOT_MS else ""
            return Rejection(
                RejectReason.TS_IN_FUTURE,
                f"field 'ts' = {_short(ts)} is {(ts - now) // 1000} s ahead of the consumer "
                f"clock (allowed skew {self.max_future_ms} ms); {hint}"
                "ts must be milliseconds since epoch from a synchronised clock",
            )

        event_type = obj.get("event_type")
        if event_type is None:
            event_type = "click"
        elif type(event_type) is not str:
            return Rejection(
                RejectReason.WRONG_TYPE,
                f"field 'event_type' must be a string, got {_type_name(event_type)}",
            )
        elif event_type not in _EVENT_TYPE_SET:
            return Rejection(
                RejectReason.INVALID_EVENT_TYPE,
                f"field 'event_type' = {_short(event_type)} is not one of {list(EVENT_TYPES)}",
            )

        user_id = obj.get("user_id")
        if user_id is not None:
            user_id = _required_id(obj, "user_id", self.max_id_len)
            if type(user_id) is Rejection:
                return user_id

        features = self._features(obj)
        if type(features) is Rejection:
            return features

        if key is not None:
            try:
                matches = key == session_id.encode()
            except UnicodeEncodeError:
                matches = False
            if not matches:
                return Rejection(
                    RejectReason.KEY_MISMATCH,
                    f"message key {_short(key)} is not the UTF-8 session_id "
                    f"{_short(session_id)}; key every message by its session_id "
                    "so a session stays on one partition, in order",
                )

        return ClickEvent(
            event_id=event_id,
            session_id=session_id,
            item_id=item_id,
            ts=ts,
            event_type=event_type,
            user_id=user_id,
            features=features,
        )

    def _features(self, obj: dict[Any, Any]) -> dict[str, str | int | float] | Rejection:
        features: dict[str, str | int | float] = {}
        for name, v in obj.items():
            if v is None or name in CORE_FIELDS:
                continue
            if type(name) is not str or not name:
                return Rejection(
                    RejectReason.INVALID_FEATURE,
                    f"side feature name {_short(name)} must be a non-empty string",
                )
            if len(name) > self.max_feature_name_len:
                return Rejection(
                    RejectReason.TOO_LONG,
                    f"side feature name {_short(name)} has {len(name)} chars; "
                    f"the limit is {self.max_feature_name_len}",
                )
            tv = type(v)
            if tv is str:
                if len(v) > self.max_feature_str_len:
                    return Rejection(
                        RejectReason.TOO_LONG,
                        f"side feature '{name}' has {len(v)} chars; "
                        f"the limit is {self.max_feature_str_len}",
                    )
            elif tv is int:
                if not _INT64_MIN <= v <= _INT64_MAX:
                    return Rejection(
                        RejectReason.INVALID_FEATURE,
                        f"side feature '{name}' = {_short(v)} does not fit in 64 bits",
                    )
            elif tv is float:
                if not math.isfinite(v):
                    return Rejection(
                        RejectReason.INVALID_FEATURE,
                        f"side feature '{name}' = {v} must be a finite number",
                    )
            else:
                return Rejection(
                    RejectReason.INVALID_FEATURE,
                    f"side feature '{name}' must be a string or a number, got {_type_name(v)}; "
                    "flatten it into separate top-level keys",
                )
            features[name] = v
            if len(features) > self.max_features:
                return Rejection(
                    RejectReason.TOO_MANY_FEATURES,
                    f"more than {self.max_features} side features; send only the features "
                    "named in the feature schema",
                )
        return features

    def decode_batch(
        self,
        raws: Sequence[bytes],
        keys: Sequence[bytes | None] | None = None,
        now_ms: int | None = None,
    ) -> tuple[list[ClickEvent], list[tuple[int, Rejection]]]:
        """Decode a poll's worth of messages.

        Returns the valid events in input order and ``(index, rejection)`` for
        the rest. The clock is read once, so one batch is judged against one
        ``now``. Raises ValueError only if ``keys`` and ``raws`` differ in length.
        """
        if keys is not None and len(keys) != len(raws):
            raise ValueError(f"decode_batch got {len(raws)} values but {len(keys)} keys")
        now = _now_ms() if now_ms is None else now_ms
        events: list[ClickEvent] = []
        rejected: list[tuple[int, Rejection]] = []
        decode = self.decode
        for i, raw in enumerate(raws):
            out = decode(raw, None if keys is None else keys[i], now)
            if type(out) is ClickEvent:
                events.append(out)
            else:
                rejected.append((i, out))
        if rejected:
            logger.debug("rejected %d of %d events", len(rejected), len(raws))
        return events, rejected
