"""The feature schema: which per-event features the model sees and how each is built.

A :class:`Schema` is an immutable, ordered collection of :class:`Feature`. Every
feature is *per event*: for a batch of sessions it becomes one ``[batch, seq_len]``
tensor (``kind=list`` features, whose single event carries several values, add a
trailing dimension). The schema is saved as JSON (``"format": "streamrec.schema/1"``)
and can be imported from a Merlin / Transformers4Rec schema (``schema.json`` or
``schema.pbtxt``, see :mod:`features.merlin`). Spec: ``docs/features-schema.md``.

>>> s = default_schema()
>>> s.names
('item_id', 'category', 'price', 'event_type', 'hour', 'weekday', 'time_since_prev', 'session_age')
>>> s.item_id_feature.transform
{'op': 'categorify', 'min_freq': 1}
>>> s["hour"].source_column, s["hour"].dtype
('ts', 'int64')
>>> s.select_by_tag(Tag.TIME).names
('time_since_prev', 'session_age')
>>> Schema.from_json(s.to_json()) == s
True
>>> s.with_feature(Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
...                        transform={"op": "hash_bucket", "num_buckets": 1000})).names == s.names
True
>>> Schema.from_json('{"format": "streamrec.schema/1", "features": [{"name": "x"}]}')
Traceback (most recent call last):
...
features.schema.SchemaError: feature 0 ('x'): missing key 'kind'; required keys: ['kind', 'name', 'transform']
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["FLOAT32", "FORMAT", "INT64", "Feature", "Kind", "Schema", "SchemaError", "Tag",
           "default_schema"]

logger = logging.getLogger(__name__)

FORMAT = "streamrec.schema/1"
INT64 = "int64"
FLOAT32 = "float32"


class SchemaError(ValueError):
    """A schema (or a schema file) is invalid; the message says what is allowed."""


class Kind(enum.StrEnum):
    """What one event's value of a feature is, after its transform."""

    CATEGORICAL = "categorical"  # one id per event (int64), looked up in an embedding table
    CONTINUOUS = "continuous"  # one number per event (float32)
    LIST = "list"  # several values per event (e.g. genres); element dtype says which kind


class Tag(enum.StrEnum):
    """The role a feature plays; a feature may have several (or none)."""

    ITEM_ID = "item_id"  # the item interacted with: the model's input and prediction target
    SESSION_ID = "session_id"  # the session key; groups events, not a model input
    USER_ID = "user_id"  # a known user's id, when the event carries one
    TIME = "time"  # a measure of elapsed time (time since previous event, session age)
    ITEM_FEATURE = "item_feature"  # describes the item (category, price), not the interaction
    CONTEXT = "context"  # describes the interaction (event type, hour, weekday, device)
    TARGET = "target"  # a label to predict besides the next item (e.g. purchase)


_DTYPES = (INT64, FLOAT32)
_ID_TAGS = frozenset({Tag.ITEM_ID, Tag.SESSION_ID, Tag.USER_ID})
_REQUIRED_KEYS = ("kind", "name", "transform")
_FEATURE_KEYS = (
    "name", "kind", "dtype", "tags", "source", "transform", "cardinality", "properties"
)


def _allowed(enum_cls: type[enum.StrEnum]) -> list[str]:
    return [m.value for m in enum_cls]


def _parse_enum(enum_cls: type[enum.StrEnum], value: Any, what: str) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        raise SchemaError(
            f"unknown {what} {value!r}; allowed: {_allowed(enum_cls)}"
        ) from None


def _json_copy(value: Any, what: str) -> Any:
    """A deep copy of ``value`` through JSON, so it is JSON-able and not shared."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise SchemaError(
            f"{what} must be JSON-able (str keys; str, int, finite float, bool, None, "
            f"list, dict values): {e}"
        ) from None


@dataclasses.dataclass(frozen=True)
class Feature:
    """One per-event feature.

    ``transform`` and ``properties`` are plain JSON-able dicts, copied on
    construction; treat them as read-only. Use :func:`dataclasses.replace` to
    derive a changed feature (e.g. to set ``cardinality`` after fitting).

    Fields:
        name: unique name in the schema; the model input's key.
        kind: see :class:`Kind`.
        tags: roles, see :class:`Tag`. ``item_id``/``session_id``/``user_id``
            features must be categorical.
        source: the raw event column it is computed from; ``None`` means the
            column named ``name`` (a ``source`` equal to ``name`` is stored as ``None``).
        transform: the op that builds the feature from ``source`` and its
            parameters, e.g. ``{"op": "categorify", "min_freq": 2}``. Only the
            presence of a string ``"op"`` is checked here; ``features.ops``
            validates the rest.
        dtype: the tensor dtype after the transform: ``"int64"`` (categorical)
            or ``"float32"`` (continuous). Derived from ``kind`` when ``None``;
            required for ``kind=list`` (it gives the element kind).
        cardinality: number of ids (ids lie in ``[0, cardinality)``), set by
            fitting; ``None`` before. Only for int64 features.
        properties: free-form JSON-able hints, e.g. ``{"embedding_dim": 64}``.
    """

    name: str
    kind: Kind
    _: dataclasses.KW_ONLY
    transform: dict[str, Any] = dataclasses.field(hash=False)
    tags: frozenset[Tag] = frozenset()
    source: str | None = None
    dtype: str | None = None
    cardinality: int | None = None
    properties: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        def put(field: str, value: Any) -> None:
            object.__setattr__(self, field, value)

        def err(msg: str) -> SchemaError:
            return SchemaError(f"feature {self.name!r}: {msg}")

        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"feature name must be a non-empty string, got {self.name!r}")
        put("kind", kind := _parse_enum(Kind, self.kind, "kind"))
        if isinstance(self.tags, str | bytes) or not isinstance(self.tags, Iterable):
            raise err(f"tags must be a collection of tags, got {self.tags!r}")
        put("tags", tags := frozenset(_parse_enum(Tag, t, "tag") for t in self.tags))
        if self.source is not None and (not isinstance(self.source, str) or not self.source):
            raise err(f"source must be a non-empty string or None, got {self.source!r}")
        if self.source == self.name:
            put("source", None)
        op = self.transform.get("op") if isinstance(self.transform, dict) else None
        if not isinstance(op, str) or not op:
            raise err("transform must be a dict with a non-empty string 'op', e.g. "
                      f"{{'op': 'categorify'}}; got {self.transform!r}")
        put("transform", _json_copy(self.transform, f"feature {self.name!r}: transform"))
        if not isinstance(self.properties, dict):
            raise err(f"properties must be a dict, got {self.properties!r}")
        put("properties", _json_copy(self.properties, f"feature {self.name!r}: properties"))
        implied = {Kind.CATEGORICAL: INT64, Kind.CONTINUOUS: FLOAT32}.get(kind)
        if self.dtype is None and implied is None:
            raise err("kind 'list' needs a dtype: 'int64' for categorical elements, "
                      "'float32' for continuous ones")
        if self.dtype is None:
            put("dtype", implied)
        elif self.dtype not in _DTYPES:
            raise err(f"unknown dtype {self.dtype!r}; allowed: {list(_DTYPES)}")
        elif implied is not None and self.dtype != implied:
            raise err(f"kind {kind.value!r} has dtype {implied!r}, got {self.dtype!r}")
        if self.cardinality is not None and (
            type(self.cardinality) is not int or self.cardinality < 1
        ):
            raise err(f"cardinality must be a positive int or None, got {self.cardinality!r}")
        if self.cardinality is not None and self.dtype != INT64:
            raise err("cardinality is only for int64 (categorical) features")
        if tags & _ID_TAGS and kind is not Kind.CATEGORICAL:
            ids = sorted(t.value for t in tags & _ID_TAGS)
            raise err(f"tags {ids} need kind 'categorical', got {kind.value!r}")

    @property
    def source_column(self) -> str:
        """The raw event column this feature is computed from."""
        return self.source if self.source is not None else self.name

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (every key present; tags sorted)."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "dtype": self.dtype,
            "tags": sorted(t.value for t in self.tags),
            "source": self.source,
            "transform": _json_copy(self.transform, "transform"),
            "cardinality": self.cardinality,
            "properties": _json_copy(self.properties, "properties"),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "feature") -> Feature:
        """Parse the JSON form; unknown or missing keys are errors."""
        if not isinstance(d, dict):
            raise SchemaError(f"{where}: must be a JSON object, got {type(d).__name__}")
        if isinstance(d.get("name"), str):
            where = f"{where} ({d['name']!r})"
        unknown = sorted(set(d) - set(_FEATURE_KEYS))
        if unknown:
            raise SchemaError(f"{where}: unknown keys {unknown}; allowed: {sorted(_FEATURE_KEYS)}")
        for key in _REQUIRED_KEYS:
            if key not in d:
                raise SchemaError(
                    f"{where}: missing key {key!r}; required keys: {list(_REQUIRED_KEYS)}"
                )
        tags = d.get("tags", [])
        if not isinstance(tags, list):
            raise SchemaError(f"{where}: tags must be a list, got {tags!r}")
        properties = d.get("properties", {})
        properties = {} if properties is None else properties
        try:
            return cls(
                d["name"], d["kind"], transform=d["transform"], tags=frozenset(tags),
                source=d.get("source"), dtype=d.get("dtype"),
                cardinality=d.get("cardinality"), properties=properties,
            )
        except (SchemaError, TypeError) as e:
            msg = str(e).removeprefix(f"feature {d['name']!r}: ")
            raise SchemaError(f"{where}: {msg}") from None


class Schema:
    """An immutable, ordered collection of uniquely named :class:`Feature`."""

    __slots__ = ("_features", "_index")

    def __init__(self, features: Iterable[Feature] = ()) -> None:
        self._features: tuple[Feature, ...] = tuple(features)
        self._index: dict[str, int] = {}
        for i, f in enumerate(self._features):
            if not isinstance(f, Feature):
                raise SchemaError(f"schema entry {i} is a {type(f).__name__}, not a Feature")
            if f.name in self._index:
                raise SchemaError(
                    f"duplicate feature name {f.name!r} (entries {self._index[f.name]} and {i}); "
                    f"feature names must be unique"
                )
            self._index[f.name] = i

    # -- collection -------------------------------------------------------
    def __iter__(self) -> Iterator[Feature]:
        return iter(self._features)

    def __len__(self) -> int:
        return len(self._features)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> Feature:
        try:
            return self._features[self._index[name]]
        except (KeyError, TypeError):
            raise KeyError(f"no feature {name!r}; the schema has {list(self.names)}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self._features == other._features

    def __hash__(self) -> int:
        return hash(self._features)

    def __repr__(self) -> str:
        return f"Schema({list(self.names)})"

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names, in order."""
        return tuple(f.name for f in self._features)

    def select_by_tag(self, tag: Tag | str) -> Schema:
        """The features carrying ``tag``, in order (possibly none)."""
        t = _parse_enum(Tag, tag, "tag")
        return Schema(f for f in self._features if t in f.tags)

    def select_by_kind(self, kind: Kind | str) -> Schema:
        """The features of ``kind``, in order (possibly none)."""
        k = _parse_enum(Kind, kind, "kind")
        return Schema(f for f in self._features if f.kind is k)

    @property
    def item_id_feature(self) -> Feature:
        """The one feature tagged ``item_id``; a :class:`SchemaError` if not exactly one."""
        found = [f.name for f in self._features if Tag.ITEM_ID in f.tags]
        if len(found) != 1:
            raise SchemaError(
                f"the schema needs exactly one feature tagged 'item_id', found {len(found)}"
                f"{' (' + ', '.join(found) + ')' if found else ''}; tag the item column "
                f"(e.g. default_schema()['item_id']) and only it"
            )
        return self[found[0]]

    def with_feature(self, feature: Feature) -> Schema:
        """A new schema with ``feature`` replacing the same-named one in place, else appended."""
        if feature.name in self._index:
            features = list(self._features)
            features[self._index[feature.name]] = feature
            return Schema(features)
        return Schema((*self._features, feature))

    def without(self, name: str) -> Schema:
        """A new schema without feature ``name`` (a KeyError if it has none)."""
        self[name]  # raises the KeyError that lists the names
        return Schema(f for f in self._features if f.name != name)

    # -- JSON -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "features": [f.to_dict() for f in self._features]}

    @classmethod
    def from_dict(cls, d: Any) -> Schema:
        if not isinstance(d, dict):
            raise SchemaError(f"a schema must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"format", "features"})
        if unknown:
            raise SchemaError(f"unknown top-level keys {unknown}; allowed: ['features', 'format']")
        if d.get("format") != FORMAT:
            raise SchemaError(
                f"unsupported schema format {d.get('format')!r}; this version reads {FORMAT!r} "
                f"(for a Merlin/Transformers4Rec schema use Schema.from_merlin)"
            )
        features = d.get("features")
        if not isinstance(features, list):
            raise SchemaError(f"'features' must be a list of feature objects, got {features!r}")
        return cls(Feature.from_dict(f, f"feature {i}") for i, f in enumerate(features))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Schema:
        try:
            d = json.loads(text, object_pairs_hook=_no_duplicate_keys,
                           parse_constant=_no_nan)
        except json.JSONDecodeError as e:
            raise SchemaError(f"schema is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON form to ``path`` (via a temporary file and rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, path)
        logger.info("saved schema with %d features to %s", len(self), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Schema:
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except SchemaError as e:
            raise SchemaError(f"{path}: {e}") from None

    @classmethod
    def from_merlin(cls, path: str | os.PathLike[str], *, sequences: bool = True) -> Schema:
        """Import a Merlin / T4Rec schema file (``schema.json`` or ``schema.pbtxt``).

        ``path`` may be the file or a dataset directory holding
        ``.merlin/schema.json``, ``schema.json`` or ``schema.pbtxt``. With
        ``sequences=True`` (T4Rec session data: one row per session) a Merlin
        list is the session's sequence, i.e. one value per event; with
        ``sequences=False`` (one row per event) it is a ``kind=list`` feature.
        See ``docs/features-schema.md`` for the mapping.
        """
        from features.merlin import read_merlin_schema  # merlin imports this module

        return cls(read_merlin_schema(path, sequences=sequences))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise SchemaError(f"duplicate JSON key {k!r} in one object")
        d[k] = v
    return d


def _no_nan(token: str) -> Any:
    raise SchemaError(f"{token} is not valid in a schema (JSON has no NaN/Infinity)")


def default_schema() -> Schema:
    """The schema for the event contract's core fields and default side features.

    ``category`` and ``price`` are side features (docs/events.md); the time
    features are computed from ``ts``. Nothing is fitted: cardinalities are ``None``.
    """
    cat, cont = Kind.CATEGORICAL, Kind.CONTINUOUS
    return Schema([
        Feature("item_id", cat, tags={Tag.ITEM_ID}, transform={"op": "categorify", "min_freq": 1}),
        Feature("category", cat, tags={Tag.ITEM_FEATURE},
                transform={"op": "categorify", "min_freq": 1}),
        Feature("price", cont, tags={Tag.ITEM_FEATURE}, transform={"op": "normalize", "log": True}),
        Feature("event_type", cat, tags={Tag.CONTEXT},
                transform={"op": "categorify", "min_freq": 1}),
        Feature("hour", cat, tags={Tag.CONTEXT}, source="ts", transform={"op": "hour"}),
        Feature("weekday", cat, tags={Tag.CONTEXT}, source="ts", transform={"op": "weekday"}),
        Feature("time_since_prev", cont, tags={Tag.TIME}, source="ts",
                transform={"op": "time_since_prev"}),
        Feature("session_age", cont, tags={Tag.TIME}, source="ts",
                transform={"op": "session_age"}),
    ])
