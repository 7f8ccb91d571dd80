"""Commands start without torch or transformers unless they need them.

``import torch`` costs seconds of CPU and ``import transformers`` a few more;
every CLI start, every worker container and every test that runs a command
in a subprocess would pay for them. Each check runs in a fresh interpreter
and reads ``sys.modules`` afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_REPORT = "import json, sys; print(json.dumps({m: m in sys.modules for m in HEAVY}))"


def _loaded(code: str, heavy: tuple[str, ...]) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; which of ``heavy`` it imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = f"HEAVY = {heavy!r}\n{code}\n{_REPORT}"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cli_and_its_settings_import_neither_torch_nor_transformers() -> None:
    code = """
import streamrec.cli
from click.testing import CliRunner
for args in (["ingest", "sessions", "--help"], ["config"], ["serve", "--help"],
             ["retrain", "--help"], ["train", "--help"]):
    result = CliRunner().invoke(streamrec.cli.cli, args)
    assert result.exit_code == 0, (args, result.output)
"""
    assert _loaded(code, ("torch", "transformers")) == {"torch": False, "transformers": False}


def test_the_ingest_workers_do_not_import_torch() -> None:
    # ingest.app builds both workers: it imports the sessions updater, the archiver,
    # the worker loop, the Kafka and Redis clients and the metrics.
    code = "from ingest.app import archive_worker, sessions_worker"
    assert _loaded(code, ("torch", "transformers")) == {"torch": False, "transformers": False}


def test_a_sasrec_or_gru_session_model_does_not_import_transformers() -> None:
    code = """
import torch
from features.schema import Feature, Kind, Schema, Tag
from model.model import ModelConfig, SessionModel
schema = Schema([Feature("item_id", Kind.CATEGORICAL, tags={Tag.ITEM_ID},
                         transform={"op": "categorify"}, cardinality=12)])
for name in ("sasrec", "gru"):
    cfg = ModelConfig.from_dict({"block": {"name": name, "d_model": 8, "n_heads": 2,
                                           "n_layers": 1, "max_len": 4}})
    model = SessionModel(schema, cfg)
    top = model.predict({"item_id": torch.tensor([[3, 4, 0]])},
                        torch.tensor([[True, True, False]]), k=2)
    assert top.ids.shape == (1, 2)
"""
    assert _loaded(code, ("transformers",)) == {"transformers": False}
