"""Model version directories: write, read, and recommend from them.

A checkpoint is a directory that describes itself (``docs/model.md``)::

    <version>/
      config.json        format, model config, fitted schema, info (data cut-off, ...)
      model.safetensors  the weights (tied tensors stored once)
      metrics.json       validation / test metrics of this version
      workflow/          the fitted feature workflow (vocabularies), when given

It is written under a temporary name beside the target and renamed into
place, so a reader (the serving watcher) never sees half a version. Nothing
is pickled: weights are safetensors, everything else JSON and Parquet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load_model, save_model

from features.batch import SessionBatch
from features.schema import Schema
from features.workflow import Workflow
from model.model import ModelConfig, SessionModel
from model.versiondir import new_version_dir, utc_stamp

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "Recommendation", "load_checkpoint",
           "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "streamrec.model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
WORKFLOW_DIR = "workflow"


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """Top-k for one session: original item ids (``None`` never appears) and scores.

    ``items`` holds ``k`` entries, fewer only when ``exclude_seen`` leaves fewer
    than ``k`` items of the catalogue.
    """

    session_id: str
    items: list[Any]
    scores: list[float]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded version: the model (eval mode), its workflow, config, metrics and info."""

    path: Path
    model: SessionModel
    workflow: Workflow | None
    metrics: dict[str, Any]
    info: dict[str, Any]

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def recommend(self, sessions: SessionBatch, k: int = 10, exclude_seen: bool = False,
                  device: torch.device | str | None = None) -> list[Recommendation]:
        """Raw session events -> top-``k`` original item ids per session.

        The workflow encodes the events (the last ``max_len`` per session),
        the model scores the catalogue, and the item vocabulary maps ids back.
        Padding, missing and out-of-vocabulary ids are never returned.
        """
        if self.workflow is None:
            raise ValueError(f"{self.path}: saved without a workflow; it cannot encode raw events")
        device = device or next(self.model.parameters()).device
        batch = self.workflow.transform(sessions, device)
        with torch.inference_mode():
            top = self.model.predict(batch.features, batch.mask, k=k, exclude_seen=exclude_seen)
        item_op = self.workflow.ops[self.model.item_feature]
        items = item_op.decode(top.ids.reshape(-1).cpu()).to_pylist()  # type: ignore[attr-defined]
        scores = top.scores.float().cpu().tolist()
        real = (top.ids >= self.model.first_item_id).cpu().tolist()  # id 0: no item left
        kk = top.ids.shape[1]
        out = []
        for i, sid in enumerate(batch.session_ids):
            keep = [j for j in range(kk) if real[i][j]]
            out.append(Recommendation(sid, [items[i * kk + j] for j in keep],
                                      [scores[i][j] for j in keep]))
        return out

    def recommend_table(self, events: pa.Table, k: int = 10,
                        exclude_seen: bool = False) -> list[Recommendation]:
        """:meth:`recommend` for an events table (grouped by session, sorted by time)."""
        if self.workflow is None:
            raise ValueError(f"{self.path}: saved without a workflow; it cannot encode raw events")
        wf = self.workflow
        batch = SessionBatch.from_table(events, wf.session_col, wf.ts_col,
                                        columns=[c for c in wf.event_columns if c in events.schema.names])
        return self.recommend(batch, k=k, exclude_seen=exclude_seen)


def _json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def save_checkpoint(directory: str | os.PathLike[str], model: SessionModel,
                    workflow: Workflow | None = None,
                    metrics: Mapping[str, Any] | None = None,
                    info: Mapping[str, Any] | None = None) -> Path:
    """Write a version directory at ``directory`` (which must not exist yet).

    ``info`` is free-form JSON (training data cut-off, parent version, ...);
    ``created`` and the workflow fingerprint are added.
    """
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"{target} exists: versions are immutable, pick a new name")
    if workflow is not None and workflow.schema != model.schema:
        raise ValueError("the workflow's schema differs from the model's: save the workflow "
                         "the model was built from (Workflow.schema)")
    with new_version_dir(target) as tmp:
        save_model(model, str(tmp / WEIGHTS_FILE))
        meta = {"created": utc_stamp(),
                "workflow_fingerprint": workflow.fingerprint if workflow else None,
                **dict(info or {})}
        _json(tmp / CONFIG_FILE, {
            "format": CHECKPOINT_FORMAT,
            "model": model.config.to_dict(),
            "schema": model.schema.to_dict(),
            "has_item_counts": model.next_item.sampler_probs is not None,
            "info": meta,
        })
        _json(tmp / METRICS_FILE, dict(metrics or {}))
        if workflow is not None:
            workflow.save(tmp / WORKFLOW_DIR)
    logger.info("saved model version %s", target)
    return target


def load_checkpoint(directory: str | os.PathLike[str],
                    device: torch.device | str = "cpu") -> Checkpoint:
    """Read a version directory; the model comes back in eval mode on ``device``."""
    root = Path(directory)
    try:
        doc = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: no {CONFIG_FILE}: not a model version") from None
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{root}: format {doc.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    schema = Schema.from_dict(doc["schema"])
    config = ModelConfig.from_dict(doc["model"])
    counts = None
    if doc.get("has_item_counts"):
        # the proposal is not saved (training-time data); inference never samples
        counts = torch.ones(int(schema.item_id_feature.cardinality or 0))
    model = SessionModel(schema, config, item_counts=counts)
    load_model(model, str(root / WEIGHTS_FILE), strict=True)  # raises on any key mismatch
    model.to(device).eval()
    workflow = None
    if (root / WORKFLOW_DIR).is_dir():
        workflow = Workflow.load(root / WORKFLOW_DIR)
        if workflow.fingerprint != doc["info"].get("workflow_fingerprint"):
            raise ValueError(f"{root}: the workflow does not belong to this model version")
    metrics_path = root / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return Checkpoint(root, model, workflow, metrics, doc["info"])
