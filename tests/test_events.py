"""The click-event contract (docs/events.md): every rejection reason, the
optional-null rule, the wire round trip, and property tests that no input
bytes can make the decoder raise."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import events as events_mod
from ingest.events import (
    CORE_FIELDS,
    EVENT_TYPES,
    ClickEvent,
    EventValidator,
    Rejection,
    RejectReason,
    encode_event,
    event_to_dict,
)

NOW = 1_700_000_000_000  # 2023-11-14, a fixed consumer clock
V = EventValidator()
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def base(**over: Any) -> dict[str, Any]:
    """A valid event dict; keyword overrides replace or add keys."""
    d: dict[str, Any] = {"event_id": "e1", "session_id": "s1", "item_id": "i1", "ts": NOW}
    d.update(over)
    return d


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def without(key: str) -> bytes:
    d = base()
    del d[key]
    return enc(d)


# One payload per reason (several for the subtle ones); the `id` names the case.
REJECT_CASES: list[tuple[str, bytes, bytes | None, RejectReason]] = [
    ("too_large", enc(base(pad="x" * 70_000)), None, RejectReason.TOO_LARGE),
    ("not_utf8", b'{"event_id": "\xff"}', None, RejectReason.INVALID_JSON),
    ("truncated", enc(base())[:-1], None, RejectReason.INVALID_JSON),
    (
        "nan_literal",
        b'{"event_id":"e","session_id":"s","item_id":"i","ts":1,"p":NaN}',
        None,
        RejectReason.INVALID_JSON,
    ),
    (
        "number_out_of_range",
        enc(base())[:-1] + b', "price": 1e400}',
        None,
        RejectReason.INVALID_JSON,
    ),
    ("lone_surrogate", b'{"event_id": "\\ud800"}', None, RejectReason.INVALID_JSON),
    ("trailing_garbage", enc(base()) + b"x", None, RejectReason.INVALID_JSON),
    ("empty", b"", None, RejectReason.INVALID_JSON),
    ("array", enc([base()]), None, RejectReason.NOT_AN_OBJECT),
    ("string", b'"hello"', None, RejectReason.NOT_AN_OBJECT),
    ("null", b"null", None, RejectReason.NOT_AN_OBJECT),
    ("missing_event_id", without("event_id"), None, RejectReason.MISSING_FIELD),
    ("missing_ts", without("ts"), None, RejectReason.MISSING_FIELD),
    ("null_item_id", enc(base(item_id=None)), None, RejectReason.MISSING_FIELD),
    ("ts_float", enc(base(ts=float(NOW))), None, RejectReason.WRONG_TYPE),
    ("ts_bool", enc(base(ts=True)), None, RejectReason.WRONG_TYPE),
    ("ts_string", enc(base(ts=str(NOW))), None, RejectReason.WRONG_TYPE),
    ("item_id_int", enc(base(item_id=42)), None, RejectReason.WRONG_TYPE),
    ("session_id_bool", enc(base(session_id=False)), None, RejectReason.WRONG_TYPE),
    ("user_id_int", enc(base(user_id=7)), None, RejectReason.WRONG_TYPE),
    ("event_type_list", enc(base(event_type=["click"])), None, RejectReason.WRONG_TYPE),
    ("empty_event_id", enc(base(event_id="")), None, RejectReason.EMPTY_STRING),
    ("empty_user_id", enc(base(user_id="")), None, RejectReason.EMPTY_STRING),
    ("long_event_id", enc(base(event_id="e" * 65)), None, RejectReason.TOO_LONG),
    ("long_session_id", enc(base(session_id="s" * 129)), None, RejectReason.TOO_LONG),
    ("long_user_id", enc(base(user_id="u" * 129)), None, RejectReason.TOO_LONG),
    ("long_feature_value", enc(base(category="c" * 257)), None, RejectReason.TOO_LONG),
    ("long_feature_name", enc(base(**{"f" * 65: 1})), None, RejectReason.TOO_LONG),
    ("ts_in_seconds", enc(base(ts=NOW // 1000)), None, RejectReason.TS_TOO_OLD),
    ("ts_negative", enc(base(ts=-1)), None, RejectReason.TS_TOO_OLD),
    ("ts_2h_ahead", enc(base(ts=NOW + 2 * 3_600_000)), None, RejectReason.TS_IN_FUTURE),
    ("ts_in_microseconds", enc(base(ts=NOW * 1000)), None, RejectReason.TS_IN_FUTURE),
    ("ts_huge_int", enc(base(ts=10**30)), None, RejectReason.TS_IN_FUTURE),
    ("event_type_unknown", enc(base(event_type="like")), None, RejectReason.INVALID_EVENT_TYPE),
    ("event_type_empty", enc(base(event_type="")), None, RejectReason.INVALID_EVENT_TYPE),
    ("event_type_case", enc(base(event_type="Click")), None, RejectReason.INVALID_EVENT_TYPE),
    ("feature_list", enc(base(tags=["a", "b"])), None, RejectReason.INVALID_FEATURE),
    ("feature_object", enc(base(ctx={"a": 1})), None, RejectReason.INVALID_FEATURE),
    ("feature_bool", enc(base(is_promo=True)), None, RejectReason.INVALID_FEATURE),
    ("feature_int_over_64_bits", enc(base(big=2**64)), None, RejectReason.INVALID_FEATURE),
    ("feature_empty_name", enc(base(**{"": 1})), None, RejectReason.INVALID_FEATURE),
    (
        "too_many_features",
        enc(base(**{f"f{i}": i for i in range(65)})),
        None,
        RejectReason.TOO_MANY_FEATURES,
    ),
    ("key_other_session", enc(base()), b"s2", RejectReason.KEY_MISMATCH),
    ("key_empty", enc(base()), b"", RejectReason.KEY_MISMATCH),
]


@pytest.mark.parametrize(
    ("raw", "key", "reason"), [c[1:] for c in REJECT_CASES], ids=[c[0] for c in REJECT_CASES]
)
def test_each_bad_payload_is_rejected_with_its_exact_reason(
    raw: bytes, key: bytes | None, reason: RejectReason
) -> None:
    out = V.decode(raw, key=key, now_ms=NOW)
    assert isinstance(out, Rejection), out
    assert out.reason is reason, out.detail
    assert out.detail  # a human has to be able to act on it


def test_reject_cases_cover_every_reason() -> None:
    assert {c[3] for c in REJECT_CASES} == set(RejectReason)


def test_reason_values_are_the_snake_case_names() -> None:
    # The value travels as the DLQ `streamrec.reason` header; it must be stable.
    for r in RejectReason:
        assert r.value == r.name.lower()
        assert r == r.value


def test_details_name_the_field_and_the_fix() -> None:
    r = V.decode(enc(base(ts=1.7e12)), now_ms=NOW)
    assert r == Rejection(
        RejectReason.WRONG_TYPE, "field 'ts' must be an integer (ms since epoch), got float"
    )
    r = V.decode(enc(base(ts=1_700_000_000)), now_ms=NOW)
    assert isinstance(r, Rejection)
    assert "is it in seconds? ts must be milliseconds since epoch" in r.detail
    r = V.decode(enc(base(ts=NOW * 1000)), now_ms=NOW)
    assert isinstance(r, Rejection)
    assert "micro- or nanoseconds" in r.detail
    r = V.decode(without("item_id"), now_ms=NOW)
    assert r == Rejection(RejectReason.MISSING_FIELD, "required field 'item_id' is missing")
    r = V.decode(enc(base(tags=[1])), now_ms=NOW)
    assert isinstance(r, Rejection)
    assert "'tags'" in r.detail and "array" in r.detail


def test_detail_never_echoes_a_huge_value() -> None:
    r = V.decode(enc(base(event_type="x" * 10_000)), now_ms=NOW)
    assert isinstance(r, Rejection)
    assert r.reason is RejectReason.INVALID_EVENT_TYPE
    assert len(r.detail) < 300


# --- valid events ------------------------------------------------------------------


def test_minimal_event_gets_the_defaults() -> None:
    ev = V.decode(enc(base()), now_ms=NOW)
    assert ev == ClickEvent(event_id="e1", session_id="s1", item_id="i1", ts=NOW)
    assert ev.event_type == "click"
    assert ev.user_id is None
    assert ev.features == {}


def test_full_event_keeps_side_features_as_sent() -> None:
    raw = enc(base(event_type="purchase", user_id="u9", category="shoes", price=59.9, qty=2))
    ev = V.decode(raw, key=b"s1", now_ms=NOW)
    assert isinstance(ev, ClickEvent)
    assert (ev.event_type, ev.user_id) == ("purchase", "u9")
    assert ev.features == {"category": "shoes", "price": 59.9, "qty": 2}
    assert type(ev.features["qty"]) is int and type(ev.features["price"]) is float


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_is_accepted(event_type: str) -> None:
    ev = V.decode(enc(base(event_type=event_type)), now_ms=NOW)
    assert isinstance(ev, ClickEvent) and ev.event_type == event_type


def test_null_optional_fields_mean_absent() -> None:
    ev = V.decode(enc(base(event_type=None, user_id=None, category=None, price=1)), now_ms=NOW)
    assert isinstance(ev, ClickEvent)
    assert ev.event_type == "click"
    assert ev.user_id is None
    assert ev.features == {"price": 1}  # the null feature is dropped, not stored as None


def test_null_required_field_is_missing() -> None:
    r = V.decode(enc(base(ts=None)), now_ms=NOW)
    assert r == Rejection(RejectReason.MISSING_FIELD, "required field 'ts' is null")


def test_null_features_do_not_count_toward_the_limit() -> None:
    v = EventValidator(max_features=2)
    ok = v.decode(enc(base(a=1, b=2, c=None, d=None)), now_ms=NOW)
    assert isinstance(ok, ClickEvent) and ok.features == {"a": 1, "b": 2}
    bad = v.decode(enc(base(a=1, b=2, c=3)), now_ms=NOW)
    assert isinstance(bad, Rejection) and bad.reason is RejectReason.TOO_MANY_FEATURES


def test_limits_are_inclusive_at_the_boundary() -> None:
    at = base(
        event_id="e" * 64,
        session_id="s" * 128,
        item_id="i" * 128,
        user_id="u" * 128,
        **{"n" * 64: "v" * 256},
        **{f"f{i}": i for i in range(63)},
    )
    ev = V.decode(enc(at), now_ms=NOW)
    assert isinstance(ev, ClickEvent), ev
    assert len(ev.features) == 64


def test_ts_bounds() -> None:
    v = EventValidator(min_ts_ms=1_000, max_future_ms=5_000)
    for ts, ok in [(999, False), (1_000, True), (NOW + 5_000, True), (NOW + 5_001, False)]:
        out = v.decode(enc(base(ts=ts)), now_ms=NOW)
        assert isinstance(out, ClickEvent) is ok, (ts, out)


def test_future_ts_uses_the_wall_clock_when_now_is_not_given() -> None:
    far = V.decode(enc(base(ts=NOW * 10)))
    assert isinstance(far, Rejection) and far.reason is RejectReason.TS_IN_FUTURE
    assert isinstance(V.decode(enc(base(ts=NOW))), ClickEvent)


def test_size_limit_is_on_raw_bytes() -> None:
    raw = enc(base())
    assert isinstance(EventValidator(max_bytes=len(raw)).decode(raw, now_ms=NOW), ClickEvent)
    r = EventValidator(max_bytes=len(raw) - 1).decode(raw, now_ms=NOW)
    assert isinstance(r, Rejection) and r.reason is RejectReason.TOO_LARGE


def test_non_bytes_value_is_rejected_not_raised() -> None:
    r = V.decode(12345, now_ms=NOW)  # type: ignore[arg-type]
    assert isinstance(r, Rejection) and r.reason is RejectReason.INVALID_JSON


# --- message key -------------------------------------------------------------------


def test_key_must_be_the_utf8_session_id() -> None:
    raw = enc(base(session_id="sesión-1"))
    assert isinstance(V.decode(raw, key="sesión-1".encode(), now_ms=NOW), ClickEvent)
    assert isinstance(V.decode(raw, key=None, now_ms=NOW), ClickEvent)
    r = V.decode(raw, key="sesión-1".encode("latin-1"), now_ms=NOW)
    assert isinstance(r, Rejection) and r.reason is RejectReason.KEY_MISMATCH


def test_key_is_checked_after_the_payload() -> None:
    # A message that is both malformed and mis-keyed reports the payload problem.
    r = V.decode(without("item_id"), key=b"other", now_ms=NOW)
    assert isinstance(r, Rejection) and r.reason is RejectReason.MISSING_FIELD


# --- encoding ----------------------------------------------------------------------


def test_encode_puts_features_at_top_level() -> None:
    ev = ClickEvent(
        event_id="e", session_id="s", item_id="i", ts=NOW, features={"price": 9.5, "cat": "a"}
    )
    wire = json.loads(encode_event(ev))
    assert wire == {
        "event_id": "e",
        "session_id": "s",
        "item_id": "i",
        "ts": NOW,
        "event_type": "click",
        "price": 9.5,
        "cat": "a",
    }
    assert event_to_dict(ev) == wire
    assert V.decode(encode_event(ev), key=b"s", now_ms=NOW) == ev


def test_encode_refuses_a_feature_that_shadows_a_core_field() -> None:
    ev = ClickEvent(event_id="e", session_id="s", item_id="i", ts=NOW, features={"ts": 1})
    with pytest.raises(ValueError, match="clash"):
        encode_event(ev)


def test_event_and_validator_are_immutable() -> None:
    ev = ClickEvent(event_id="e", session_id="s", item_id="i", ts=NOW)
    with pytest.raises(AttributeError):
        ev.ts = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        V.max_bytes = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad", [{"max_bytes": 0}, {"max_features": -1}, {"max_future_ms": 1.5}, {"min_ts_ms": None}]
)
def test_validator_refuses_nonsense_limits(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="EventValidator"):
        EventValidator(**bad)


# --- batch -------------------------------------------------------------------------


def test_batch_splits_valid_and_rejected_keeping_order_and_indices() -> None:
    raws = [
        enc(base(event_id="a")),
        b"not json",
        enc(base(event_id="b", session_id="s2")),
        enc(base(event_id="c", ts=5)),
        enc(base(event_id="d")),
    ]
    keys = [b"s1", b"s1", b"s1", None, None]
    good, bad = V.decode_batch(raws, keys, now_ms=NOW)
    assert [e.event_id for e in good] == ["a", "d"]
    assert [(i, r.reason) for i, r in bad] == [
        (1, RejectReason.INVALID_JSON),
        (2, RejectReason.KEY_MISMATCH),
        (3, RejectReason.TS_TOO_OLD),
    ]


def test_batch_without_keys_and_empty_batch() -> None:
    good, bad = V.decode_batch([enc(base()), b"[]"], now_ms=NOW)
    assert len(good) == 1 and bad[0][0] == 1
    assert V.decode_batch([], now_ms=NOW) == ([], [])


def test_batch_reads_the_clock_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def clock() -> int:
        calls.append(1)
        # A clock that jumps far ahead after the first read would accept later events.
        return NOW if len(calls) == 1 else NOW * 10

    monkeypatch.setattr(events_mod, "_now_ms", clock)
    late = enc(base(ts=NOW + 7_200_000))
    good, bad = V.decode_batch([enc(base()), late, late])
    assert len(calls) == 1
    assert len(good) == 1 and [i for i, _ in bad] == [1, 2]


def test_batch_refuses_mismatched_keys() -> None:
    with pytest.raises(ValueError, match="2 values but 1 keys"):
        V.decode_batch([b"{}", b"{}"], [b"k"])


# --- properties --------------------------------------------------------------------

_ids = st.text(min_size=1, max_size=64)
_long_ids = st.text(min_size=1, max_size=128)
_feature_names = st.text(min_size=1, max_size=64).filter(lambda s: s not in CORE_FIELDS)
_feature_values = st.one_of(
    st.text(max_size=256),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)
valid_events = st.builds(
    ClickEvent,
    event_id=_ids,
    session_id=_long_ids,
    item_id=_long_ids,
    ts=st.integers(min_value=V.min_ts_ms, max_value=NOW + V.max_future_ms),
    event_type=st.sampled_from(EVENT_TYPES),
    user_id=st.none() | _long_ids,
    features=st.dictionaries(_feature_names, _feature_values, max_size=8),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@PROPS
@given(raw=st.binary(max_size=512), key=st.none() | st.binary(max_size=16))
def test_any_bytes_decode_without_raising(raw: bytes, key: bytes | None) -> None:
    out = V.decode(raw, key=key, now_ms=NOW)
    assert type(out) in (ClickEvent, Rejection)


@PROPS
@given(ev=valid_events, data=st.data())
def test_corrupted_valid_messages_decode_without_raising(
    ev: ClickEvent, data: st.DataObject
) -> None:
    raw = bytearray(encode_event(ev))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del raw[i]
        else:
            raw.insert(i, data.draw(st.integers(0, 255)))
        if not raw:
            break
    out = V.decode(bytes(raw), key=ev.session_id.encode(), now_ms=NOW)
    assert type(out) in (ClickEvent, Rejection)


@PROPS
@given(value=json_values)
def test_any_json_value_decodes_without_raising(value: Any) -> None:
    out = V.decode(msgspec.json.encode(value), now_ms=NOW)
    if not isinstance(value, dict):
        assert isinstance(out, Rejection) and out.reason is RejectReason.NOT_AN_OBJECT
    else:
        assert type(out) in (ClickEvent, Rejection)
        if "event_id" not in value or value["event_id"] is None:
            assert isinstance(out, Rejection) and out.reason is RejectReason.MISSING_FIELD


_REQUIRED = {"event_id": 64, "session_id": 128, "item_id": 128, "ts": None}
_not_str = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_not_int = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(),
    st.lists(st.integers(), max_size=2),
)


@PROPS
@given(ev=valid_events, data=st.data())
def test_one_broken_field_always_gives_its_reason(ev: ClickEvent, data: st.DataObject) -> None:
    d = event_to_dict(ev)
    field = data.draw(st.sampled_from([*_REQUIRED, "user_id"]))
    kinds = ["wrong_type"] if field == "ts" else ["wrong_type", "too_long"]
    if field != "user_id":
        kinds.append("delete")
    kind = data.draw(st.sampled_from(kinds))
    if kind == "delete":
        del d[field]
        expected = RejectReason.MISSING_FIELD
    elif kind == "wrong_type":
        d[field] = data.draw(_not_int if field == "ts" else _not_str)
        expected = RejectReason.WRONG_TYPE
    else:
        limit = _REQUIRED.get(field) or V.max_id_len
        d[field] = data.draw(st.text(min_size=limit + 1, max_size=limit + 40))
        expected = RejectReason.TOO_LONG
    out = V.decode(msgspec.json.encode(d), now_ms=NOW)
    assert isinstance(out, Rejection), (field, kind, d)
    assert out.reason is expected, (field, kind, out.detail)
    assert f"'{field}'" in out.detail


@PROPS
@given(ev=valid_events)
def test_valid_events_round_trip(ev: ClickEvent) -> None:
    raw = encode_event(ev)
    assert V.decode(raw, key=ev.session_id.encode(), now_ms=NOW) == ev
    assert V.validate(event_to_dict(ev), now_ms=NOW) == ev
