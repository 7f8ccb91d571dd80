"""model/ctr_data.py: labels, time split, liked histories without leakage, train-only encoders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config_base import ConfigError
from model.ctr_data import (
    MISSING_ID,
    OOV_ID,
    CTRDataConfig,
    CTREncoders,
    Interactions,
    Items,
    Scaler,
    Tables,
    Users,
    Vocabulary,
    build_ctr,
    label_ratings,
    liked_histories,
    load_ml100k_ctr,
    time_split,
)
from model.inttower import TowerConfig, TwoTowerConfig, build_two_tower


def ml100k_dir() -> Path:
    env = os.environ.get("STREAMREC_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    path = root / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        pytest.skip(f"{path} not found: put MovieLens-100k there or set STREAMREC_DATA_DIR")
    return path


def tiny_tables() -> Tables:
    """10 ratings at t = 1..10 (test = t 9, 10 with test_fraction 0.2; valid = t 8)."""
    users = Users(np.array([1, 2, 3]), np.array([20.0, 40.0, np.nan]),
                  ["M", "F", None], ["writer", "doctor", "pilot"])
    items = Items(np.array([10, 11, 12, 13]), np.array([1990.0, 2000.0, np.nan, 1950.0]),
                  [("Drama",), ("Comedy", "Drama"), ("Horror",), ()])
    #             t: 1   2   3   4   5   6   7   8   9  10
    user = np.array([1, 1, 2, 1, 2, 1, 2, 1, 3, 1])
    item = np.array([10, 11, 10, 11, 11, 10, 10, 11, 12, 13])
    rating = np.array([5, 4, 1, 3, 5, 2, 4, 5, 5, 4], dtype=float)
    return Tables(Interactions(user, item, rating, np.arange(1, 11)), users, items)


def test_labels_follow_the_rating_rule() -> None:
    assert label_ratings(np.array([1, 2, 3, 4, 5.0])).tolist() == [0, 0, -1, 1, 1]
    assert label_ratings(np.array([3.5, 4.5]), positive_min=4.5, negative_max=3.5).tolist() == [0, 1]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=3, max_size=60),
       st.floats(0.05, 0.9), st.floats(0.0, 0.9))
def test_time_split_orders_train_before_valid_before_test(ts: list[int], test: float,
                                                          valid: float) -> None:
    t = np.array(ts)
    tr, va, te = time_split(t, test, valid)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(len(t)))
    assert len(te) == round(len(t) * test)
    for a, b in ((tr, va), (tr, te), (va, te)):
        if len(a) and len(b):
            assert t[a].max() <= t[b].min()


def brute_history(user, item, ts, liked, row, max_history):
    earlier = [r for r in range(len(user))
               if user[r] == user[row] and ts[r] < ts[row] and liked[r]]
    earlier.sort(key=lambda r: (ts[r], r))
    return [int(item[r]) for r in earlier][-max_history:] if max_history else []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 9), st.integers(0, 6), st.booleans()),
                min_size=1, max_size=40), st.integers(1, 4))
def test_liked_history_is_strictly_earlier_liked_items(rows: list, max_history: int) -> None:
    user, item, ts, liked = (np.array(c) for c in zip(*rows, strict=True))
    items, lengths = liked_histories(user, item, ts, liked, max_history)
    assert items.shape == (len(rows), max_history)
    for r in range(len(rows)):
        assert items[r, : lengths[r]].tolist() == brute_history(user, item, ts, liked, r,
                                                                max_history)
        assert (items[r, lengths[r]:] == 0).all()


def test_history_never_contains_the_row_itself_or_same_second_likes() -> None:
    user, item = np.array([1, 1, 1]), np.array([5, 6, 7])
    items, lengths = liked_histories(user, item, np.array([3, 3, 4]), np.ones(3, bool), 5)
    assert lengths.tolist() == [0, 0, 2] and items[2, :2].tolist() == [5, 6]


def test_vocabulary_and_scaler_handle_missing_and_unseen() -> None:
    vocab = Vocabulary.fit(["a", "b", "a"])
    assert vocab.encode(["a", "b", "c", None]).tolist() == [3, 4, OOV_ID, MISSING_ID]
    s = Scaler.fit(np.array([2.0, 4.0, 6.0]))
    assert s.std == pytest.approx(np.std([2.0, 4.0, 6.0]))
    assert s.transform(np.array([4.0, np.nan])).tolist() == [0.0, 0.0]
    assert Scaler.fit(np.array([3.0, 3.0])).std == 1.0  # constant column: no division by 0


def test_encoders_see_only_training_rows() -> None:
    data = build_ctr(tiny_tables(), CTRDataConfig(test_fraction=0.2, valid_fraction=0.15))
    # labelled rows (t 4 dropped, rating 3): t 1 2 3 5 6 7 8 9 10 -> test = t 9, 10; valid = t 8
    assert data.test.timestamps.tolist() == [9, 10] and data.valid.timestamps.tolist() == [8]
    assert data.train.timestamps.tolist() == [1, 2, 3, 5, 6, 7]
    assert data.train.labels.tolist() == [1, 1, 0, 1, 0, 1]
    enc = data.encoders
    # user 3 ("pilot") and items 12 / 13 (genre Horror) occur only in the test split
    assert "pilot" not in enc.occupation.values and "Horror" not in enc.genre.values
    assert set(enc.item.values) == {"10", "11"}
    assert data.test.user["occupation"][0] == OOV_ID
    assert data.test.user["gender"][0] == MISSING_ID  # missing, not unseen
    assert data.test.item["item_id"].tolist() == [OOV_ID, OOV_ID]
    assert data.test.item["genres"][0].tolist()[:1] == [OOV_ID]
    assert data.test.item["genres"][1].tolist() == [0] * 6  # no genre: an empty list
    # scalers: statistics of the train rows only (ages 20, 20, 40, 40, 20, 40 by row)
    train_ages = np.array([20.0, 20, 40, 40, 20, 40])
    assert enc.age.mean == pytest.approx(train_ages.mean())
    assert enc.age.std == pytest.approx(train_ages.std())
    train_years = np.array([1990.0, 2000, 1990, 2000, 1990, 1990])
    assert (enc.year.mean, enc.year.std) == pytest.approx((train_years.mean(), train_years.std()))
    assert data.test.user["age"][0] == 0.0  # missing age -> the training mean


def test_histories_are_encoded_with_the_train_vocabulary() -> None:
    data = build_ctr(tiny_tables(), CTRDataConfig(test_fraction=0.2, valid_fraction=0.15))
    item_id = {v: 3 + i for i, v in enumerate(data.encoders.item.values)}
    # user 1's row at t 10 (test): liked before it 10 (t1), 11 (t2), 11 (t8); t4 is a 3, t6 a 2
    row = data.test.user["history"][1]
    assert row[:3].tolist() == [item_id["10"], item_id["11"], item_id["11"]]
    assert (row[3:] == 0).all()
    # user 2's row at t 7: only item 11 liked at t 5; t 3 was a dislike
    assert data.train.user["history"][5, :2].tolist() == [item_id["11"], 0]


def test_encoders_round_trip_through_json() -> None:
    enc = build_ctr(tiny_tables()).encoders
    assert CTREncoders.from_dict(json.loads(json.dumps(enc.to_dict()))) == enc


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="did you mean 'max_history'"):
        CTRDataConfig.from_dict({"max_histroy": 5})
    with pytest.raises(ConfigError, match="negative_max"):
        CTRDataConfig(positive_min=3, negative_max=3)


def test_batches_cover_every_row_once_and_feed_a_model() -> None:
    data = build_ctr(tiny_tables(), CTRDataConfig(test_fraction=0.2, valid_fraction=0.0))
    seen = torch.cat([b.timestamps for b in data.train.batches(3, shuffle=True,
                                                               generator=torch.Generator())])
    assert sorted(seen.tolist()) == data.train.timestamps.tolist()
    cfg = TwoTowerConfig(user=TowerConfig(data.user_fields("max"), hidden=(8, 4)),
                         item=TowerConfig(data.item_fields(), hidden=(8, 4)), head_dim=4)
    out = build_two_tower(cfg)(data.test.user, data.test.item, data.test.labels)
    assert out.logits.shape == (2,)


def test_ml100k_ctr_rows_and_splits() -> None:
    data = load_ml100k_ctr(ml100k_dir())
    n = len(data.train) + len(data.valid) + len(data.test)
    assert n == 100_000 - 27_145  # ratings of 3 dropped
    assert int(sum(s.labels.sum() for s in (data.train, data.valid, data.test))) == 34_174 + 21_201
    assert len(data.test) == round(n * 0.2)
    assert data.train.timestamps.max() <= data.valid.timestamps.min()
    assert data.valid.timestamps.max() <= data.test.timestamps.min()
    # every id lies in its field's range
    for split in (data.train, data.test):
        for f in (*data.user_fields(), *data.item_fields()):
            x = (split.user | split.item)[f.name]
            assert f.kind == "dense" or int(x.max()) < f.cardinality
    # unseen items of the test period map to OOV; the train split has none
    assert int((data.train.item["item_id"] == OOV_ID).sum()) == 0
    assert int((data.test.item["item_id"] == OOV_ID).sum()) > 0
