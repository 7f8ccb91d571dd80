"""Settings: env vars, config file precedence, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.settings import KafkaSettings, RedisSettings
from streamrec.settings import (
    SECTIONS,
    SettingsError,
    StackSettings,
    apply_config_file,
    check_environment,
    load,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("STREAMREC_"):
            monkeypatch.delenv(k)


def test_env_vars_fill_typed_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", "broker-1:9092,broker-2:9092")
    monkeypatch.setenv("STREAMREC_KAFKA_PARTITIONS", "12")
    monkeypatch.setenv("STREAMREC_KAFKA_CLIENT", "kafka-python")
    monkeypatch.setenv("STREAMREC_REDIS_URL", "rediss://cache:6380/0")
    k, r = load(KafkaSettings), load(RedisSettings)
    assert k.bootstrap == "broker-1:9092,broker-2:9092" and k.partitions == 12
    assert k.client == "kafka-python" and r.url == "rediss://cache:6380/0"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("STREAMREC_KAFKA_BOOTSTRAP", "localhost", "host:port"),
        ("STREAMREC_KAFKA_PARTITIONS", "0", "greater than or equal to 1"),
        ("STREAMREC_KAFKA_CLIENT", "librdkafka", "'confluent' or 'kafka-python'"),
        ("STREAMREC_KAFKA_HEARTBEAT_INTERVAL_MS", "5000", "at most a third"),
        ("STREAMREC_REDIS_URL", "http://x:1", "redis://"),
    ],
)
def test_invalid_values_name_the_env_var(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    monkeypatch.setenv(var, value)
    cls = KafkaSettings if "KAFKA" in var else RedisSettings
    with pytest.raises(SettingsError) as info:
        load(cls)
    assert var in str(info.value) and message in str(info.value)


def test_config_file_is_overridden_by_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "streamrec.toml"
    cfg.write_text(
        '[kafka]\nbootstrap = "file:9092"\npartitions = 3\n'
        '[stack]\nstartup_timeout_s = 12.5\n'
    )
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", "env:9092")
    # Registered with monkeypatch so the exported variables are removed afterwards.
    monkeypatch.setenv("STREAMREC_KAFKA_PARTITIONS", "")
    monkeypatch.setenv("STREAMREC_STACK_STARTUP_TIMEOUT_S", "")
    monkeypatch.delenv("STREAMREC_KAFKA_PARTITIONS")
    monkeypatch.delenv("STREAMREC_STACK_STARTUP_TIMEOUT_S")
    exported = apply_config_file(cfg)
    assert "STREAMREC_KAFKA_BOOTSTRAP" not in exported
    k, s = load(KafkaSettings), load(StackSettings)
    assert k.bootstrap == "env:9092"  # env wins
    assert k.partitions == 3 and s.startup_timeout_s == 12.5  # file fills the rest


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[kafak]\nbootstrap = 'x:1'\n", "unknown section [kafak]"),
        ("[kafka]\nbootstrp = 'x:1'\n", "unknown key 'bootstrp'"),
        ("[kafka\n", "not valid TOML"),
    ],
)
def test_bad_config_file_is_rejected(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        apply_config_file(cfg, environ={})


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        apply_config_file(tmp_path / "nope.toml", environ={})


def test_unknown_env_var_is_rejected_with_a_hint() -> None:
    with pytest.raises(SettingsError, match="did you mean STREAMREC_KAFKA_BOOTSTRAP"):
        check_environment({"STREAMREC_KAFKA_BOOTSTRAPP": "x:1"})
    check_environment({"STREAMREC_KAFKA_BOOTSTRAP": "x:1", "OTHER": "1"})  # known: no error


def test_every_section_builds_from_defaults() -> None:
    for cls in SECTIONS.values():
        assert load(cls) is not None


def test_docs_list_every_setting() -> None:
    from streamrec.settings import settings_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    assert doc.read_text() == settings_markdown(), (
        "docs/settings.md is stale: run `streamrec config --markdown > docs/settings.md`"
    )
