"""Model version directories (``model/checkpoint.py``): write, read, recommend from raw events."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch

from features.batch import SessionBatch
from features.schema import Feature, Kind, Schema, Tag
from features.workflow import Workflow
from model.checkpoint import CHECKPOINT_FORMAT, Checkpoint, load_checkpoint, save_checkpoint
from model.model import ModelConfig, SessionModel

L, N_ITEMS, FIRST = 6, 12, 3
VOCAB = {f"sku-{k}" for k in range(N_ITEMS)}

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors: intra-op threads only add overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def events(shift: int = 0) -> pa.Table:
    """Every item sku-0..sku-11 occurs; ``shift`` changes the counts (so the vocabulary order)."""
    sid, ts, items, cats = [], [], [], []
    for s in range(6):
        for e in range(2 + s % 4):
            k = (s * 5 + e * 7 + shift * e) % N_ITEMS
            sid.append(f"u{s}")
            ts.append(1_000 * e)
            items.append(f"sku-{k}")
            cats.append(f"cat-{k % 3}")
    for k in range(N_ITEMS):
        sid.append("all")
        ts.append(k)
        items.append(f"sku-{k}")
        cats.append(f"cat-{k % 3}")
    return pa.table({"session_id": sid, "ts": ts, "item_id": items, "category": cats})


def schema() -> Schema:
    cat = Kind.CATEGORICAL
    return Schema([
        Feature("item_id", cat, tags={Tag.ITEM_ID}, transform={"op": "categorify"}),
        Feature("category", cat, transform={"op": "categorify"}),
    ])


def raw_sessions() -> pa.Table:
    """Sessions to recommend for, out of order, with an unseen item and a null category."""
    rows = [
        ("a", 3, "sku-1", "cat-1"), ("b", 1, "sku-4", "cat-1"), ("a", 1, "sku-2", "cat-2"),
        ("a", 2, "sku-3", None), ("c", 5, "brand-new", "cat-0"), ("b", 2, "sku-5", "cat-2"),
        ("c", 6, "sku-0", "cat-0"),
    ]
    sid, ts, items, cats = (list(c) for c in zip(*rows, strict=True))
    return pa.table({"session_id": sid, "ts": ts, "item_id": items, "category": cats})


SEEN = {"a": {"sku-1", "sku-2", "sku-3"}, "b": {"sku-4", "sku-5"}, "c": {"sku-0"}}


@pytest.fixture(scope="module")
def workflow() -> Workflow:
    return Workflow(schema(), max_len=L).fit(events())


def make_model(wf: Workflow, *, next_item: dict[str, Any] | None = None,
               item_counts: torch.Tensor | None = None) -> SessionModel:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({
        "block": {"name": "sasrec", "d_model": 8, "n_layers": 1, "n_heads": 2, "max_len": L},
        "next_item": next_item or {},
    })
    return SessionModel(wf.schema, cfg, item_counts=item_counts).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, workflow: Workflow) -> Path:
    model = make_model(workflow)
    path = tmp_path_factory.mktemp("models") / "v1"
    metrics = {"valid": {"recall@10": 0.5, "ndcg@10": 0.25}, "epochs": 3}
    info = {"data_cutoff": "2024-05-01T00:00:00Z", "parent": None}
    return save_checkpoint(path, model, workflow, metrics=metrics, info=info)


@pytest.fixture(scope="module")
def checkpoint(saved: Path) -> Checkpoint:
    return load_checkpoint(saved)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# --------------------------------------------------------------------------- saving


def test_save_refuses_an_existing_directory(tmp_path, workflow):
    target = tmp_path / "v1"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pick a new name"):
        save_checkpoint(target, make_model(workflow), workflow)
    assert leftovers(target) == ["keep.txt"]
    assert leftovers(tmp_path) == ["v1"]  # no temporary directory either


def test_save_with_a_workflow_of_another_schema_leaves_nothing(tmp_path, workflow):
    other = Workflow(schema(), max_len=L).fit(events().slice(0, 5))  # other cardinalities
    parent = tmp_path / "models"
    with pytest.raises(ValueError, match="schema differs"):
        save_checkpoint(parent / "v1", make_model(workflow), other)
    assert not parent.exists()


@pytest.mark.parametrize("bad", [{"metrics": {"loss": float("nan")}},
                                 {"info": {"when": object()}}], ids=["nan-metric", "object-info"])
def test_failed_save_leaves_no_partial_directory(tmp_path, workflow, bad):
    with pytest.raises((ValueError, TypeError)):
        save_checkpoint(tmp_path / "v1", make_model(workflow), workflow, **bad)
    assert leftovers(tmp_path) == []  # neither the version nor its temporary directory


def test_version_directory_describes_itself(saved, workflow):
    assert leftovers(saved) == ["config.json", "metrics.json", "model.safetensors", "workflow"]
    doc = json.loads((saved / "config.json").read_text())
    assert doc["format"] == CHECKPOINT_FORMAT
    assert Schema.from_dict(doc["schema"]) == workflow.schema
    assert doc["info"]["workflow_fingerprint"] == workflow.fingerprint
    assert ModelConfig.from_dict(doc["model"]) == make_model(workflow).config


# --------------------------------------------------------------------------- loading


def test_load_round_trips_weights_metrics_and_info(saved, checkpoint, workflow):
    model = make_model(workflow)
    state = model.state_dict()
    assert set(checkpoint.model.state_dict()) == set(state)
    for name, value in checkpoint.model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert not checkpoint.model.training
    assert checkpoint.metrics == {"valid": {"recall@10": 0.5, "ndcg@10": 0.25}, "epochs": 3}
    assert checkpoint.info["data_cutoff"] == "2024-05-01T00:00:00Z"
    assert checkpoint.info["parent"] is None
    assert checkpoint.info["workflow_fingerprint"] == workflow.fingerprint
    assert checkpoint.info["created"].endswith("Z")
    assert checkpoint.path == saved
    assert checkpoint.workflow.fingerprint == workflow.fingerprint
    batch = workflow.transform_table(raw_sessions())
    assert torch.equal(checkpoint.model.score(batch.features, batch.mask),
                       model.score(batch.features, batch.mask))


def test_load_refuses_a_wrong_format(tmp_path, saved):
    copy = tmp_path / "v1"
    shutil.copytree(saved, copy)
    doc = json.loads((copy / "config.json").read_text())
    doc["format"] = "streamrec.model/0"
    (copy / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"format 'streamrec.model/0' is not"):
        load_checkpoint(copy)
    with pytest.raises(FileNotFoundError, match="not a model version"):
        load_checkpoint(tmp_path)


def test_load_refuses_the_workflow_of_another_model(tmp_path, saved):
    copy = tmp_path / "v1"
    shutil.copytree(saved, copy)
    shutil.rmtree(copy / "workflow")
    other = Workflow(schema(), max_len=L).fit(events(shift=1))  # same sizes, other vocabulary
    assert other.schema == load_checkpoint(saved).model.schema
    other.save(copy / "workflow")
    with pytest.raises(ValueError, match="does not belong"):
        load_checkpoint(copy)


def test_saved_without_a_workflow_cannot_recommend(tmp_path, workflow):
    path = save_checkpoint(tmp_path / "bare", make_model(workflow))
    loaded = load_checkpoint(path)
    assert loaded.workflow is None
    with pytest.raises(ValueError, match="without a workflow"):
        loaded.recommend_table(raw_sessions())


def test_popularity_sampler_model_saves_and_loads(tmp_path, workflow):
    counts = torch.arange(FIRST + N_ITEMS, dtype=torch.float32)
    model = make_model(workflow, item_counts=counts,
                       next_item={"loss": "sampled", "sampler": "popularity", "num_negatives": 3})
    model.train()
    batch = workflow.transform_table(events())
    model(batch.features, batch.mask, generator=torch.Generator().manual_seed(0)).loss.backward()
    model.eval()
    path = save_checkpoint(tmp_path / "pop", model, workflow)
    loaded = load_checkpoint(path)
    assert loaded.config.next_item.sampler == "popularity"
    assert loaded.model.next_item.sampler_probs is not None
    assert torch.equal(loaded.model.score(batch.features, batch.mask),
                       model.score(batch.features, batch.mask))
    assert all(set(r.items) <= VOCAB for r in loaded.recommend_table(raw_sessions(), k=3))


# --------------------------------------------------------------------------- recommending


@pytest.mark.parametrize("k", [1, 4, N_ITEMS, N_ITEMS + 5])
def test_recommend_returns_original_item_ids(checkpoint, workflow, k):
    sessions = SessionBatch.from_table(raw_sessions())
    recs = checkpoint.recommend(sessions, k=k)
    assert [r.session_id for r in recs] == ["a", "b", "c"]
    batch = workflow.transform(sessions)
    top = checkpoint.model.predict(batch.features, batch.mask, k=k)
    vocab = workflow.ops["item_id"].vocabulary.to_pylist()
    for r, ids, scores in zip(recs, top.ids.tolist(), top.scores.tolist(), strict=True):
        assert len(r.items) == len(r.scores) == min(k, N_ITEMS)
        assert r.items == [vocab[i - FIRST] for i in ids]  # the model's top-k, in order
        assert r.scores == pytest.approx(scores)
        assert None not in r.items and set(r.items) <= VOCAB
        assert len(set(r.items)) == len(r.items)


@pytest.mark.parametrize("k", [3, N_ITEMS])
def test_recommend_exclude_seen(checkpoint, k):
    recs = checkpoint.recommend(SessionBatch.from_table(raw_sessions()), k=k, exclude_seen=True)
    for r in recs:
        assert not set(r.items) & SEEN[r.session_id]
        assert None not in r.items and set(r.items) <= VOCAB
        assert len(r.items) == min(k, N_ITEMS - len(SEEN[r.session_id]))  # fewer left: fewer
        assert r.scores == sorted(r.scores, reverse=True)
    plain = checkpoint.recommend(SessionBatch.from_table(raw_sessions()), k=N_ITEMS)
    for with_seen, without in zip(plain, recs, strict=True):  # the same order, seen ones removed
        unseen = [i for i in with_seen.items if i not in SEEN[with_seen.session_id]]
        assert unseen[:k] == without.items


def test_recommend_table_equals_recommend(checkpoint):
    table = raw_sessions()
    for exclude_seen in (False, True):
        a = checkpoint.recommend_table(table, k=5, exclude_seen=exclude_seen)
        b = checkpoint.recommend(SessionBatch.from_table(table), k=5, exclude_seen=exclude_seen)
        assert a == b


def test_recommend_keeps_only_the_last_max_len_events(checkpoint):
    long = pa.table({"session_id": ["z"] * (L + 3), "ts": list(range(L + 3)),
                     "item_id": [f"sku-{k}" for k in range(L + 3)]})
    tail = long.slice(3)
    assert checkpoint.recommend_table(long, k=4) == checkpoint.recommend_table(tail, k=4)


@pytest.mark.gpu
@cuda
def test_recommend_on_gpu_matches_cpu(saved, checkpoint):
    on_gpu = load_checkpoint(saved, device="cuda")
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    table = raw_sessions()
    gpu_recs = on_gpu.recommend_table(table, k=5, exclude_seen=True)
    cpu_recs = checkpoint.recommend_table(table, k=5, exclude_seen=True)
    for g, c in zip(gpu_recs, cpu_recs, strict=True):
        assert g.session_id == c.session_id
        assert g.scores == pytest.approx(c.scores, abs=1e-4)
        assert set(g.items) <= VOCAB
