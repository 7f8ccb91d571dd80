"""The serving setting of the pre-ranking stage, importable without torch.

:mod:`model.preranker` holds the pre-ranker itself (and re-exports these
names); this module is kept free of torch so that settings, and every command
that only reads them, start without loading the model code.

>>> PreRankConfig.from_dict({"pre_ranker": "inttower", "top_n": 500}).top_n
500
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from model.config_base import ConfigError, from_dict

__all__ = ["PRE_RANKERS", "PreRankConfig"]

PRE_RANKERS = ("none", "inttower")


@dataclasses.dataclass(frozen=True)
class PreRankConfig:
    """The serving setting of the pre-ranking stage.

    Fields:
        pre_ranker: ``"none"`` (full-catalogue scoring) or ``"inttower"``.
        top_n: candidates handed to the session model.
        chunk_size: catalogue items scored at once (memory ``O(B * chunk_size)``).
        version: directory of the pre-ranker version (:func:`~model.preranker.save_preranker`)
            to load.
    """

    pre_ranker: str = "none"
    top_n: int = 1000
    chunk_size: int = 65_536
    version: str | None = None

    def __post_init__(self) -> None:
        if self.pre_ranker not in PRE_RANKERS:
            raise ConfigError(f"pre_ranker {self.pre_ranker!r}: choose one of {PRE_RANKERS}")
        if self.top_n < 1 or self.chunk_size < 1:
            raise ConfigError("top_n and chunk_size must be >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PreRankConfig:
        return from_dict(cls, data)
