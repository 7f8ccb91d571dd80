"""Helpers shared by every benchmark (see the project's BENCH.md).

- :func:`results_path` / :func:`write_results`: ``bench/results/<name>.json``
  (``<name>.quick.json`` for ``--quick``) with the fields BENCH.md requires:
  benchmark, commit, date, command, machine, headline, rows.
- :func:`make_headline`: ours vs baseline, the ratio and ``met`` computed from
  the measured numbers, never written by hand.
- :func:`median`, :func:`machine_info`, :func:`library_versions`,
  :func:`git_commit`, :func:`progress`, :func:`markdown_table`.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

_T0 = time.monotonic()


# ---------------------------------------------------------------------- numbers
def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none.

    >>> median([3.0, 1.0, 2.0]), median([1.0, None, 3.0]), median([])
    (2.0, 2.0, None)
    """
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def make_headline(
    name: str,
    ours: float | None,
    baseline: float | None,
    unit: str,
    *,
    target_ratio: float,
    at_least: bool = True,
) -> dict[str, Any]:
    """The headline block: ``ratio = ours / baseline``, ``met`` computed from it.

    ``at_least`` says whether the target is ``ratio >= target_ratio`` (higher is
    better) or ``ratio <= target_ratio``. A missing measurement never meets it.

    >>> h = make_headline("x vs y", 30.0, 10.0, "events/s", target_ratio=2)
    >>> h["ratio"], h["target"], h["met"]
    (3.0, 'ratio >= 2', True)
    >>> make_headline("x vs y", 1.0, None, "s", target_ratio=0.5, at_least=False)["met"]
    False
    """
    ratio = ours / baseline if ours is not None and baseline else None
    op = ">=" if at_least else "<="
    met = ratio is not None and (ratio >= target_ratio if at_least else ratio <= target_ratio)
    return {
        "name": name,
        "ours": ours,
        "baseline": baseline,
        "ratio": ratio,
        "unit": unit,
        "target": f"ratio {op} {target_ratio:g}",
        "met": bool(met),
    }


# ---------------------------------------------------------------------- provenance
def git_commit() -> dict[str, Any]:
    """The commit the numbers come from, and whether the worktree had changes."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "changes": status.splitlines() if status else [],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    try:
        import torch
    except Exception:
        return None
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        return None
    return None


def machine_info() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), usable cores, GPU name via torch.cuda or None."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 0
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "gpu": _gpu(),
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def library_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions of the given distributions (None when absent)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_average() -> float | None:
    """The 1-minute load average: how busy the (shared) machine was."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def command_line() -> str:
    """The command as typed: ``python -m bench.<name> ...`` for a module run."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        argv = ["python", "-m", spec.name, *argv[1:]]
    return shlex.join(argv)


# ---------------------------------------------------------------------- output
def progress(msg: str) -> None:
    """One progress line on stderr, with the seconds since the script started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-markdown table; numbers right-aligned.

    >>> print(markdown_table(["a", "b"], [["x", 1]]))
    | a | b |
    |---|--:|
    | x | 1 |
    """
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    numeric = [
        all(_looks_numeric(r[i]) for r in rows if r[i] not in _BLANK)
        and any(r[i] not in _BLANK for r in rows)
        for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("--:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


_BLANK = ("", "-", "n/a")


def _looks_numeric(s: str) -> bool:
    try:
        float(s.replace(",", "").rstrip("x%"))
    except ValueError:
        return False
    return True


def results_path(name: str, quick: bool) -> Path:
    return RESULTS_DIR / (f"{name}.quick.json" if quick else f"{name}.json")


def write_results(
    name: str,
    *,
    quick: bool,
    headline: dict[str, Any],
    rows: list[dict[str, Any]],
    libraries: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    machine: dict[str, Any] | None = None,
) -> Path:
    """Write ``bench/results/<name>[.quick].json``; returns its path."""
    git = git_commit()
    doc: dict[str, Any] = {
        "benchmark": name,
        "commit": git["commit"],
        "worktree_dirty": git["dirty"],
        "worktree_changes": git["changes"],
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "quick": quick,
        "machine": machine or machine_info(),
        "versions": {"python": platform.python_version(), **library_versions(libraries)},
        "headline": headline,
        "rows": rows,
    }
    if extra:
        doc.update({k: v for k, v in extra.items() if k not in doc})
    path = results_path(name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
