"""Helpers of the serving tests: tiny model versions, stored sessions, a live uvicorn server."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from features.schema import Feature, Kind, Schema, Tag
from features.workflow import Workflow
from ingest.events import ClickEvent
from ingest.store import Positioned, SessionStore, StoreConfig
from model.checkpoint import WEIGHTS_FILE, save_checkpoint
from model.model import ModelConfig, SessionModel
from model.registry import ModelRegistry
from serving.app import create_app
from serving.settings import ServingSettings

ITEMS = [f"i{n}" for n in range(30)]
T0 = 1_704_067_200_000


def category(item: str) -> str:
    return f"c{int(item[1:]) % 4}"


def _workflow() -> Workflow:
    schema = Schema([
        Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID}, transform={"op": "categorify"}),
        Feature("category", Kind.CATEGORICAL, tags={Tag.ITEM_FEATURE},
                transform={"op": "categorify"}),
    ])
    rows = [{"session_id": f"s{n % 9}", "ts": T0 + n, "item_id": ITEMS[n % len(ITEMS)],
             "category": category(ITEMS[n % len(ITEMS)])} for n in range(120)]
    return Workflow(schema, max_len=6).fit(pa.Table.from_pylist(rows))


def save_version(directory: Path, seed: int) -> Path:
    """A tiny untrained SASRec version (deterministic under ``seed``)."""
    wf = _workflow()
    torch.manual_seed(seed)
    model = SessionModel(wf.schema, ModelConfig.from_dict(
        {"block": {"name": "sasrec", "d_model": 16, "n_heads": 2, "n_layers": 1, "max_len": 6}}))
    return save_checkpoint(directory, model, wf)


def publish(registry: ModelRegistry, tmp: Path, name: str, seed: int,
            promote: bool = True) -> str:
    registry.publish(save_version(tmp / f"src-{name}", seed), name=name)
    if promote:
        registry.promote(name)
    return name


def publish_corrupt(registry: ModelRegistry, tmp: Path, name: str, promote: bool = True) -> str:
    """A version whose weights file is truncated (a crashed upload)."""
    src = save_version(tmp / f"src-{name}", seed=99)
    weights = src / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    registry.publish(src, name=name)
    if promote:
        registry.promote(name)
    return name


def session_events(n_sessions: int, *, seed: int = 0, prefix: str = "s") -> dict[str, list[str]]:
    """``{session_id: [item, ...]}`` of 1 to 8 clicks each, deterministic."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in range(n_sessions):
        n = int(torch.randint(1, 9, (1,), generator=g))
        idx = torch.randint(0, len(ITEMS), (n,), generator=g).tolist()
        out[f"{prefix}{s}"] = [ITEMS[i] for i in idx]
    return out


def fill_store(store: SessionStore, sessions: dict[str, list[str]]) -> None:
    """Apply the sessions' clicks as the ingest worker would (popularity included)."""
    batch, offset = [], 0
    for sid, items in sessions.items():
        for j, item in enumerate(items):
            ev = ClickEvent(event_id=f"{sid}-{j}", session_id=sid, item_id=item, ts=T0 + offset,
                            features={"category": category(item)})
            batch.append(Positioned(ev, 0, offset))
            offset += 1
    store.apply(batch)


def fresh_store(client: Any) -> SessionStore:
    return SessionStore(client, StoreConfig(prefix=f"t{uuid.uuid4().hex[:8]}"))


class LiveServer:
    """A real uvicorn server on a free port in a background thread."""

    def __init__(self, app: Any):
        self.app = app
        # uvicorn binds the socket itself (port 0 = a free one): a socket handed in
        # through ``sockets=`` misses TCP_NODELAY and every keep-alive request
        # then waits ~40 ms for a delayed ACK.
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
            timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0
        self.url = ""

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)


@contextlib.contextmanager
def serve(settings: ServingSettings, **kw: Any) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings, **kw)) as server:
        yield server


def settings(**kw: Any) -> ServingSettings:
    """Test settings: fast polling, small limits, an admin token."""
    base: dict[str, Any] = {"registry_poll_s": 0.2, "popularity_refresh_s": 0.3,
                            "admin_token": "s3cret", "max_wait_ms": 3.0, "max_batch_size": 64,
                            "redis_retry_s": 0.3, "latency_budget_ms": 5000.0}
    return ServingSettings(**(base | kw))


def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample of ``GET /metrics`` (None when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def body(session_id: str, **kw: Any) -> dict[str, Any]:
    return {"session_id": session_id, **kw}
