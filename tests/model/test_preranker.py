"""model/preranker.py: exact chunked top-N, session adapter, re-ranking, serving path, versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from features.schema import Feature, Kind, Schema, Tag
from model.config_base import ConfigError
from model.inttower import (
    FieldConfig,
    TowerConfig,
    TwoTowerConfig,
    build_two_tower,
    catalogue_scores,
    index_layout,
)
from model.model import ModelConfig, SessionModel
from model.preranker import (
    ItemIndex,
    PreRankConfig,
    PreRanker,
    build_index,
    candidate_scores,
    exact_top_n,
    load_preranker,
    recommend,
    rerank,
    save_preranker,
    session_user_features,
)

CARD = 40  # item ids 0..39; real items 3..39
FIRST = 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def two_tower(kind: str = "inttower"):
    torch.manual_seed(0)
    user = TowerConfig((FieldConfig("age", "dense"), FieldConfig("gender", "sparse", 4),
                        FieldConfig("history", "sequence", CARD)), hidden=(8, 6))
    item = TowerConfig((FieldConfig("item_id", "sparse", CARD),
                        FieldConfig("topic", "sparse", 8)), hidden=(8, 6))
    return build_two_tower(TwoTowerConfig(user=user, item=item, kind=kind, head_dim=4,
                                          user_heads=2, item_heads=3)).eval()


def catalogue() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ids = torch.arange(FIRST, CARD)
    return {"item_id": ids, "topic": 3 + ids % 5}, ids


def preranker(kind: str = "inttower", id_map: torch.Tensor | None = None) -> PreRanker:
    model = two_tower(kind)
    feats, ids = catalogue()
    return PreRanker(model, build_index(model, feats, ids, batch_size=7), id_map=id_map)


def session_model() -> SessionModel:
    torch.manual_seed(0)
    schema = Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                             transform={"op": "categorify"}, cardinality=CARD)])
    cfg = ModelConfig.from_dict({"block": {"name": "sasrec", "d_model": 8, "n_heads": 1,
                                           "max_len": 6}, "masking": "clm",
                                 "next_item": {"bias": True, "temperature": 0.5}})
    model = SessionModel(schema, cfg).eval()
    with torch.no_grad():
        model.next_item.output_bias.normal_(generator=gen(9))
    return model


def sessions() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[5, 9, 12, 0, 0, 0], [30, 31, 4, 7, 8, 39], [6, 0, 0, 0, 0, 0]])
    return ids, ids != 0


# --------------------------------------------------------------------------- exact search


@pytest.mark.parametrize("kind", ["inttower", "dssm"])
def test_top_n_equals_brute_force_exact_scoring(kind: str) -> None:
    pre = preranker(kind)
    ids, mask = sessions()
    feats = pre.user_features(ids, mask)
    cand = pre.top_n(feats, n=10, chunk_size=1000)
    with torch.no_grad():
        item_heads = index_layout(pre.model.item_heads(catalogue()[0]))
        full = catalogue_scores(pre.model.user_heads(feats), item_heads)
    top = full.topk(10, dim=1)
    assert torch.equal(cand.ids, catalogue()[1][top.indices])
    torch.testing.assert_close(cand.scores, top.values)
    # the probability order is the score order (positive learned scale)
    probs = torch.sigmoid(pre.model.calibrate(cand.scores))
    assert bool((probs.diff(dim=1) <= 0).all())


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 36, 37, 1000])
def test_chunking_gives_the_unchunked_result(chunk_size: int) -> None:
    u, v = torch.randn(4, 2, 2, 5, generator=gen(0)), torch.randn(2, 3, 5, 37, generator=gen(1))
    ref_vals, ref_pos = exact_top_n(u, v, 9, chunk_size=37)
    vals, pos = exact_top_n(u, v, 9, chunk_size=chunk_size)
    assert torch.equal(pos, ref_pos)
    torch.testing.assert_close(vals, ref_vals)


def test_n_larger_than_the_catalogue_returns_every_item_once() -> None:
    pre = preranker()
    ids, mask = sessions()
    cand = pre.session_top_n(ids, mask, n=500, chunk_size=8)
    assert cand.ids.shape == (3, CARD - FIRST)
    assert all(sorted(r) == list(range(FIRST, CARD)) for r in cand.ids.tolist())


def test_excluded_items_are_never_returned_and_the_rest_stay_exact() -> None:
    pre = preranker()
    ids, mask = sessions()
    cand = pre.session_top_n(ids, mask, n=8, chunk_size=5, exclude_seen=True)
    every = pre.session_top_n(ids, mask, n=CARD, chunk_size=5)
    for row in range(3):
        seen = set(ids[row][mask[row]].tolist())
        assert not seen & set(cand.ids[row].tolist())
        expected = [i for i in every.ids[row].tolist() if i not in seen][:8]
        assert cand.ids[row].tolist() == expected


def test_build_index_batches_do_not_change_the_heads() -> None:
    model = two_tower()
    feats, ids = catalogue()
    a = build_index(model, feats, ids, batch_size=5)
    with torch.no_grad():
        torch.testing.assert_close(a.heads, index_layout(model.item_heads(feats)))
    with pytest.raises(ValueError, match="heads must be"):
        ItemIndex(ids, a.heads[..., :-1])


# --------------------------------------------------------------------------- session adapter


def test_session_features_feed_the_history_and_leave_the_rest_missing() -> None:
    pre = preranker()
    ids, mask = sessions()
    mask[1, 4:] = False  # a shorter session: its padded ids must not leak in
    f = pre.user_features(ids, mask)
    assert torch.equal(f["history"], torch.where(mask, ids, 0))
    assert f["gender"].tolist() == [1, 1, 1] and f["age"].tolist() == [0.0, 0.0, 0.0]
    id_map = torch.arange(CARD).flip(0)
    id_map[0] = 0
    mapped = session_user_features(ids, mask, pre.model.config.user, id_map=id_map)["history"]
    assert mapped[0, :3].tolist() == [34, 30, 27] and mapped[0, 3:].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="no sequence field 'clicks'"):
        session_user_features(ids, mask, pre.model.config.user, history_field="clicks")


# --------------------------------------------------------------------------- re-ranking


def test_candidate_scores_equal_the_full_scores_of_those_items() -> None:
    model = session_model()
    ids, mask = sessions()
    feats = {"item_id": ids}
    cand = torch.tensor([[3, 17, 39, 0], [8, 8, 20, 1], [25, 4, 11, 12]])
    with torch.no_grad():
        full = model.score(feats, mask)
        got = candidate_scores(model, feats, mask, cand)
    torch.testing.assert_close(got, full.gather(1, cand))
    assert bool(torch.isneginf(got[0, 3])) and bool(torch.isneginf(got[1, 3]))


def test_reranking_all_items_reproduces_full_scoring() -> None:
    model = session_model()
    ids, mask = sessions()
    feats = {"item_id": ids}
    every = torch.arange(FIRST, CARD).expand(3, -1)
    for exclude_seen in (False, True):
        with torch.no_grad():
            full = model.predict(feats, mask, k=5, exclude_seen=exclude_seen)
            ours = rerank(model, feats, mask, every, k=5, exclude_seen=exclude_seen)
        assert torch.equal(ours.ids, full.ids)
        torch.testing.assert_close(ours.scores, full.scores)


def test_recommend_switches_between_full_and_preranked_scoring() -> None:
    model, pre = session_model(), preranker()
    ids, mask = sessions()
    feats = {"item_id": ids}
    with torch.no_grad():
        full = recommend(model, feats, mask, 5, PreRankConfig())
        assert torch.equal(full.ids, model.predict(feats, mask, k=5).ids)
        # N = catalogue: the two-stage path must give the full scorer's answer
        wide = recommend(model, feats, mask, 5, PreRankConfig("inttower", top_n=CARD), pre)
        assert torch.equal(wide.ids, full.ids)
        # small N: the answer is the session model's best among the pre-ranker's candidates
        narrow = recommend(model, feats, mask, 3, PreRankConfig("inttower", top_n=6, chunk_size=4),
                           pre, exclude_seen=True)
        cand = pre.session_top_n(ids, mask, 6, exclude_seen=True).ids
        scores = candidate_scores(model, feats, mask, cand)
        assert torch.equal(narrow.ids, cand.gather(1, scores.topk(3).indices))
    with pytest.raises(ValueError, match="load_preranker"):
        recommend(model, feats, mask, 5, PreRankConfig("inttower"))


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="did you mean 'top_n'"):
        PreRankConfig.from_dict({"topn": 10})
    with pytest.raises(ConfigError, match="choose one of"):
        PreRankConfig(pre_ranker="faiss")


# --------------------------------------------------------------------------- versions


def test_preranker_version_round_trips(tmp_path: Path) -> None:
    id_map = torch.arange(CARD)
    pre = preranker(id_map=id_map)
    path = save_preranker(tmp_path / "pre-v1", pre, metrics={"recall@10": 0.9},
                          info={"scorer_version": "v7"})
    loaded = load_preranker(path)
    assert torch.equal(loaded.index.item_ids, pre.index.item_ids)
    assert torch.equal(loaded.index.heads, pre.index.heads)
    assert torch.equal(loaded.id_map, id_map) and loaded.history_field == "history"
    ids, mask = sessions()
    a = pre.session_top_n(ids, mask, 7)
    b = loaded.session_top_n(ids, mask, 7)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.scores, b.scores)


def test_loading_a_model_without_index_says_what_to_do(tmp_path: Path) -> None:
    from model.inttower import save_two_tower

    path = save_two_tower(tmp_path / "plain", two_tower())
    with pytest.raises(ValueError, match="save_preranker"):
        load_preranker(path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_gpu_top_n_agree() -> None:
    pre = preranker()
    ids, mask = sessions()
    cpu = pre.session_top_n(ids, mask, 10, chunk_size=8)
    model = pre.model.to("cuda")
    index = ItemIndex(pre.index.item_ids.cuda(), pre.index.heads.cuda())
    gpu = PreRanker(model, index).session_top_n(ids.cuda(), mask.cuda(), 10, chunk_size=8)
    assert torch.equal(gpu.ids.cpu(), cpu.ids)
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, atol=1e-5, rtol=1e-5)
