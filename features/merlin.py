"""Read a Merlin / Transformers4Rec schema (``schema.json`` or ``schema.pbtxt``).

Both files describe a TensorFlow-Metadata ``Schema``: ``schema.json`` as
merlin-core writes it (proto3 JSON: camelCase keys, int64 values as strings)
and ``schema.pbtxt`` in protobuf text format as NVTabular writes it. The text
format is read by :func:`parse_pbtxt`, a small dependency-free parser; both
forms are normalised to the same nested ``{key: [values]}`` shape and mapped
to :class:`~features.schema.Feature` by one function. The mapping is
``docs/features-schema.md``, section "Importing a Merlin / T4Rec schema".

>>> parse_pbtxt('feature { name: "item_id" type: INT annotation { tag: "item_id" tag: "list" } }')
{'feature': [{'name': ['item_id'], 'type': ['INT'], 'annotation': [{'tag': ['item_id', 'list']}]}]}
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from features.schema import FLOAT32, INT64, Feature, Kind, SchemaError, Tag

__all__ = ["PbtxtError", "merlin_features", "parse_pbtxt", "read_merlin_schema"]

logger = logging.getLogger(__name__)

Message = dict[str, list[Any]]


class PbtxtError(SchemaError):
    """Malformed protobuf text; the message gives line and column."""


# -- protobuf text format --------------------------------------------------

_WS = re.compile(r"(?:\s+|#[^\n]*)*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(
    r"[-+]?(?:0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?[fF]?)"
    r"(?![A-Za-z0-9_.])"
)
_WORD = re.compile(r"-?[A-Za-z_][A-Za-z0-9_]*")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f",
                   "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}
_SPECIAL_FLOATS = {"inf": float("inf"), "infinity": float("inf"), "nan": float("nan")}
_MAX_DEPTH = 64
_OCTAL = re.compile(r"[0-7]{1,3}")
_HEX = {"x": re.compile(r"[0-9a-fA-F]{1,2}"), "u": re.compile(r"[0-9a-fA-F]{4}"),
        "U": re.compile(r"[0-9a-fA-F]{8}")}


class _Parser:
    """Recursive descent over the text; positions are character offsets."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> PbtxtError:
        line = self.text.count("\n", 0, self.pos) + 1
        col = self.pos - (self.text.rfind("\n", 0, self.pos) + 1) + 1
        return PbtxtError(f"pbtxt line {line}, column {col}: {msg}")

    def peek(self) -> str:
        self.pos = _WS.match(self.text, self.pos).end()  # type: ignore[union-attr]
        return self.text[self.pos : self.pos + 1]

    def message(self, close: str, depth: int) -> Message:
        if depth > _MAX_DEPTH:
            raise self.error(f"messages nested deeper than {_MAX_DEPTH}")
        msg: Message = {}
        while True:
            c = self.peek()
            if c == close:  # "" closes the top level
                self.pos += len(c)
                return msg
            if c == "":
                raise self.error(f"unexpected end of text, missing {close!r}")
            name = self.field_name()
            values = msg.setdefault(name, [])
            c = self.peek()
            if c == ":":
                self.pos += 1
                c = self.peek()
                if c == "[":
                    self.pos += 1
                    values.extend(self.list_values(depth))
                else:
                    values.append(self.value(depth))
            elif c in ("{", "<"):
                values.append(self.value(depth))
            else:
                raise self.error(f"expected ':' or '{{' after field {name!r}")
            if self.peek() in (",", ";"):
                self.pos += 1

    def field_name(self) -> str:
        if self.text.startswith("[", self.pos):  # extension or Any type URL
            end = self.text.find("]", self.pos)
            if end < 0:
                raise self.error("unterminated '[' in field name")
            name = "[" + re.sub(r"\s+", "", self.text[self.pos + 1 : end]) + "]"
            self.pos = end + 1
            return name
        m = _IDENT.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected a field name, got {self.text[self.pos:self.pos + 10]!r}")
        self.pos = m.end()
        return m.group()

    def list_values(self, depth: int) -> list[Any]:
        out: list[Any] = []
        if self.peek() == "]":
            self.pos += 1
            return out
        while True:
            out.append(self.value(depth))
            c = self.peek()
            self.pos += 1
            if c == "]":
                return out
            if c != ",":
                self.pos -= 1
                raise self.error("expected ',' or ']' in a list")

    def value(self, depth: int) -> Any:
        c = self.peek()
        if c in ("{", "<"):
            self.pos += 1
            return self.message("}" if c == "{" else ">", depth + 1)
        if c in ('"', "'"):
            parts = [self.string()]
            while self.peek() in ('"', "'"):  # adjacent literals concatenate
                parts.append(self.string())
            return "".join(parts)
        if m := _NUMBER.match(self.text, self.pos):
            self.pos = m.end()
            return _number(m.group())
        if m := _WORD.match(self.text, self.pos):
            self.pos = m.end()
            word = m.group()
            if word in ("true", "True"):
                return True
            if word in ("false", "False"):
                return False
            sign, bare = (-1.0, word[1:]) if word.startswith("-") else (1.0, word)
            if bare.lower() in _SPECIAL_FLOATS:
                return sign * _SPECIAL_FLOATS[bare.lower()]
            if sign < 0:
                raise self.error(f"unexpected {word!r}")
            return word  # an enum value, e.g. INT
        raise self.error(f"expected a value, got {self.text[self.pos:self.pos + 10]!r}")

    def string(self) -> str:
        quote, text = self.text[self.pos], self.text
        self.pos += 1
        out = bytearray()  # escapes are bytes (C++ writes UTF-8 as octal escapes)
        while True:
            if self.pos >= len(text) or text[self.pos] == "\n":
                raise self.error("unterminated string")
            c = text[self.pos]
            self.pos += 1
            if c == quote:
                break
            if c != "\\":
                out += c.encode("utf-8")
                continue
            e = text[self.pos : self.pos + 1]
            self.pos += 1
            if e in _SIMPLE_ESCAPES:
                out += _SIMPLE_ESCAPES[e].encode()
            elif m := _OCTAL.match(text, self.pos - 1):
                out.append(int(m.group(), 8) & 0xFF)
                self.pos = m.end()
            elif e == "x" and (m := _HEX["x"].match(text, self.pos)):
                out.append(int(m.group(), 16))
                self.pos = m.end()
            elif e in ("u", "U") and (m := _HEX[e].match(text, self.pos)):
                try:
                    out += chr(int(m.group(), 16)).encode("utf-8")
                except (ValueError, UnicodeEncodeError):
                    raise self.error(f"invalid code point \\{e}{m.group()}") from None
                self.pos = m.end()
            else:
                self.pos -= 2
                raise self.error(f"unknown escape \\{e} in string")
        try:
            return out.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error("string is not valid UTF-8") from None


def _number(token: str) -> int | float:
    body = token.lstrip("+-")
    if body[:2] in ("0x", "0X"):
        return int(token.replace("0x", "", 1).replace("0X", "", 1), 16)
    if any(ch in body for ch in ".eEfF"):
        return float(token.rstrip("fF"))
    return int(token)


def parse_pbtxt(text: str) -> Message:
    """Parse protobuf text format into ``{field: [values]}`` (messages are dicts).

    Every field maps to the list of its values in order (repeated keys append;
    a singular field's value is the last one). Supports ``#`` comments, nested
    ``{}``/``<>`` blocks, ``key: [a, b]`` lists, ``[type.url]`` names, strings
    in either quote with C escapes (adjacent strings concatenate), ints (also
    hex), floats, ``true``/``false`` and enum names (returned as ``str``).
    """
    return _Parser(text).message("", 0)


# -- Merlin schema -> features --------------------------------------------

def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _from_json(value: Any) -> Any:
    """proto3 JSON to the parse_pbtxt shape: snake_case keys, every field a list."""
    if isinstance(value, dict):
        return {
            _snake(k): [_from_json(x) for x in (v if isinstance(v, list) else [v])]
            for k, v in value.items()
        }
    return value


def _one(msg: Message, key: str, default: Any = None) -> Any:
    values = msg.get(key)
    return values[-1] if values else default


def _sub(msg: Message, key: str) -> Message:
    """The (last) sub-message ``key`` of ``msg``; ``{}`` when absent."""
    value = _one(msg, key, {})
    if not isinstance(value, dict):
        raise SchemaError(f"{key!r} must be a message, got {value!r}")
    return value


def _int(value: Any, what: str) -> int:
    """An int from proto text (int) or proto3 JSON (int64 written as a string)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?[0-9]+\s*", value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise SchemaError(f"{what} must be an integer, got {value!r}")


def _bool(value: Any) -> bool:
    return value is True or value in (1, "true", "True", "1")


# Merlin tag -> our tags. "categorical"/"continuous"/"list"/"sequence" set the kind;
# "id" combines with "item"/"user"/"session". Any other tag is unmapped (kept in properties).
_KIND_TAGS = frozenset({"categorical", "continuous", "list", "sequence", "id"})
_TAG_MAP = {
    "item_id": Tag.ITEM_ID, "session_id": Tag.SESSION_ID, "user_id": Tag.USER_ID,
    "time": Tag.TIME, "context": Tag.CONTEXT, "item": Tag.ITEM_FEATURE,
    "session": Tag.CONTEXT, "user": Tag.CONTEXT, "target": Tag.TARGET,
    "binary": Tag.TARGET, "regression": Tag.TARGET, "multi_class": Tag.TARGET,
    "binary_classification": Tag.TARGET, "multi_class_classification": Tag.TARGET,
}
_LIST_SUFFIX = re.compile(r"[-_]list(?:[-_]seq)?$")
_TYPES = {0: "TYPE_UNKNOWN", 1: "BYTES", 2: "INT", 3: "FLOAT", 4: "STRUCT"}


def _our_tags(merlin_tags: list[str]) -> tuple[set[Tag], list[str]]:
    raw = set(merlin_tags)
    for entity in ("item", "user", "session"):
        if "id" in raw and entity in raw:
            raw.add(f"{entity}_id")
    tags: set[Tag] = set()
    for t in raw:
        if t in _TAG_MAP:
            tags.add(_TAG_MAP[t])
    # the id column of an entity is not a feature *of* that entity
    if Tag.ITEM_ID in tags and "item_id" in raw:
        tags.discard(Tag.ITEM_FEATURE)
    if tags & {Tag.USER_ID, Tag.SESSION_ID}:
        tags.discard(Tag.CONTEXT)
    unmapped = [t for t in merlin_tags if t not in _TAG_MAP and t not in _KIND_TAGS]
    return tags, unmapped


def _extra_is_list(annotation: Message) -> bool:
    """``is_list`` from merlin-core's extra_metadata (a Struct: plain in JSON, an Any in text)."""
    for entry in annotation.get("extra_metadata", []):
        if not isinstance(entry, dict):
            continue
        if "is_list" in entry:
            return _bool(_one(entry, "is_list"))
        for key, values in entry.items():
            if key.startswith("[") and values and isinstance(values[-1], dict):
                for field in values[-1].get("fields", []):
                    if _one(field, "key") == "is_list":
                        return _bool(_one(_one(field, "value", {}), "bool_value"))
    return False


def _list_depth(f: Message, merlin_tags: list[str], annotation: Message) -> int:
    """How many list levels the Merlin column has (0 = scalar)."""
    if counts := _sub(f, "value_counts"):
        return len(counts.get("value_count", [])) or 1
    vc = _sub(f, "value_count") if "value_count" in f else None
    fixed_one = vc is not None and (
        _int(_one(vc, "min", 0), "value_count.min") == _int(_one(vc, "max", 0), "value_count.max")
        == 1
    )
    is_list = (
        bool({"list", "sequence"} & set(merlin_tags))
        or (vc is not None and not fixed_one)
        or _extra_is_list(annotation)
    )
    return 1 if is_list else 0


def _feature(f: Any, sequences: bool) -> Feature:
    if not isinstance(f, dict):
        raise SchemaError(f"each 'feature' must be a message, got {f!r}")
    name = _one(f, "name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"a Merlin feature has no name: {f!r}")
    annotation = _sub(f, "annotation")
    merlin_tags = [str(t) for t in annotation.get("tag", [])]
    tags, unmapped = _our_tags(merlin_tags)
    mtype = _one(f, "type", "TYPE_UNKNOWN")
    mtype = _TYPES.get(mtype, mtype) if isinstance(mtype, int) else mtype
    int_domain = _sub(f, "int_domain")
    merlin_categorical = (
        "categorical" in merlin_tags or _bool(_one(int_domain, "is_categorical", False))
    )
    # raw strings and id columns are categorical even where Merlin kept them as plain ints
    categorical = merlin_categorical or mtype == "BYTES" or bool(
        tags & {Tag.ITEM_ID, Tag.SESSION_ID, Tag.USER_ID})
    if {"categorical", "continuous"} <= set(merlin_tags):
        raise SchemaError(f"Merlin feature {name!r} is tagged both categorical and continuous")
    props: dict[str, Any] = {"merlin_name": name, "merlin_tags": merlin_tags}
    if unmapped:
        props["merlin_unmapped_tags"] = unmapped
        logger.warning("Merlin feature %r: tags %s have no streamrec equivalent; kept in "
                       "properties['merlin_unmapped_tags']", name, unmapped)
    if merlin_categorical and _one(int_domain, "max") is not None:
        props["merlin_cardinality"] = _int(_one(int_domain, "max"), f"{name}: int_domain.max") + 1
    if _one(int_domain, "name"):
        props["merlin_domain"] = _one(int_domain, "name")
    if vc := _sub(f, "value_count"):
        props["merlin_value_count"] = {k: _int(_one(vc, k, 0), f"{name}: value_count.{k}")
                                       for k in ("min", "max")}

    depth = _list_depth(f, merlin_tags, annotation)
    per_event_depth = depth - 1 if sequences else depth
    ours = name
    if sequences and depth >= 1:
        ours = _LIST_SUFFIX.sub("", name) or name
    elif sequences:
        props["merlin_session_level"] = True
    if per_event_depth > 1 or (per_event_depth == 1 and tags & {Tag.ITEM_ID, Tag.SESSION_ID,
                                                                Tag.USER_ID}):
        raise SchemaError(
            f"Merlin feature {name!r} has {depth} list level(s); with sequences={sequences} "
            f"that is {per_event_depth} per event, which streamrec does not support"
            f"{' for an id column' if per_event_depth == 1 else ''}"
        )
    dtype = INT64 if categorical else FLOAT32
    kind = Kind.LIST if per_event_depth == 1 else (
        Kind.CATEGORICAL if categorical else Kind.CONTINUOUS)
    if Tag.SESSION_ID in tags:
        transform = {"op": "identity"}  # the grouping key, not a model input
    else:
        transform = {"op": "categorify"} if categorical else {"op": "normalize"}
    source = ours.split("/", 1)[0] if "/" in ours else None
    try:
        return Feature(ours, kind, tags=frozenset(tags), source=source, dtype=dtype,
                       transform=transform, properties=props)
    except SchemaError as e:
        raise SchemaError(f"Merlin feature {name!r}: {e}") from None


def merlin_features(schema: Message, *, sequences: bool = True) -> list[Feature]:
    """Map a parsed TF-Metadata schema (``parse_pbtxt`` shape) to features."""
    unknown = sorted(set(schema) - {"feature", "sparse_feature", "weighted_feature",
                                    "string_domain", "float_domain", "int_domain",
                                    "default_environment", "annotation", "dataset_constraints",
                                    "tensor_representation_group"})
    if unknown:
        raise SchemaError(f"not a Merlin / TF-Metadata schema: unknown top-level keys {unknown}")
    features = [_feature(f, sequences) for f in schema.get("feature", [])]
    if not features:
        raise SchemaError("the Merlin schema has no 'feature' entries")
    seen: dict[str, str] = {}
    for f in features:
        merlin_name = f.properties["merlin_name"]
        if f.name in seen:
            raise SchemaError(
                f"Merlin features {seen[f.name]!r} and {merlin_name!r} both map to {f.name!r}; "
                f"rename one in the Merlin schema or import with sequences=False"
            )
        seen[f.name] = merlin_name
    return features


def read_merlin_schema(path: str | os.PathLike[str], *, sequences: bool = True) -> list[Feature]:
    """Read ``schema.json`` / ``schema.pbtxt`` (by content, not extension) or a dataset dir."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / ".merlin" / "schema.json", p / "schema.json", p / "schema.pbtxt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise SchemaError(f"{p} holds none of {[str(c.relative_to(p)) for c in candidates]}")
        p = found
    text = p.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("{"):
            parsed = _from_json(json.loads(text))
        else:
            parsed = parse_pbtxt(text)
        features = merlin_features(parsed, sequences=sequences)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{p}: not valid JSON: {e}") from None
    except SchemaError as e:
        raise SchemaError(f"{p}: {e}") from None
    logger.info("imported %d features from Merlin schema %s", len(features), p)
    return features
