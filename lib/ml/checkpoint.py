"""Checkpoints and model files: atomic torch saves, the per-epoch log, weights of a model folder."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from lib.io.atomic import atomic_path, write_text
from lib.ml.plans import Plan, plan_from_dict


def config_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_torch(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


LOG_FIELDS = ["stage", "epoch", "lr", "train_loss", "train_dice_fg", "train_dice_mean", "val_loss",
              "val_dice_fg", "val_dice_mean", "epoch_s", "cpu_s", "elapsed_s"]


def write_log(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the per-epoch log rows as CSV (atomic)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return write_text(path, buf.getvalue())


def load_weights(model_dir: str | Path) -> tuple[Plan, dict[str, dict[str, Any]]]:
    """Plan and per-stage state dicts of a trained model folder (``model.pt`` + ``plan.json``)."""
    model_dir = Path(model_dir)
    path = model_dir / "model.pt" if model_dir.is_dir() else model_dir
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model (model.pt) found")
    blob = load_torch(path)
    return plan_from_dict(blob["plan"]), blob["weights"]


def init_state(net, state: dict[str, Any], source: str) -> list[str]:
    """Load matching tensors of ``state`` into ``net``; return the names skipped (shape differs)."""
    own = net.state_dict()
    skipped = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    own.update({k: v for k, v in state.items() if k in own and own[k].shape == v.shape})
    net.load_state_dict(own)
    missing = [k for k in own if k not in state]
    if missing and len(missing) == len(own):
        raise ValueError(f"{source}: no weights match the network")
    return skipped + missing
