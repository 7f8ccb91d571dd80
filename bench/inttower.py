"""IntTower pre-ranker: CTR accuracy vs DSSM, and two-stage latency / recall at 1M items.

    python -m bench.inttower [--quick]

Part 1, accuracy (``../shared/data/ml-100k``, or ``STREAMREC_DATA_DIR``):
MovieLens-100k as a CTR task (:mod:`model.ctr_data`: rating >= 4 click, <= 2
non-click, 3 dropped; time split 70/10/20 with the validation slice carved from
the end of the training period; encoders fitted on the training rows only).
IntTower (LightSE, FE-Block, CIR) and the DSSM baseline (same towers and
features, no LightSE, no CIR, dot product) are trained with the same optimiser
and budget in the same run; the epoch is selected on validation AUC (early
stopping, patience 2) and test AUC / log-loss are computed once, on the
selected weights. Mean and sample std over seeds (full: 5, quick: 3 with at
most 3 epochs). The IntTower paper's MovieLens-1M numbers are quoted in the
JSON for reference only (other dataset, other split).

Part 2, synthetic (numpy seed 0): catalogues of items in topic clusters;
sessions of 5..20 events, 90% from the session's topic with a skewed
popularity inside it, 10% noise. The scorer is SASRec (d_model 64) over item
id + topic, sampled softmax with popularity negatives; the pre-rankers are
IntTower and DSSM (user tower fed by the session adapter; item tower: item id,
topic, a random "year").

- Quality (**trained** models, 50k items in 50 topics; quick: 20k / 20,
  short budgets): recall@10 of a pre-ranker = share of the full scorer's
  top-10 found in its top-N, for several N (N = 50 is 0.1% of the catalogue,
  the share N = 1000 is of 1M); HR@10 of the true next item for the full and
  the two-stage paths. Training a 1M-item scorer to a useful state does not fit
  a CPU budget (its tail items keep their initial vectors and outrank the
  trained ones), so quality is measured on the smaller catalogue.
- Latency (1M items; quick: 100k; **untrained** weights, which do not change
  the cost): median per-session (B = 1) time of full scoring by the session
  model vs pre-ranker top-N (N = 1000, exact chunked search over the
  precomputed index) + re-ranking of the N, at 1 thread and the default count.

Headline: mean test AUC of IntTower vs DSSM on ml-100k (target: ratio >= 1,
i.e. IntTower at least as good as the baseline).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import _common as C
from features.schema import Feature, Kind, Schema, Tag
from model.ctr_data import CTRDataset, CTRTensors, load_ml100k_ctr
from model.inttower import FieldConfig, TowerConfig, TwoTowerConfig, TwoTowerModel, build_two_tower
from model.metrics import auc, log_loss
from model.model import ModelConfig, SessionModel
from model.preranker import PreRankConfig, PreRanker, build_index, recommend, session_user_features

NAME = "inttower"
LIBRARIES = ("numpy", "torch", "safetensors")
PAPER_ML1M = {"source": "IntTower (CIKM'22), MovieLens-1M, as quoted in ../shared/data/README.md",
              "inttower": {"auc": 0.8974, "log_loss": 0.3128},
              "dssm": {"auc": 0.8697, "log_loss": 0.4559}}
FIRST = 3  # first real item id (0 padding, 1 missing, 2 OOV)


def data_dir() -> Path:
    env = os.environ.get("STREAMREC_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------- part 1: ml-100k CTR
def ctr_config(kind: str, data: CTRDataset) -> TwoTowerConfig:
    inttower = kind == "inttower"
    tower = {"hidden": (64, 32, 16), "dropout": 0.2, "lightse": inttower}
    return TwoTowerConfig(user=TowerConfig(data.user_fields(), **tower),
                          item=TowerConfig(data.item_fields(), **tower), kind=kind,
                          embedding_dim=16, user_heads=2, item_heads=2, head_dim=16,
                          cir_weight=0.1 if inttower else 0.0, cir_temperature=0.1)


def predict(model: TwoTowerModel, split: CTRTensors) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        probs = [torch.sigmoid(model.logits(b.user, b.item)) for b in split.batches(8192)]
    model.train()
    return torch.cat(probs)


def train_ctr(kind: str, data: CTRDataset, seed: int, max_epochs: int) -> dict[str, Any]:
    """Train with early stopping on validation AUC; test once on the selected weights."""
    torch.manual_seed(seed)
    model = build_two_tower(ctr_config(kind, data))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    best, best_auc, best_epoch, bad, t0 = None, -1.0, 0, 0, time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        for b in data.train.batches(1024, shuffle=True, generator=gen):
            loss = model(b.user, b.item, b.labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        valid_auc = auc(data.valid.labels, predict(model, data.valid))
        if valid_auc > best_auc:
            best, best_auc, best_epoch, bad = copy.deepcopy(model.state_dict()), valid_auc, epoch, 0
        else:
            bad += 1
            if bad >= 2:
                break
    train_s = time.perf_counter() - t0
    model.load_state_dict(best)
    p = predict(model, data.test)
    return {"part": "ml-100k ctr", "model": kind, "seed": seed, "best_epoch": best_epoch,
            "valid_auc": round(best_auc, 4), "test_auc": round(auc(data.test.labels, p), 4),
            "test_log_loss": round(log_loss(data.test.labels, p), 4),
            "train_s": round(train_s, 1), "params": sum(x.numel() for x in model.parameters())}


def run_ctr(seeds: int, max_epochs: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    path = data_dir() / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        C.progress(f"{path} not found: skipping the ml-100k part (set STREAMREC_DATA_DIR)")
        return [], {}
    data = load_ml100k_ctr(path)
    rows = []
    for seed in range(seeds):
        for kind in ("inttower", "dssm"):
            C.progress(f"ml-100k: {kind} seed {seed}")
            rows.append(train_ctr(kind, data, seed, max_epochs))
    summary: dict[str, Any] = {"splits": data.info}
    for kind in ("inttower", "dssm"):
        mine = [r for r in rows if r["model"] == kind]
        for key in ("test_auc", "test_log_loss"):
            m, s = mean_std([r[key] for r in mine])
            summary[f"{kind}_{key}_mean"], summary[f"{kind}_{key}_std"] = round(m, 4), round(s, 4)
    return rows, summary


# ---------------------------------------------------------------------- part 2: synthetic 1M
def make_catalogue(n_items: int, n_topics: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Item ids (from FIRST) grouped by topic, each group in popularity order."""
    topic = rng.integers(0, n_topics, n_items)
    order = np.argsort(topic, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(topic, minlength=n_topics))[:-1])
    return [FIRST + rng.permutation(g) for g in groups]


def make_sessions(groups: list[np.ndarray], n: int, max_len: int,
                  rng: np.random.Generator) -> torch.Tensor:
    """``[n, max_len]`` right-padded sessions: 90% in-topic (skewed by rank), 10% noise."""
    out = np.zeros((n, max_len), np.int64)
    for s in range(n):
        length = int(rng.integers(5, max_len + 1))
        topics = np.where(rng.random(length) < 0.9, rng.integers(len(groups)),
                          rng.integers(0, len(groups), length))
        for j, t in enumerate(topics):
            g = groups[t]
            out[s, j] = g[min(int(len(g) * rng.random() ** 3), len(g) - 1)]
    return torch.from_numpy(out)


def session_model(n_items: int, n_topics: int, max_len: int, train: torch.Tensor) -> SessionModel:
    """SASRec over item id + topic (an item feature, as ``category`` in the default schema);
    sampled softmax with popularity-proportional negatives (log-Q corrected)."""
    schema = Schema([
        Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                transform={"op": "categorify"}, cardinality=n_items + FIRST),
        Feature("category", Kind.CATEGORICAL, tags={Tag.ITEM_FEATURE},
                transform={"op": "categorify"}, cardinality=n_topics + FIRST)])
    cfg = ModelConfig.from_dict({
        "block": {"name": "sasrec", "d_model": 64, "n_layers": 2, "n_heads": 1,
                  "max_len": max_len, "dropout": 0.1},
        "masking": "clm",
        "next_item": {"loss": "sampled", "num_negatives": 1024, "sampler": "popularity"}})
    counts = torch.bincount(train.reshape(-1), minlength=n_items + FIRST).float()
    return SessionModel(schema, cfg, item_counts=counts)


def scorer_features(ids: torch.Tensor, topic_of: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"item_id": ids, "category": torch.where(ids != 0, FIRST + topic_of[ids], 0)}


def pretower_config(kind: str, n_items: int, n_topics: int) -> TwoTowerConfig:
    inttower = kind == "inttower"
    user = TowerConfig((FieldConfig("age", "dense"), FieldConfig("gender", "sparse", 4),
                        FieldConfig("occupation", "sparse", 8),
                        FieldConfig("history", "sequence", n_items + FIRST)),
                       hidden=(64, 32, 16), lightse=inttower)
    item = TowerConfig((FieldConfig("item_id", "sparse", n_items + FIRST),
                        FieldConfig("genres", "sequence", n_topics + FIRST),
                        FieldConfig("year", "dense")), hidden=(64, 32, 16), lightse=inttower)
    return TwoTowerConfig(user=user, item=item, kind=kind, embedding_dim=16, user_heads=2,
                          item_heads=2, head_dim=16, cir_weight=0.1 if inttower else 0.0)


def item_features(topic_of: torch.Tensor, ids: torch.Tensor, year: torch.Tensor) -> dict:
    return {"item_id": ids, "genres": (FIRST + topic_of[ids])[:, None], "year": year[ids]}


def train_session_model(model: SessionModel, train: torch.Tensor, topic_of: torch.Tensor,
                        steps: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=5e-3, fused=True)  # fused: 10x faster step
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = train[torch.randint(0, len(train), (512,), generator=gen)]
        loss = model(scorer_features(ids, topic_of), ids != 0, generator=gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def train_pretower(model: TwoTowerModel, train: torch.Tensor, items: dict, steps: int,
                   n_items: int, seed: int) -> None:
    """Rows: (session prefix, its next item, 1) and (prefix, a random item, 0)."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, fused=True)
    gen = torch.Generator().manual_seed(seed)
    lengths = (train != 0).sum(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (256,), generator=gen)
        ids, n = train[idx], lengths[idx]
        cut = 1 + (torch.rand(len(idx), generator=gen) * (n - 1)).long()  # target position
        mask = torch.arange(ids.shape[1])[None, :] < cut[:, None]
        user = session_user_features(ids, mask, model.config.user)
        pos = ids.gather(1, cut[:, None])[:, 0]
        neg = torch.randint(FIRST, FIRST + n_items, (len(idx),), generator=gen)
        both = torch.cat([pos, neg])
        user2 = {k: torch.cat([v, v]) for k, v in user.items()}
        item = {k: v[both] for k, v in items.items()}
        labels = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))])
        loss = model(user2, item, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 2)


class Synthetic:
    """A topic-clustered catalogue, its sessions, and a scorer + two pre-rankers on it."""

    def __init__(self, n_items: int, n_topics: int, n_train: int, n_eval: int,
                 scorer_steps: int, tower_steps: int) -> None:
        rng = np.random.default_rng(0)
        self.n_items, max_len = n_items, 20
        groups = make_catalogue(n_items, n_topics, rng)
        self.topic_of = torch.zeros(n_items + FIRST, dtype=torch.int64)
        for t, g in enumerate(groups):
            self.topic_of[torch.from_numpy(g)] = t
        year = torch.from_numpy(rng.standard_normal(n_items + FIRST).astype(np.float32))
        train = make_sessions(groups, n_train, max_len, rng) if n_train else None
        test = make_sessions(groups, n_eval, max_len, rng)
        items = {"item_id": torch.arange(n_items + FIRST), "genres": (FIRST + self.topic_of)[:, None],
                 "year": year}
        counts_from = train if train is not None else test
        self.trained = bool(scorer_steps and tower_steps and train is not None)
        self.train_s: dict[str, float] = {}
        t0 = time.perf_counter()
        torch.manual_seed(0)
        self.scorer = session_model(n_items, n_topics, max_len, counts_from)
        if train is not None and scorer_steps:
            C.progress(f"synthetic {n_items:,}: training the session model ({scorer_steps} steps)")
            train_session_model(self.scorer, train, self.topic_of, scorer_steps, seed=0)
        self.scorer.eval()
        self.train_s["session_model"] = round(time.perf_counter() - t0, 1)
        all_ids = torch.arange(FIRST, FIRST + n_items)
        self.prerankers: dict[str, PreRanker] = {}
        for kind in ("inttower", "dssm"):
            t0 = time.perf_counter()
            torch.manual_seed(0)
            model = build_two_tower(pretower_config(kind, n_items, n_topics))
            if train is not None and tower_steps:
                C.progress(f"synthetic {n_items:,}: training the {kind} pre-ranker")
                train_pretower(model, train, items, tower_steps, n_items, seed=0)
            index = build_index(model, item_features(self.topic_of, all_ids, year), all_ids)
            self.prerankers[kind] = PreRanker(model, index)
            self.train_s[kind] = round(time.perf_counter() - t0, 1)
        # evaluation sessions: all but the last event; the last event is the true next item
        lengths = (test != 0).sum(1)
        self.targets = test.gather(1, (lengths - 1)[:, None])[:, 0]
        inputs = test.clone()
        inputs[torch.arange(len(test)), lengths - 1] = 0
        self.mask = inputs != 0
        self.feats = scorer_features(inputs, self.topic_of)


def run_quality(syn: Synthetic, top_ns: tuple[int, ...]) -> dict[str, Any]:
    """Recall@10 of each pre-ranker (share of the full scorer's top-10 in its top-N), HR@10."""
    t = syn.targets
    out: dict[str, Any] = {"catalogue": syn.n_items, "sessions": len(t),
                           "models_trained": syn.trained}
    with torch.no_grad():
        full = recommend(syn.scorer, syn.feats, syn.mask, 10, PreRankConfig("none"))
        out["full_hr@10"] = round(float((full.ids == t[:, None]).any(1).float().mean()), 4)
        out["full_top10_in_target_topic"] = round(
            float((syn.topic_of[full.ids] == syn.topic_of[t][:, None]).float().mean()), 4)
        for n in top_ns:
            row: dict[str, Any] = {"random_expected_recall@10": round(n / syn.n_items, 5)}
            for kind, pre in syn.prerankers.items():
                cand = pre.session_top_n(syn.feats["item_id"], syn.mask, n)
                found = (full.ids[:, :, None] == cand.ids[:, None, :]).any(2).float().mean()
                two = recommend(syn.scorer, syn.feats, syn.mask, 10,
                                PreRankConfig("inttower", top_n=n), pre)
                row[f"{kind}_recall@10"] = round(float(found), 4)
                row[f"{kind}_two_stage_hr@10"] = round(
                    float((two.ids == t[:, None]).any(1).float().mean()), 4)
            out[f"top_n={n}"] = row
    return out


def run_latency(syn: Synthetic, reps: int, top_n: int) -> list[dict[str, Any]]:
    """Median per-session (B = 1) latency of full scoring vs top-N + re-ranking."""
    rows = []
    default_threads = torch.get_num_threads()
    paths = (("full scoring", PreRankConfig("none"), None),
             ("inttower top-N + rerank", PreRankConfig("inttower", top_n=top_n),
              syn.prerankers["inttower"]),
             ("dssm top-N + rerank", PreRankConfig("inttower", top_n=top_n),
              syn.prerankers["dssm"]))
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for path, cfg, pre in paths:
            C.progress(f"latency {syn.n_items:,} items: {path}, {threads} thread(s)")
            times = []
            with torch.no_grad():
                for s in range(min(reps, len(syn.targets))):
                    f = {k: v[s:s + 1] for k, v in syn.feats.items()}
                    m = syn.mask[s:s + 1]
                    times.append(median_ms(lambda f=f, m=m, c=cfg, p=pre:
                                           recommend(syn.scorer, f, m, 10, c, p), 3))
            rows.append({"part": "latency", "path": path, "threads": threads,
                         "catalogue": syn.n_items, "top_n": top_n if pre else None,
                         "p50_ms": round(statistics.median(times), 2),
                         "p95_ms": round(float(np.percentile(times, 95)), 2)})
        with torch.no_grad():
            for kind, pre in syn.prerankers.items():
                rows.append({"part": "latency", "path": f"{kind} top-N only", "threads": threads,
                             "catalogue": syn.n_items, "top_n": top_n, "p50_ms": median_ms(
                                 lambda p=pre: p.session_top_n(syn.feats["item_id"][:1],
                                                               syn.mask[:1], top_n), reps)})
    torch.set_num_threads(default_threads)
    for r in rows:
        full_ms = next(x["p50_ms"] for x in rows
                       if x["path"] == "full scoring" and x["threads"] == r["threads"])
        r["vs_full"] = round(r["p50_ms"] / full_ms, 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds x <= 3 epochs, 100k items")
    args = ap.parse_args(argv)
    quick = args.quick
    ctr_rows, ctr = run_ctr(seeds=3 if quick else 5, max_epochs=3 if quick else 15)
    C.progress("synthetic quality: training on a topic-clustered catalogue")
    small = Synthetic(n_items=20_000 if quick else 50_000, n_topics=20 if quick else 50,
                      n_train=10_000 if quick else 20_000, n_eval=100 if quick else 500,
                      scorer_steps=60 if quick else 300, tower_steps=100 if quick else 400)
    quality = run_quality(small, top_ns=(20, 50, 200, 1000))
    quality["train_s"] = small.train_s
    del small
    C.progress("synthetic latency: untrained models over the large catalogue")
    big = Synthetic(n_items=100_000 if quick else 1_000_000, n_topics=100 if quick else 1000,
                    n_train=0, n_eval=60, scorer_steps=0, tower_steps=0)
    lat_rows = run_latency(big, reps=10 if quick else 30, top_n=1000)
    lat = {"latency_models_trained": False,
           "latency_note": "random weights: latency does not depend on them; the quality "
                           "numbers come from the trained models of 'quality'",
           "index_mib": round(big.prerankers["inttower"].index.heads.numel() * 4 / 2**20, 1),
           "quality": quality}
    del big

    headline = C.make_headline(
        "ml-100k test AUC, IntTower vs DSSM (mean over seeds)",
        ctr.get("inttower_test_auc_mean"), ctr.get("dssm_test_auc_mean"), "AUC",
        target_ratio=1.0)
    extra = {"ctr_summary": ctr, "paper_reference_ml1m": PAPER_ML1M, "synthetic": lat,
             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
             "torch_threads_default": torch.get_num_threads(),
             "load_average_1m": C.load_average()}
    path = C.write_results(NAME, quick=quick, headline=headline, rows=ctr_rows + lat_rows,
                           libraries=LIBRARIES, extra=extra)

    if ctr:
        print(C.markdown_table(
            ["model (ml-100k, time split)", "test AUC", "test log-loss", "seeds"],
            [[k, f"{ctr[f'{k}_test_auc_mean']:.4f} ± {ctr[f'{k}_test_auc_std']:.4f}",
              f"{ctr[f'{k}_test_log_loss_mean']:.4f} ± {ctr[f'{k}_test_log_loss_std']:.4f}",
              len(ctr_rows) // 2] for k in ("inttower", "dssm")]
            + [[f"paper, ML-1M: {k}", PAPER_ML1M[k]["auc"], PAPER_ML1M[k]["log_loss"], "-"]
               for k in ("inttower", "dssm")]))
    print()
    print(C.markdown_table(["path", "threads", "catalogue", "p50 ms", "vs full"],
                           [[r["path"], r["threads"], f"{r['catalogue']:,}", r["p50_ms"],
                             f"{r['vs_full']:.2f}x"] for r in lat_rows]))
    print(f"\nsynthetic quality (trained models): {quality}")
    h = headline
    if h["ratio"] is not None:
        print(f"headline: {h['name']}: {h['ours']:.4f} vs {h['baseline']:.4f} -> "
              f"{h['ratio']:.4f} ({h['target']}: met={h['met']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
