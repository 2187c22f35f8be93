"""Small on-disk spines for the annotation tests (also run as a subprocess by the kill test)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from lib.core.cases import Case
from lib.imaging.label_shift import relabel, variant_of
from lib.io import load_volume, save_volume
from lib.stages.annotation.ledger import Ledger
from lib.stages.annotation.loop import LoopConfig, run_rounds
from lib.stages.annotation.tiers import SimulatedTiers, case_rng

SHAPE = (16, 16, 64)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def spine_mask(labels_caudal_to_cranial: list[int], shape=SHAPE) -> np.ndarray:
    """Boxes stacked along z (axis 2, superior), one per label, a 2-voxel disc between them."""
    m = np.zeros(shape, np.uint8)
    z = 2
    for v in labels_caudal_to_cranial:
        m[4:12, 4:12, z:z + 8] = v
        z += 10
    return m


def make_cases(root: Path, n: int = 8) -> list[Case]:
    """n cases over three splits; every third one has an L6 (a variant)."""
    cases = []
    splits = ["trainset"] * (n - 4) + ["test_public"] * 2 + ["test_private"] * 2
    for i in range(n):
        cid = f"liver_{i:03d}"
        labs = [25, 24, 23, 22, 21, 20] if i % 3 == 0 else [24, 23, 22, 21, 20, 19]
        truth = spine_mask(labs)
        rng = np.random.default_rng(i)
        ct = np.where(truth > 0, 300, 40).astype(np.int16) + rng.normal(0, 5, SHAPE).astype(np.int16)
        split = splits[i]
        img = root / "release" / split / "data" / f"{cid}.nii.gz"
        save_volume(ct, AFFINE, img)
        save_volume(truth, AFFINE, root / "oracle" / f"{cid}_seg.nii.gz")
        cases.append(Case(cid, img, root / "release" / split / "gt" / f"{cid}_seg.nii.gz", split))
    return cases


class FakeModel:
    """A stand-in model whose quality grows with its version: a deterministic degradation of
    the truth (boundary noise that shrinks with the version; an L6 case is shifted by one
    level until version 2, the paper's dislocation)."""

    def __init__(self, root: Path):
        self.root = root

    def predict(self, model_path: Path, image_path: Path, out_path: Path) -> None:
        version = json.loads(Path(model_path).read_text())["version"]
        cid = image_path.name.replace(".nii.gz", "")
        truth = load_volume(self.root / "oracle" / f"{cid}_seg.nii.gz").array.astype(np.uint8)
        rng = case_rng(version, cid, 0)
        pred = truth.copy()
        if variant_of(truth) == "L6" and version < 2:
            pred = relabel(truth, {v: -1 for v in np.unique(truth) if v})
        noise = rng.random(truth.shape) < 0.08 / (1 + version)
        edge = (truth > 0) ^ (np.roll(truth, 1, axis=0) > 0)
        pred[noise & edge] = 0
        save_volume(pred, AFFINE, out_path)

    def finetune(self, cases, init: Path, out_dir: Path, round_: int) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        v = json.loads(Path(init).read_text())["version"] + 1
        p = out_dir / "model.json"
        time.sleep(0.2)
        p.write_text(json.dumps({"version": v, "trained_on": sorted(c.case_id for c in cases)}))
        return p

    def truth(self, case: Case, img) -> np.ndarray:
        return load_volume(self.root / "oracle" / f"{case.case_id}_seg.nii.gz").array.astype(np.uint8)


def run(root: Path, slow: float = 0.0) -> None:
    cases = make_cases(root) if not (root / "release").exists() else [
        Case(p.name.replace(".nii.gz", ""), p, p.parent.parent / "gt" / p.name.replace(".nii.gz", "_seg.nii.gz"),
             p.parent.parent.name)
        for p in sorted((root / "release").glob("*/data/*.nii.gz"))]
    model0 = root / "model0.json"
    if not model0.exists():
        model0.write_text(json.dumps({"version": 0}))
    fake = FakeModel(root)

    def predict(m, i, o):
        time.sleep(slow)
        fake.predict(m, i, o)

    with Ledger(root / "ledger.sqlite") as ledger:
        run_rounds(ledger, cases, LoopConfig(batch_size=2, seed=7), model0, predict, fake.finetune,
                     fake.truth, SimulatedTiers(seed=7), root / "work", log=lambda m: None)


if __name__ == "__main__":
    run(Path(sys.argv[1]), slow=float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
