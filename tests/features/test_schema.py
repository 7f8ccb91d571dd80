"""The feature schema: model, JSON round trip and errors, Merlin/T4Rec import, pbtxt parser."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.merlin import PbtxtError, merlin_features, parse_pbtxt
from features.schema import (
    FLOAT32,
    FORMAT,
    INT64,
    Feature,
    Kind,
    Schema,
    SchemaError,
    Tag,
    default_schema,
)

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[2]


def _doc(features: list[dict[str, Any]], **extra: Any) -> str:
    return json.dumps({"format": FORMAT, "features": features, **extra})


def _item(**overrides: Any) -> dict[str, Any]:
    d = {"name": "item_id", "kind": "categorical", "tags": ["item_id"],
         "transform": {"op": "categorify"}}
    return {**d, **overrides}


# -- model and JSON ----------------------------------------------------------

def test_default_schema_round_trips_through_json_and_a_file(tmp_path: Path) -> None:
    s = default_schema()
    assert Schema.from_json(s.to_json()) == s
    s.save(tmp_path / "schema.json")
    assert Schema.load(tmp_path / "schema.json") == s
    assert [p.name for p in tmp_path.iterdir()] == ["schema.json"]  # no temp file left


def test_json_form_has_the_format_and_every_key() -> None:
    d = json.loads(default_schema().to_json())
    assert d["format"] == "streamrec.schema/1"
    price = d["features"][2]
    assert price == {
        "name": "price", "kind": "continuous", "dtype": "float32", "tags": ["item_feature"],
        "source": None, "transform": {"op": "normalize", "log": True}, "cardinality": None,
        "properties": {},
    }


def test_optional_keys_may_be_left_out() -> None:
    s = Schema.from_json(_doc([_item()]))
    f = s["item_id"]
    assert (f.dtype, f.source, f.cardinality, f.properties) == (INT64, None, None, {})


def test_default_schema_describes_the_event_contract() -> None:
    s = default_schema()
    assert s.item_id_feature.name == "item_id"
    assert {f.name for f in s if f.source_column == "ts"} == {
        "hour", "weekday", "time_since_prev", "session_age"}
    assert s.select_by_kind(Kind.CATEGORICAL).names == (
        "item_id", "category", "event_type", "hour", "weekday")
    assert all(f.cardinality is None for f in s)  # nothing fitted yet


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_doc([_item()], version=2), r"unknown top-level keys \['version'\]; allowed"),
        (_doc([_item(colour="red")]), r"unknown keys \['colour'\]; allowed: \[.*'cardinality'"),
        (_doc([_item(tags=["item_id", "price"])]),
         r"unknown tag 'price'; allowed: \['item_id', 'session_id'"),
        (_doc([_item(kind="ordinal")]),
         r"unknown kind 'ordinal'; allowed: \['categorical', 'continuous', 'list'\]"),
        (_doc([_item(dtype="int32")]), r"unknown dtype 'int32'; allowed: \['int64', 'float32'\]"),
        (_doc([_item(), _item()]), r"duplicate feature name 'item_id' \(entries 0 and 1\)"),
        (_doc([_item(transform={"min_freq": 2})]), r"transform must be a dict with a non-empty"),
        (_doc([_item(transform="categorify")]), r"transform must be a dict"),
        (_doc([{"name": "x", "kind": "continuous"}]), r"missing key 'transform'"),
        (_doc([_item(tags="item_id")]), r"tags must be a list"),
        (_doc([_item(kind="continuous")]), r"tags \['item_id'\] need kind 'categorical'"),
        (_doc([_item(dtype="float32")]), r"kind 'categorical' has dtype 'int64', got 'float32'"),
        (_doc([{"name": "g", "kind": "list", "transform": {"op": "categorify"}}]),
         r"kind 'list' needs a dtype"),
        (_doc([{"name": "p", "kind": "continuous", "cardinality": 3,
                "transform": {"op": "normalize"}}]), r"cardinality is only for int64"),
        (_doc([_item(cardinality=0)]), r"cardinality must be a positive int"),
        (_doc([_item(cardinality=True)]), r"cardinality must be a positive int"),
        (_doc([_item(source="")]), r"source must be a non-empty string"),
        ('{"format": "streamrec.schema/2", "features": []}', r"unsupported schema format"),
        ('{"features": []}', r"unsupported schema format None; this version reads"),
        ('{"format": "streamrec.schema/1", "features": {}}', r"'features' must be a list"),
        ('{"format": "streamrec.schema/1", "format": "x", "features": []}', r"duplicate JSON key"),
        (_doc([]).replace("[]", '[{"name": "p", "kind": "continuous", '
                                '"transform": {"op": "clip", "max": NaN}}]'), r"NaN is not valid"),
        ('{"format": ', r"not valid JSON"),
        ("[]", r"a schema must be a JSON object"),
    ],
)
def test_invalid_schema_json_is_an_error_that_says_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        Schema.from_json(text)


def test_load_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(_doc([_item(kind="ordinal")]))
    with pytest.raises(SchemaError, match=r"bad.json: feature 0 \('item_id'\): unknown kind"):
        Schema.load(path)


def test_item_id_feature_needs_exactly_one_item_id_tag() -> None:
    s = default_schema()
    with pytest.raises(SchemaError, match=r"exactly one feature tagged 'item_id', found 0"):
        _ = s.without("item_id").item_id_feature
    second = Feature("parent_item", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                     transform={"op": "categorify"})
    with pytest.raises(SchemaError, match=r"found 2 \(item_id, parent_item\)"):
        _ = s.with_feature(second).item_id_feature


def test_select_by_tag_keeps_order_and_accepts_strings() -> None:
    s = default_schema()
    assert s.select_by_tag(Tag.ITEM_FEATURE).names == ("category", "price")
    assert s.select_by_tag("context").names == ("event_type", "hour", "weekday")
    assert len(s.select_by_tag(Tag.TARGET)) == 0
    assert s.select_by_kind("list") == Schema()
    with pytest.raises(SchemaError, match=r"unknown tag 'item'; allowed"):
        s.select_by_tag("item")


def test_with_feature_replaces_in_place_or_appends_without_changing_the_original() -> None:
    s = default_schema()
    fitted = dataclasses.replace(s["category"], cardinality=340)
    s2 = s.with_feature(fitted)
    assert s2.names == s.names and s2["category"].cardinality == 340
    assert s["category"].cardinality is None
    genres = Feature("genres", Kind.LIST, dtype=INT64, tags={Tag.ITEM_FEATURE},
                     transform={"op": "categorify"})
    assert s.with_feature(genres).names == (*s.names, "genres")
    assert "price" not in s.without("price") and "price" in s
    with pytest.raises(KeyError, match=r"no feature 'colour'; the schema has \['item_id'"):
        s.without("colour")


def test_feature_copies_its_dicts_and_normalises_source_and_enums() -> None:
    transform = {"op": "bucketize", "boundaries": [1, 10]}
    f = Feature("price_bucket", "categorical", tags=["item_feature"], source="price",
                transform=transform)
    transform["boundaries"].append(100)
    assert f.transform == {"op": "bucketize", "boundaries": [1, 10]}
    assert f.kind is Kind.CATEGORICAL and f.tags == frozenset({Tag.ITEM_FEATURE})
    assert Feature("price", Kind.CONTINUOUS, source="price",
                   transform={"op": "normalize"}).source is None
    assert hash(f) == hash(dataclasses.replace(f))
    with pytest.raises(SchemaError, match=r"transform must be JSON-able"):
        Feature("x", Kind.CONTINUOUS, transform={"op": "clip", "max": float("inf")})
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.name = "y"  # type: ignore[misc]


def test_schema_rejects_non_features_and_duplicates_on_construction() -> None:
    f = default_schema()["price"]
    with pytest.raises(SchemaError, match=r"duplicate feature name 'price'"):
        Schema([f, f])
    with pytest.raises(SchemaError, match=r"entry 0 is a dict, not a Feature"):
        Schema([f.to_dict()])  # type: ignore[list-item]


def test_the_json_example_in_the_docs_is_a_valid_schema() -> None:
    text = (ROOT / "docs" / "features-schema.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    examples = [b for b in blocks if '"format": "streamrec.schema/1"' in b]
    assert examples, "docs/features-schema.md lost its JSON example"
    for block in examples:
        assert Schema.from_json(block).item_id_feature.name == "item_id"


# -- hypothesis: any valid schema survives JSON ------------------------------

_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=6,
)


@st.composite
def _features(draw: st.DrawFn, name: str) -> Feature:
    kind = draw(st.sampled_from(Kind))
    dtype = {Kind.CATEGORICAL: INT64, Kind.CONTINUOUS: FLOAT32}.get(kind) or draw(
        st.sampled_from([INT64, FLOAT32]))
    tags = draw(st.frozensets(st.sampled_from(Tag)))
    if kind is not Kind.CATEGORICAL:
        tags -= {Tag.ITEM_ID, Tag.SESSION_ID, Tag.USER_ID}
    params = draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k != "op"),
                                  _json_values, max_size=3))
    return Feature(
        name, kind, tags=tags, dtype=dtype,
        source=draw(st.none() | st.text(min_size=1, max_size=8)),
        transform={"op": draw(st.text(min_size=1, max_size=10)), **params},
        cardinality=draw(st.none() | st.integers(1, 2**40)) if dtype == INT64 else None,
        properties=draw(st.dictionaries(st.text(max_size=6), _json_values, max_size=3)),
    )


@st.composite
def _schemas(draw: st.DrawFn) -> Schema:
    names = draw(st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=5))
    return Schema(draw(_features(n)) for n in names)


@settings(max_examples=60, deadline=None)
@given(_schemas())
def test_any_valid_schema_round_trips_through_json(s: Schema) -> None:
    back = Schema.from_json(s.to_json())
    assert back == s and back.names == s.names
    assert Schema.from_json(s.to_json(indent=None)) == s


# -- Merlin / T4Rec import -----------------------------------------------------

def test_both_merlin_formats_give_the_same_schema() -> None:
    from_pbtxt = Schema.from_merlin(DATA / "t4rec_session_schema.pbtxt")
    from_json = Schema.from_merlin(DATA / "t4rec_session_schema.json")
    assert from_pbtxt == from_json
    assert from_pbtxt.names == (
        "session_id", "item_id", "category", "timestamp/age_days", "timestamp/weekday/sin",
        "product_embedding", "item_id-count", "day_index")


def test_t4rec_session_lists_become_per_event_features_describing_raw_columns() -> None:
    s = Schema.from_merlin(DATA / "t4rec_session_schema.pbtxt")
    item = s.item_id_feature
    assert (item.name, item.kind, item.tags, item.transform) == (
        "item_id", Kind.CATEGORICAL, frozenset({Tag.ITEM_ID}), {"op": "categorify"})
    assert item.cardinality is None  # ours is set by fitting on raw ids
    assert item.properties["merlin_cardinality"] == 52742
    assert item.properties["merlin_name"] == "item_id-list_seq"
    assert item.properties["merlin_value_count"] == {"min": 2, "max": 20}
    assert s["category"].tags == {Tag.ITEM_FEATURE}
    age = s["timestamp/age_days"]
    assert (age.kind, age.dtype, age.tags, age.source, age.transform) == (
        Kind.CONTINUOUS, FLOAT32, {Tag.TIME}, "timestamp", {"op": "normalize"})
    assert s["timestamp/weekday/sin"].tags == {Tag.CONTEXT}
    session = s["session_id"]
    assert session.tags == {Tag.SESSION_ID} and session.transform == {"op": "identity"}
    assert "merlin_cardinality" not in session.properties  # Merlin did not call it categorical
    assert session.properties["merlin_session_level"] is True
    assert s["day_index"].kind is Kind.CONTINUOUS and s["day_index"].tags == frozenset()
    assert Schema.from_json(s.to_json()) == s


def test_unmapped_merlin_tags_are_kept_in_properties_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="features.merlin"):
        s = Schema.from_merlin(DATA / "t4rec_session_schema.json")
    emb = s["product_embedding"]
    assert emb.properties["merlin_unmapped_tags"] == ["embedding"]
    assert emb.properties["merlin_tags"] == ["continuous", "list", "embedding"]
    assert "product_embedding-list_seq" in caplog.text and "embedding" in caplog.text


def test_from_merlin_finds_the_schema_in_a_dataset_directory(tmp_path: Path) -> None:
    (tmp_path / ".merlin").mkdir()
    shutil.copy(DATA / "t4rec_session_schema.json", tmp_path / ".merlin" / "schema.json")
    assert Schema.from_merlin(tmp_path) == Schema.from_merlin(DATA / "t4rec_session_schema.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SchemaError, match=r"holds none of \['.merlin/schema.json'"):
        Schema.from_merlin(empty)


_EVENT_LEVEL = """
feature { name: "item_id" type: BYTES annotation { tag: "item_id" } }
feature {
  name: "genres" type: INT
  value_count { min: 0 max: 5 }
  int_domain { min: 0 max: 19 is_categorical: true }
}
feature { name: "price" type: FLOAT value_count { min: 1 max: 1 } }
feature { name: "clicked" type: INT annotation { tag: "target" tag: "binary_classification" } }
"""


def test_event_level_merlin_lists_become_list_features() -> None:
    s = Schema(merlin_features(parse_pbtxt(_EVENT_LEVEL), sequences=False))
    assert s["item_id"].kind is Kind.CATEGORICAL  # BYTES = raw strings
    genres = s["genres"]
    assert (genres.kind, genres.dtype, genres.transform) == (
        Kind.LIST, INT64, {"op": "categorify"})
    assert genres.properties["merlin_cardinality"] == 20
    assert s["price"].kind is Kind.CONTINUOUS  # value_count 1..1 is a scalar
    assert s["clicked"].tags == {Tag.TARGET}
    assert all("merlin_session_level" not in f.properties for f in s)


def test_list_detection_reads_merlin_extra_metadata_in_text_form() -> None:
    text = """feature { name: "item_id_list" type: INT
      int_domain { max: 9 is_categorical: true }
      annotation { tag: "item_id" extra_metadata {
        [type.googleapis.com/google.protobuf.Struct] {
          fields { key: "is_list" value { bool_value: true } } } } } }"""
    (f,) = merlin_features(parse_pbtxt(text))
    assert f.name == "item_id" and f.kind is Kind.CATEGORICAL
    assert "merlin_session_level" not in f.properties


@pytest.mark.parametrize(
    ("text", "sequences", "message"),
    [
        ('feature { name: "a-list" type: INT annotation { tag: "list" } }'
         ' feature { name: "a" type: INT }', True, r"'a-list' and 'a' both map to 'a'"),
        ('feature { name: "item_id-list" type: INT annotation { tag: "item_id" tag: "list" } }',
         False, r"1 per event, which streamrec does not support for an id column"),
        ('feature { name: "x" value_counts { value_count { max: 3 } value_count { max: 4 } } }',
         False, r"2 list level\(s\)"),
        ('feature { name: "x" annotation { tag: "categorical" tag: "continuous" } }', True,
         r"tagged both categorical and continuous"),
        ('feature { name: "x" value_count { min: "two" max: 3 } }', True,
         r"value_count.min must be an integer"),
        ("string_domain { name: 'x' }", True, r"no 'feature' entries"),
        ('features { name: "x" }', True, r"unknown top-level keys \['features'\]"),
        ('feature { type: INT }', True, r"has no name"),
        ("feature: 5", True, r"each 'feature' must be a message"),
        ('feature { name: "x" annotation: "item_id" }', True, r"'annotation' must be a message"),
    ],
)
def test_bad_merlin_schemas_are_errors(text: str, sequences: bool, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        merlin_features(parse_pbtxt(text), sequences=sequences)


def test_merlin_json_accepts_enum_numbers_and_int64_strings(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"feature": [{
        "name": "item_id", "type": 2, "intDomain": {"max": "41", "isCategorical": True},
        "annotation": {"tag": ["item_id"]}}]}))
    f = Schema.from_merlin(path).item_id_feature
    assert f.dtype == INT64 and f.properties["merlin_cardinality"] == 42


# -- the pbtxt parser ----------------------------------------------------------

def test_pbtxt_comments_repeated_keys_and_block_forms() -> None:
    text = """
    # a comment line
    feature {  # trailing comment
      name: "a#b"   # the '#' inside quotes is not a comment
      tag: "x" tag: 'y';
      tag: ["z", "w"],
      domain: < min: 0 max: 5 >
      nested: { deep { v: 1 } }
    }
    feature { }
    """
    assert parse_pbtxt(text) == {"feature": [
        {"name": ["a#b"], "tag": ["x", "y", "z", "w"], "domain": [{"min": [0], "max": [5]}],
         "nested": [{"deep": [{"v": [1]}]}]},
        {},
    ]}


def test_pbtxt_string_escapes_and_concatenation() -> None:
    text = r'''s: "a\"b\\c\n\t" s: 'it\'s' s: "\303\251\x41\u00e9\U0001F600" s: "con" 'cat' s: ""'''
    assert parse_pbtxt(text)["s"] == ['a"b\\c\n\t', "it's", "éAé\U0001f600", "concat", ""]


def test_pbtxt_numbers_bools_and_enums() -> None:
    text = ("i: 42 i: -7 i: 0x1F f: 1.5 f: -2e-3 f: .5 f: 3f f: 1E3 "
            "b: true b: False e: INT e: TYPE_UNKNOWN x: inf x: -inf x: nan l: []")
    m = parse_pbtxt(text)
    assert m["i"] == [42, -7, 31] and all(type(v) is int for v in m["i"])
    assert m["f"] == [1.5, -0.002, 0.5, 3.0, 1000.0]
    assert m["b"] == [True, False] and m["e"] == ["INT", "TYPE_UNKNOWN"]
    assert m["x"][:2] == [math.inf, -math.inf] and math.isnan(m["x"][2])
    assert m["l"] == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name: "abc', r"line 1, column 11: unterminated string"),
        ('name: "a\nb"', r"line 1, column 9: unterminated string"),
        ("feature {\n  name: 1\n", r"line 3, column 1: unexpected end of text, missing '}'"),
        ("feature { }\n}", r"line 2, column 1: expected a field name"),
        ('name: "\\q"', r"unknown escape \\q"),
        ('name: "\\377"', r"not valid UTF-8"),
        ("name 5", r"expected ':' or '\{' after field 'name'"),
        ("name: ", r"expected a value"),
        ("name: [1 2]", r"expected ',' or '\]' in a list"),
        ("n: 12abc", r"expected a value"),
        ("n: -foo", r"unexpected '-foo'"),
        ("a {" * 70, r"nested deeper than 64"),
    ],
)
def test_pbtxt_syntax_errors_give_line_and_column(text: str, message: str) -> None:
    with pytest.raises(PbtxtError, match=message):
        parse_pbtxt(text)
