"""Scorer: one batched transform + forward for many requests, equal to one-by-one."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from features.schema import Feature, Kind, Schema, Tag
from features.workflow import Workflow
from model.checkpoint import load_checkpoint, save_checkpoint
from model.model import ModelConfig, SessionModel
from serving.scorer import RecRequest, Scorer

ITEMS = [f"i{n}" for n in range(12)]


def _event(sid: str, ts: int, item: str) -> dict:
    category = f"c{int(item[1:]) % 3}" if item[1:].isdigit() else "c-new"
    return {"session_id": sid, "ts": ts, "item_id": item, "category": category}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    schema = Schema([
        Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID}, transform={"op": "categorify"}),
        Feature("category", Kind.CATEGORICAL, tags={Tag.ITEM_FEATURE},
                transform={"op": "categorify"}),
    ])
    rows = [_event(f"s{n % 7}", n, ITEMS[n % len(ITEMS)]) for n in range(60)]
    wf = Workflow(schema, max_len=4).fit(pa.Table.from_pylist(rows))
    torch.manual_seed(0)
    model = SessionModel(wf.schema, ModelConfig.from_dict(
        {"block": {"name": "sasrec", "d_model": 16, "n_heads": 2, "max_len": 4}}))
    path = save_checkpoint(tmp_path_factory.mktemp("ck") / "v1", model, wf)
    return Scorer(load_checkpoint(path), "v1")


SESSIONS = {
    "a": [_event("a", 1, "i1"), _event("a", 2, "i2")],
    "b": [_event("b", t, ITEMS[t]) for t in range(1, 8)],  # longer than max_len (4)
    "c": [_event("c", 5, "i3")],
    "new": [_event("new", 9, "never-seen-item")],  # only an OOV item
}


def test_batched_answers_equal_one_by_one(scorer: Scorer) -> None:
    reqs = [RecRequest(s, k=5, exclude_seen=False) for s in ("a", "b", "c", "new")]
    batched = scorer(reqs, SESSIONS)
    for req, got in zip(reqs, batched, strict=True):
        alone = scorer([req], {req.session_id: SESSIONS[req.session_id]})[0]
        assert got.items == alone.items
        assert got.scores == pytest.approx(alone.scores, abs=1e-5)
        assert len(got.items) == 5 and all(i in ITEMS for i in got.items)
        assert got.scores == sorted(got.scores, reverse=True)


def test_exclude_seen_covers_the_whole_stored_session(scorer: Scorer) -> None:
    got = scorer([RecRequest("b", k=20, exclude_seen=True)], SESSIONS)[0]
    stored = {ev["item_id"] for ev in SESSIONS["b"]}  # 7 items, more than max_len
    assert not stored & set(got.items)
    assert len(got.items) == len(ITEMS) - len(stored)  # k capped by what is left


def test_candidates_restrict_the_answer_and_unknown_ones_are_ignored(scorer: Scorer) -> None:
    req = RecRequest("a", k=10, exclude_seen=False, candidates=("i5", "i7", "nope", "i1"))
    got = scorer([req], SESSIONS)[0]
    assert sorted(got.items) == ["i1", "i5", "i7"]
    full = scorer([RecRequest("a", k=12, exclude_seen=False)], SESSIONS)[0]
    order = [i for i in full.items if i in {"i1", "i5", "i7"}]
    assert got.items == order  # same model order, restricted


def test_unknown_or_empty_sessions_are_left_to_the_fallback(scorer: Scorer) -> None:
    got = scorer([RecRequest("missing"), RecRequest("a"), RecRequest("empty")],
                 {"a": SESSIONS["a"], "empty": []})
    assert got[0] is None and got[2] is None and got[1] is not None
