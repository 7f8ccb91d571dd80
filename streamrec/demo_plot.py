"""The demo's plot: online HR@k over time, with the drift and the retrains marked."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def hr_series(points: Sequence[dict[str, Any]], span: int = 3,
              min_scored: int = 30) -> tuple[list[float], list[float]]:
    """(times, HR) of the model answers between timeline points ``span`` apart: each value is
    the ratio of the differences of the cumulative ``hits`` / ``scored`` counts (intervals
    with fewer than ``min_scored`` scored clicks are left out)."""
    pts = [p for p in points if p.get("scored") is not None]
    ts, hr = [], []
    for a, b in zip(pts, pts[span:], strict=False):
        scored = b["scored"] - a["scored"]
        if scored >= min_scored:
            ts.append(b["ts"])
            hr.append((b["hits"] - a["hits"]) / scored)
    return ts, hr


def plot_online_hr(points: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]],
                   drift_ts: float | None, t0: float, path: Path, *, k: int = 10) -> bool:
    """Write the PNG; ``False`` (and a log line) when matplotlib is missing or there is no data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    ts, hr = hr_series(points)
    if not ts:
        logger.warning("no scored clicks on the timeline: no plot")
        return False
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    ax.plot([t - t0 for t in ts], hr, color="#1f77b4", lw=1.8, label=f"online HR@{k}")
    if drift_ts is not None:
        ax.axvline(drift_ts - t0, color="#d62728", lw=2, ls="--", label="drift")
    labelled = set()
    for run in runs:
        end = run.get("started_at", 0) + run.get("duration_s", 0)
        if end < t0 or run.get("trigger") == "bootstrap":
            continue
        outcome = run.get("outcome", "?")
        style = {"promoted": ("#2ca02c", "-"), "rejected": ("#7f7f7f", ":")}.get(
            outcome, ("#ff7f0e", ":"))
        label = f"retrain {outcome}" if outcome not in labelled else None
        labelled.add(outcome)
        ax.axvline(end - t0, color=style[0], ls=style[1], lw=1.4, label=label)
    ax.set_xlabel("seconds since the live stream started")
    ax.set_ylabel(f"HR@{k} of the answers shown")
    ax.set_ylim(0, max(0.05, max(hr) * 1.25))
    ax.set_title("streamrec demo: online HR@k through a drift and retraining")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
