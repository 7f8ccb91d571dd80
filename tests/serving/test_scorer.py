"""Scorer: one batched transform + forward for many requests, equal to one-by-one."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest
import torch

from features.batch import SessionBatch
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


# --------------------------------------------------------------------------- pre-ranking


def _preranker(num_items: int):
    from model.inttower import FieldConfig, TowerConfig, TwoTowerConfig, build_two_tower
    from model.preranker import PreRanker, build_index

    torch.manual_seed(1)
    user = TowerConfig((FieldConfig("history", "sequence", num_items),), hidden=(8,))
    item = TowerConfig((FieldConfig("item_id", "sparse", num_items),), hidden=(8,))
    tt = build_two_tower(TwoTowerConfig(user=user, item=item, kind="inttower", head_dim=4,
                                        user_heads=2, item_heads=2)).eval()
    ids = torch.arange(0, num_items)  # every id; the scorer drops the special ones
    return PreRanker(tt, build_index(tt, {"item_id": ids}, ids))


def test_a_preranker_with_the_whole_catalogue_changes_nothing(scorer: Scorer) -> None:
    pre = Scorer(scorer.checkpoint, "v1", preranker=_preranker(scorer.model.num_items),
                 top_n=scorer.model.num_items)
    reqs = [RecRequest(s, k=6, exclude_seen=e) for s in ("a", "b", "c") for e in (False, True)]
    for full, narrowed in zip(scorer(reqs, SESSIONS), pre(reqs, SESSIONS), strict=True):
        assert narrowed.items == full.items
        assert narrowed.scores == pytest.approx(full.scores, abs=1e-5)


def test_with_top_n_the_answer_comes_from_the_preranker_candidates(scorer: Scorer) -> None:
    pr = _preranker(scorer.model.num_items)
    pre = Scorer(scorer.checkpoint, "v1", preranker=pr, top_n=4)
    got = pre([RecRequest("a", k=10, exclude_seen=False)], SESSIONS)[0]
    fb = scorer.workflow.transform(
        SessionBatch.from_sessions({"a": SESSIONS["a"]}, list(scorer.workflow.event_columns)))
    cand = pr.session_top_n(fb.features["item_id"], fb.mask, 4).ids[0]
    allowed = set(scorer._item_op.decode(cand[cand >= scorer.model.first_item_id]).to_pylist())
    assert got.items and set(got.items) <= allowed and len(got.items) <= 4
    full = scorer([RecRequest("a", k=12, exclude_seen=False)], SESSIONS)[0]
    assert got.items == [i for i in full.items if i in set(got.items)]  # scorer's order


def test_a_version_without_its_preranker_is_not_served(tmp_path, scorer: Scorer) -> None:
    from model.preranker import PreRankConfig, save_preranker
    from model.registry import ModelRegistry
    from serving.models import ModelHolder

    reg = ModelRegistry(tmp_path)
    reg.promote(reg.publish(scorer.checkpoint.path, name="v1"))
    holder = ModelHolder(reg, pre_ranking=PreRankConfig(pre_ranker="inttower", top_n=3))
    assert holder.check() is None  # refused: no preranker/ in the version
    assert ModelHolder(reg).check() == "v1"
    # The same version with its pre-ranker inside is served through it.
    with_pre = tmp_path / "with-pre"
    shutil.copytree(scorer.checkpoint.path, with_pre)
    save_preranker(with_pre / "preranker", _preranker(scorer.model.num_items))
    reg.promote(reg.publish(with_pre, name="v2"))
    assert holder.check() == "v2"
    assert holder.current.scorer.preranker is not None and holder.current.scorer.top_n == 3
