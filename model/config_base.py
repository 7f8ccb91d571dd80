"""Strict construction of the frozen config dataclasses of ``model/``.

Every component of the model (input block, sequence block, heads, trainer)
has one frozen dataclass config. Configs come from JSON (``config.json`` of a
checkpoint, a benchmark row), so :func:`from_dict` turns a plain dict into the
dataclass and rejects what a typo would otherwise hide: an unknown key is an
error that names the valid ones and the closest match.

>>> import dataclasses
>>> @dataclasses.dataclass(frozen=True)
... class Demo:
...     d_model: int = 64
...     dropout: float = 0.1
>>> from_dict(Demo, {"d_model": 32})
Demo(d_model=32, dropout=0.1)
>>> from_dict(Demo, {"dropuot": 0.2})
Traceback (most recent call last):
...
model.config_base.ConfigError: Demo: unknown key 'dropuot' (did you mean 'dropout'?); valid keys: d_model, dropout
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["ConfigError", "from_dict", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A model config that cannot be built: unknown key, wrong value, invalid combination."""


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str | None = None) -> T:
    """Build the dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`.

    Nested dataclass fields are not converted here: a config with nested
    configs converts them in its own ``from_dict``.
    """
    where = where or cls.__name__
    data = dict(data or {})
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(names)}"
        )
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The JSON-able dict of a (possibly nested) config dataclass; tuples become lists."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
