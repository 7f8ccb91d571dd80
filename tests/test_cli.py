"""The CLI: every command has --help; simulate / replay reach a real broker;
up / status / down manage real server processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import shared_data_dir
from ingest_helpers import read_all

from ingest.events import ClickEvent, EventValidator
from ingest.kafka import Record
from streamrec.cli import cli
from streamrec.stack import LocalStack

EXTERNAL = bool(os.environ.get("STREAMREC_REDIS_URL") or os.environ.get("STREAMREC_KAFKA_BOOTSTRAP"))


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out.extend(_all_commands(cmd, (*prefix, name)))
        else:
            out.append((*prefix, name))
    return out


@pytest.mark.parametrize("path", _all_commands(cli), ids=lambda p: " ".join(p) or "streamrec")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def _env_for(stack: LocalStack, topic: str, client: str = "confluent") -> dict[str, str]:
    return {**stack.env(), "STREAMREC_KAFKA_EVENTS_TOPIC": topic,
            "STREAMREC_KAFKA_PARTITIONS": "3", "STREAMREC_KAFKA_CLIENT": client}


def _valid(records: list[Record]) -> list[ClickEvent]:
    good, bad = EventValidator().decode_batch([r.value for r in records], [r.key for r in records])
    assert bad == []
    return good


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_simulate_produces_valid_events_to_kafka(stack: LocalStack, topic: str, client: str) -> None:
    result = CliRunner().invoke(
        cli, ["simulate", "--events", "800", "--seed", "3"], env=_env_for(stack, topic, client)
    )
    assert result.exit_code == 0, result.output
    assert "produced 800 events" in result.output
    events = _valid(read_all(stack.kafka, topic, 800))
    assert len(events) == 800 and len({e.event_id for e in events}) == 800
    assert all("category" in e.features and "price" in e.features for e in events)


def test_simulate_writes_parquet(tmp_path: Path) -> None:
    out = tmp_path / "sim.parquet"
    result = CliRunner().invoke(cli, ["simulate", "--events", "1500", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows == 1500
    assert {"event_id", "session_id", "item_id", "ts", "category", "price"} <= set(table.column_names)


def test_simulate_rejects_bad_config_with_a_clear_message() -> None:
    result = CliRunner().invoke(cli, ["simulate", "--events", "10", "--items", "5", "--out", "x.pq"])
    assert result.exit_code != 0
    assert "n_items" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(not (shared_data_dir() / "ml-100k").is_dir(), reason="../shared/data/ml-100k absent")
def test_replay_sends_movielens_in_event_time_order(stack: LocalStack, topic: str) -> None:
    env = {**_env_for(stack, topic), "STREAMREC_DATA_DIR": str(shared_data_dir())}
    result = CliRunner().invoke(cli, ["replay", "ml-100k", "--limit", "500"], env=env)
    assert result.exit_code == 0, result.output
    records = read_all(stack.kafka, topic, 500)
    events = _valid(records)
    assert len(events) == 500
    # Within each partition the log is in event-time order.
    by_part: dict[int, list[int]] = {}
    for r, e in zip(records, events, strict=True):
        by_part.setdefault(r.partition, []).append(e.ts)
    assert all(ts == sorted(ts) for ts in by_part.values())


def test_without_kafka_the_error_says_what_to_do(tmp_path: Path) -> None:
    env = {k: "" for k in os.environ if k.startswith("STREAMREC_")}
    env["STREAMREC_STACK_STATE_DIR"] = str(tmp_path)
    result = CliRunner().invoke(cli, ["simulate", "--events", "5"], env=env)
    assert result.exit_code != 0 and "streamrec up" in result.output


def test_unknown_setting_fails_fast() -> None:
    result = CliRunner().invoke(cli, ["status"], env={"STREAMREC_REDIS_ULR": "redis://x:1"})
    assert result.exit_code != 0 and "did you mean STREAMREC_REDIS_URL" in result.output


@pytest.mark.skipif(EXTERNAL, reason="starts its own servers")
def test_up_status_down_manage_real_processes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env["STREAMREC_STACK_STATE_DIR"] = str(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamrec.cli", *args], env=env, capture_output=True,
            text=True, timeout=120,
        )

    up = run("up")
    try:
        assert up.returncode == 0, up.stderr
        assert "export STREAMREC_KAFKA_BOOTSTRAP=127.0.0.1:" in up.stdout
        state = json.loads((tmp_path / "stack.json").read_text())
        pids = [s["pid"] for s in state["servers"].values()]
        assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)

        assert "already running" in run("up").stdout  # idempotent
        status = run("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "redis" in status.stdout and "streamrec.events" in status.stdout
    finally:
        down = run("down")  # also when an assertion above failed: no orphans
    assert down.returncode == 0 and "stopped" in down.stdout
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert run("status").returncode == 1  # nothing answers any more
