"""Settings of the drift monitor (``streamrec monitor``), read from ``STREAMREC_MONITOR_*``.

Kept apart from ``serving/monitor.py`` so that ``streamrec.settings`` can list
it without importing the monitor (torch, the registry). The model registry is
the server's (``STREAMREC_SERVING_MODELS_ROOT``), the Redis key prefix the
session store's (``STREAMREC_REDIS_KEY_PREFIX``). Thresholds and what they
mean: ``docs/drift.md``.

>>> s = MonitorSettings(event_types="click, purchase")
>>> sorted(s.event_type_set), s.page_hinkley().direction, s.distribution().window
(['click', 'purchase'], 'down', 5000)
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ingest.events import EVENT_TYPES
from model.drift import (
    ALARM_CHANNEL,
    DistributionConfig,
    LengthShiftConfig,
    PageHinkleyConfig,
)

__all__ = ["MonitorSettings"]


class MonitorSettings(BaseSettings):
    """The drift monitor (`streamrec monitor`): online metrics, drift detectors, alarms."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_MONITOR_", frozen=True, extra="forbid")

    group: str = Field("streamrec-monitor", min_length=1, description="consumer group")
    from_beginning: bool = Field(
        False, description="a new group reads the topic from its start (default: only new events)"
    )
    batch_size: int = Field(1000, ge=1, le=100_000, description="records per poll")
    poll_timeout_s: float = Field(0.5, gt=0, le=30, description="longest wait for a batch")
    event_types: str = Field(
        "", description="comma-separated event types that count as clicks; empty = every type"
    )
    # Online quality of what was served.
    k: int = Field(10, ge=1, le=1000, description="cut-off of the online HR@k and NDCG@k")
    metric_window: int = Field(
        1000, ge=1, le=10_000_000, description="scored clicks behind the HR/NDCG gauges"
    )
    ph_delta: float = Field(
        0.02, ge=0, le=1, description="Page-Hinkley on hits: drop of HR@k tolerated"
    )
    ph_threshold: float = Field(40.0, gt=0, description="Page-Hinkley alarm threshold (lambda)")
    ph_min_samples: int = Field(
        200, ge=1, description="scored clicks of a version before its Page-Hinkley may fire"
    )
    # Item distribution against the champion's training window.
    item_window: int = Field(5000, ge=1, le=10_000_000, description="live items compared")
    item_min_samples: int = Field(500, ge=1, description="live items before an item alarm")
    item_bins: int = Field(
        20, ge=1, le=10_000, description="popularity bins of the training items (PSI, JS)"
    )
    psi_threshold: float = Field(0.25, gt=0, description="PSI alarm threshold")
    js_threshold: float = Field(
        0.05, gt=0, le=1, description="Jensen-Shannon (bits) alarm threshold"
    )
    oov_threshold: float = Field(
        0.2, gt=0, le=1, description="share of live items outside the training vocabulary"
    )
    # Session lengths.
    session_gap_s: float = Field(
        1800.0, gt=0, description="a session idle this long (event time) has finished"
    )
    max_open_sessions: int = Field(
        200_000, ge=1, description="sessions tracked at once; the least recent finish early"
    )
    length_window: int = Field(1000, ge=1, description="finished sessions compared")
    length_min_samples: int = Field(200, ge=1, description="finished sessions before an alarm")
    ks_threshold: float = Field(
        0.15, gt=0, lt=1, description="KS statistic of session lengths: alarm threshold"
    )
    length_reference_size: int = Field(
        1000, ge=1,
        description="without training lengths in the version, the first N finished sessions "
        "under a champion are its reference",
    )
    # Alarms and the champion.
    alarm_channel: str = Field(
        ALARM_CHANNEL, min_length=1, description="Redis pub/sub channel of drift alarms"
    )
    alarm_repeat_s: float = Field(
        600.0, ge=0, description="an alarm still holding is published again after this long"
    )
    registry_poll_s: float = Field(
        10.0, gt=0, le=3600, description="how often the registry's CURRENT pointer is read"
    )
    metrics_port: int = Field(
        9403, ge=0, le=65535, description="Prometheus port of the monitor (0 = any)"
    )
    # The drift timeline in Redis (what the demo page charts; docs/drift.md).
    timeline_interval_s: float = Field(
        5.0, ge=0, le=3600,
        description="seconds between two points of the drift timeline in Redis (0 = none written)",
    )
    timeline_max_points: int = Field(
        2000, ge=1, le=1_000_000, description="timeline entries kept; the oldest are dropped"
    )

    @field_validator("event_types")
    @classmethod
    def _check_types(cls, v: str) -> str:
        unknown = {t.strip() for t in v.split(",") if t.strip()} - set(EVENT_TYPES)
        if unknown:
            raise ValueError(f"unknown event type(s) {sorted(unknown)}; use {list(EVENT_TYPES)}")
        return v

    @model_validator(mode="after")
    def _check_windows(self) -> MonitorSettings:
        for window, least in (("item_window", "item_min_samples"),
                              ("length_window", "length_min_samples")):
            if getattr(self, least) > getattr(self, window):
                raise ValueError(f"{least} ({getattr(self, least)}) cannot exceed {window} "
                                 f"({getattr(self, window)})")
        return self

    @property
    def event_type_set(self) -> frozenset[str]:
        """Event types that count; empty = all."""
        return frozenset(t.strip() for t in self.event_types.split(",") if t.strip())

    def page_hinkley(self) -> PageHinkleyConfig:
        return PageHinkleyConfig(delta=self.ph_delta, threshold=self.ph_threshold,
                                 min_samples=self.ph_min_samples, direction="down")

    def distribution(self) -> DistributionConfig:
        return DistributionConfig(
            window=self.item_window, min_samples=self.item_min_samples,
            psi_threshold=self.psi_threshold, js_threshold=self.js_threshold,
            oov_threshold=self.oov_threshold)

    def length_shift(self) -> LengthShiftConfig:
        return LengthShiftConfig(window=self.length_window, min_samples=self.length_min_samples,
                                 ks_threshold=self.ks_threshold)
