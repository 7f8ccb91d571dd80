"""The dependency direction of DESIGN.md, checked on the source (imports by AST)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("streamrec", "ingest", "features", "model", "serving", "retrain")
# package -> our packages it must never import
FORBIDDEN = {
    "features": {"streamrec", "ingest", "model", "serving", "retrain"},
    "model": {"streamrec", "ingest", "serving", "retrain"},
    "ingest": {"streamrec", "features", "model", "serving", "retrain"},
    "serving": {"streamrec", "retrain"},
    "retrain": {"streamrec", "serving"},
    "streamrec": set(),
}
# features and model are plain libraries: no Kafka, Redis or HTTP clients.
IO_LIBRARIES = {"confluent_kafka", "kafka", "redis", "valkey", "fastapi", "uvicorn", "httpx",
                "requests", "aiohttp"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", COMPONENTS)
def test_dependencies_point_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {}
    for f in files:
        banned = FORBIDDEN[package] | (IO_LIBRARIES if package in {"features", "model"} else set())
        hits = _imports(f) & banned
        if hits:
            bad[str(f.relative_to(ROOT))] = sorted(hits)
    assert not bad, f"imports against the dependency direction: {bad}"


def test_layout_has_every_part() -> None:
    for d in (*COMPONENTS, "deploy", "bench", "tests", "docs"):
        assert (ROOT / d).is_dir(), f"missing {d}/"
    assert (ROOT / "pyproject.toml").is_file() and (ROOT / "constraints.txt").is_file()
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
