"""`streamrec models`: publish, list, promote against a real registry dir and a real Redis."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import redis
import torch
from click.testing import CliRunner

from features.schema import Feature, Kind, Schema, Tag
from features.workflow import Workflow
from model.checkpoint import save_checkpoint
from model.model import ModelConfig, SessionModel
from model.registry import ModelRegistry
from streamrec.cli import cli
from streamrec.stack import LocalStack


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    schema = Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                             transform={"op": "categorify"})])
    wf = Workflow(schema, max_len=4).fit(
        pa.table({"session_id": ["a", "a"], "ts": [1, 2], "item_id": ["x", "y"]}))
    torch.manual_seed(0)
    model = SessionModel(wf.schema, ModelConfig.from_dict(
        {"block": {"name": "gru", "d_model": 8, "n_layers": 1, "max_len": 4}}))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "v", model, wf)


def test_publish_promote_list_and_servers_are_notified(
    tmp_path: Path, saved: Path, stack: LocalStack, redis_client: redis.Redis
) -> None:
    root = tmp_path / "models"
    channel = f"test-models-{time.monotonic_ns()}"
    env = {"STREAMREC_SERVING_MODELS_ROOT": str(root), "STREAMREC_REDIS_URL": stack.redis.url,
           "STREAMREC_SERVING_NOTIFY_CHANNEL": channel}
    heard: list[str] = []
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.2)
            if msg:
                heard.append(msg["data"].decode())

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    try:
        runner = CliRunner()
        r = runner.invoke(cli, ["models", "publish", str(saved), "--name", "v1"], env=env)
        assert r.exit_code == 0, r.output
        assert ModelRegistry(root).current() is None  # published, not promoted
        r = runner.invoke(cli, ["models", "publish", str(saved), "--name", "v2", "--promote"],
                          env=env)
        assert r.exit_code == 0 and "notified 1 server" in r.output, r.output
        r = runner.invoke(cli, ["models", "list"], env=env)
        assert r.output.splitlines() == ["  v1", "* v2"]
        r = runner.invoke(cli, ["models", "promote", "v1"], env=env)
        assert r.exit_code == 0 and ModelRegistry(root).current() == "v1"
        deadline = time.monotonic() + 5
        while len(heard) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heard == ["v2", "v1"]
    finally:
        stop.set()
        t.join(2)
        pubsub.close()


def test_unknown_version_and_duplicate_name_are_clear_errors(tmp_path: Path, saved: Path) -> None:
    env = {"STREAMREC_SERVING_MODELS_ROOT": str(tmp_path)}
    runner = CliRunner()
    assert runner.invoke(cli, ["models", "publish", str(saved), "--name", "a"], env=env).exit_code == 0
    r = runner.invoke(cli, ["models", "publish", str(saved), "--name", "a"], env=env)
    assert r.exit_code != 0 and "immutable" in r.output
    r = runner.invoke(cli, ["models", "promote", "nope"], env=env)
    assert r.exit_code != 0 and "no version 'nope'" in r.output

