"""Model registry: versions, champion pointer, local and fsspec (memory://) roots."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from features.schema import Feature, Kind, Schema, Tag
from features.workflow import Workflow
from model.checkpoint import save_checkpoint
from model.model import ModelConfig, SessionModel
from model.registry import ModelRegistry, RegistryError, new_version_name


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    schema = Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                             transform={"op": "categorify"})])
    events = pa.table({"session_id": ["a", "a", "b"], "ts": [1, 2, 3],
                       "item_id": ["x", "y", "z"]})
    wf = Workflow(schema, max_len=4).fit(events)
    torch.manual_seed(0)
    model = SessionModel(wf.schema, ModelConfig.from_dict(
        {"block": {"name": "gru", "d_model": 8, "n_layers": 1, "max_len": 4}}))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "v", model, wf,
                           metrics={"ndcg@10": 0.5})


def _scores(ck) -> torch.Tensor:
    ids = torch.tensor([[3, 4, 0, 0]])
    return ck.model.score({"item_id": ids}, ids > 0)


def test_publish_promote_load_on_a_local_root(tmp_path: Path, saved: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    assert reg.current() is None and reg.versions() == []
    v1 = reg.publish(saved, name="20260101T000000Z-aaaa")
    v2 = reg.publish(saved)
    assert reg.versions() == sorted([v1, v2]) and reg.current() is None  # published, not live
    reg.promote(v1)
    assert reg.current() == v1
    reg.promote(v2)
    assert reg.current() == v2
    ck = reg.load(v2)
    assert ck.metrics == {"ndcg@10": 0.5}
    assert not list((tmp_path / "models").glob(".*"))  # no temporary leftovers


def test_versions_are_immutable_and_names_checked(tmp_path: Path, saved: Path) -> None:
    reg = ModelRegistry(tmp_path)
    name = reg.publish(saved, name="v1")
    with pytest.raises(RegistryError, match="immutable"):
        reg.publish(saved, name=name)
    with pytest.raises(RegistryError, match="version name"):
        reg.publish(saved, name="../escape")
    with pytest.raises(RegistryError, match="no version 'v9'"):
        reg.promote("v9")
    with pytest.raises(RegistryError, match="not a saved model version"):
        reg.publish(tmp_path)


def test_a_half_copied_version_is_not_listed(tmp_path: Path, saved: Path) -> None:
    reg = ModelRegistry(tmp_path)
    (tmp_path / "versions" / "broken").mkdir(parents=True)  # no config.json: not a version
    (tmp_path / "versions" / "broken" / "model.safetensors").write_bytes(b"x")
    assert reg.versions() == []
    with pytest.raises(RegistryError):
        reg.promote("broken")


def test_fsspec_memory_root_round_trips_a_version(tmp_path: Path, saved: Path) -> None:
    root = f"memory://streamrec-test-{uuid.uuid4().hex}/models"
    reg = ModelRegistry(root, cache_dir=tmp_path / "cache")
    name = reg.publish(saved)
    reg.promote(name)
    other = ModelRegistry(root, cache_dir=tmp_path / "cache2")  # another server
    assert other.current() == name and other.versions() == [name]
    local = ModelRegistry(tmp_path / "local")
    local.promote(local.publish(saved, name="ref"))
    assert torch.equal(_scores(other.load(name)), _scores(local.load("ref")))
    assert (tmp_path / "cache2" / name / "workflow").is_dir()


def test_version_names_sort_by_time() -> None:
    assert new_version_name(0.0) < new_version_name(86400.0)
