"""Settings of the retrainer, read from ``STREAMREC_RETRAIN_*`` env vars (section ``[retrain]``).

Redis comes from the ``[redis]`` section (its URL, TLS and auth); this
section holds what only the retrainer needs. Every field is validated when
the settings are built, so a bad value stops ``streamrec retrain`` at start
with a message naming the variable. ``docs/retrain.md`` explains each step.

>>> s = RetrainSettings(window_hours=6, heldout_share=0.2)
>>> s.window_hours, s.metric, s.notify_channel
(6.0, 'ndcg@10', 'streamrec:models')
>>> try:
...     RetrainSettings(schedule="every hour")
... except ValueError as e:
...     print(str(e).splitlines()[2].split(";")[0].strip())
Value error, not a cron expression: 'every hour'
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from croniter import croniter
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.drift import ALARM_CHANNEL

__all__ = ["ALARM_CHANNEL", "NOTIFY_CHANNEL", "RetrainSettings"]

#: Same default as ``STREAMREC_SERVING_NOTIFY_CHANNEL``: servers swap when a version is
#: announced here (retrain must not import serving, so the name is repeated).
NOTIFY_CHANNEL = "streamrec:models"


class RetrainSettings(BaseSettings):
    """The retrainer (`streamrec retrain`): window, replay, fine-tuning, promotion, schedule."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_RETRAIN_", frozen=True, extra="forbid")

    archive_root: str = Field(
        ".streamrec/archive", min_length=1,
        description="event archive to read windows from: directory or fsspec URL",
    )
    models_root: str = Field(
        "models", min_length=1,
        description="model registry (versions/ + CURRENT), as STREAMREC_SERVING_MODELS_ROOT",
    )
    state_dir: Path = Field(
        Path(".streamrec/retrain"),
        description="local scratch space, the file lock and run summaries (runs/*.json)",
    )
    window_hours: float = Field(24.0, gt=0, le=24 * 365, description="hours of events to train on")
    lag_s: float = Field(
        120.0, ge=0, le=24 * 3600,
        description="the window ends this long before now (events not archived yet)",
    )
    heldout_share: float = Field(
        0.1, gt=0, lt=1,
        description="most recent share of the window (by time) that judges challenger vs champion",
    )
    valid_share: float = Field(
        0.1, ge=0, lt=1,
        description="share of the window before the held-out slice that picks the epoch "
        "(0 = train every epoch, no selection)",
    )
    replay_hours: float = Field(
        24.0, ge=0, le=24 * 365,
        description="older events (before the window) that replay sessions are sampled from",
    )
    replay_share: float = Field(
        0.2, ge=0, le=10,
        description="replay sessions added, as a share of the window's training sessions",
    )
    min_sessions: int = Field(
        50, ge=1, description="fewer training sessions in the window: the run is skipped"
    )
    metric: str = Field("ndcg@10", description="held-out metric that decides promotion")
    margin: float = Field(
        0.0, ge=0, le=1,
        description="promote when challenger >= champion - margin (absolute, on metric)",
    )
    epochs: int = Field(3, ge=1, le=1000, description="fine-tuning epochs (at most)")
    lr: float = Field(5e-4, gt=0, le=1, description="fine-tuning learning rate (AdamW)")
    batch_size: int = Field(128, ge=1, le=65_536, description="sessions per step")
    new_item_noise: float = Field(
        0.1, ge=0, le=10,
        description="new embedding rows = mean row + noise * per-dimension std (model/growth.py)",
    )
    bootstrap: bool = Field(
        True,
        description="no champion yet: train a first model from scratch on the window "
        "(schema_file, model_config_file, bootstrap_epochs, bootstrap_lr) and promote it",
    )
    schema_file: str | None = Field(
        None,
        description="feature schema JSON of a bootstrapped model (features.schema.Schema.save); "
        "default: item_id and category, both categorical",
    )
    model_config_file: str | None = Field(
        None,
        description="model.model.ModelConfig JSON of a bootstrapped model; default: a small "
        "SASRec (d_model 64, 2 layers, max_len 20)",
    )
    bootstrap_epochs: int = Field(
        10, ge=1, le=1000, description="epochs (at most) of a bootstrap run"
    )
    bootstrap_lr: float = Field(
        3e-3, gt=0, le=1, description="learning rate of a bootstrap run (AdamW)"
    )
    seed: int = Field(0, ge=0, description="replay sampling, new rows, shuffling")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where to fine-tune: cpu, cuda, or auto (cuda when available)"
    )
    progress: bool = Field(True, description="progress bars on stderr")
    schedule: str = Field(
        "0 * * * *", description="cron expression (UTC) of `streamrec retrain --schedule`"
    )
    cooldown_s: float = Field(
        3600.0, ge=0, le=7 * 24 * 3600,
        description="a drift alarm within this long of the last alarm-triggered run is ignored",
    )
    alarm_trigger: bool = Field(
        True, description="with --schedule and Redis configured, drift alarms start runs"
    )
    notify_channel: str = Field(
        NOTIFY_CHANNEL, min_length=1,
        description="Redis channel told the new version on promotion (serving listens)",
    )
    alarm_channel: str = Field(
        ALARM_CHANNEL, min_length=1, description="Redis channel of the drift monitor's alarms"
    )
    lock: Literal["auto", "file", "redis"] = Field(
        "auto",
        description="single-flight lock across processes: redis, file (state_dir/lock), "
        "or auto (redis when configured, else file)",
    )
    lock_ttl_s: float = Field(
        600.0, ge=10, le=24 * 3600,
        description="Redis lock expiry; renewed every third of it while a run holds it",
    )
    metrics_port: int = Field(
        9404, ge=0, le=65535, description="Prometheus port of --schedule (0 = any free port)"
    )
    pushgateway: str | None = Field(
        None, description="Prometheus Pushgateway host:port; --once pushes its run metrics there"
    )

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, v: str) -> str:
        name, _, k = v.partition("@")
        if name not in {"ndcg", "hr", "recall", "mrr", "map"} or not k.isdigit() or int(k) < 1:
            raise ValueError(f"metric must look like 'ndcg@10' or 'hr@20', got {v!r}")
        return v

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, v: str) -> str:
        v = v.strip()
        if len(v.split()) != 5 or not croniter.is_valid(v):
            raise ValueError(f"not a cron expression: {v!r}; use five fields, e.g. "
                             "'*/30 * * * *' (minute hour day month weekday, UTC)")
        return v

    @model_validator(mode="after")
    def _check_shares(self) -> RetrainSettings:
        if self.heldout_share + self.valid_share >= 0.9:
            raise ValueError(
                f"heldout_share + valid_share = {self.heldout_share + self.valid_share} leaves "
                "under 10% of the window to train on; lower them or widen window_hours"
            )
        return self

    @property
    def k(self) -> int:
        """The cut-off of :attr:`metric`."""
        return int(self.metric.partition("@")[2])
