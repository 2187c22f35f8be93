"""The paper's method for real (slow; needs the ``nnunet`` extra): the ci profile through 00-03,
then the real 04 notebook with ``backend: nnunetv2`` — our export, nnU-Net v2's integrity check,
its planning and preprocessing, a few training iterations of its trainer on the CPU, its
predictor on every test case — and our evaluation reading the predictions; then 04 again with the
cascade and ``side_by_side: true``, which writes the comparison table."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from lib.app import pipeline
from lib.core.params import PARAMS_DIR
from lib.core.paths import for_profile
from lib.ml import nnunet

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(nnunet.missing_reason() is not None,
                                 reason=f"{nnunet.missing_reason()} (then make test-all runs it)")]

NNUNET_CI = {"backend": "nnunetv2", "init_from": "scratch", "nnunet_plan": "reduced", "nnunet_epochs": 1,
             "nnunet_iterations": 2, "nnunet_target_spacing_mm": 4.0, "nnunet_gpu_memory_gb": 1.0}


def _params(tmp_path, **changes):
    p = tmp_path / "params"
    if not p.exists():
        shutil.copytree(PARAMS_DIR, p)
    f = p / "ci" / "04_benchmark.yaml"
    values = yaml.safe_load(f.read_text())
    values.update(changes)
    f.write_text(yaml.safe_dump(values, sort_keys=False))
    return p


def _same_grid(pred, image) -> None:
    a, b = nib.load(str(pred)), nib.load(str(image))
    assert a.shape == b.shape, pred
    assert np.allclose(a.affine, b.affine, atol=1e-3), (pred, a.affine, b.affine)


def test_04_with_nnunet_v2_from_export_to_table2_then_side_by_side(tmp_path):
    params_dir = _params(tmp_path, **NNUNET_CI)
    log: list[str] = []
    ran = pipeline.run("ci", stages_spec="00-04", params_dir=params_dir, report=False, log=log.append)
    assert ran["04_benchmark"] == "ran", "\n".join(log)
    paths = for_profile("ci")
    stage = paths.stage("04_benchmark")
    rec = json.loads((stage / "run_record.json").read_text())
    assert rec["extra"]["backend"] == "nnunetv2"
    integrity = rec["extra"]["nnunet_integrity"]
    assert integrity["passed"]
    assert integrity["errors"] == []
    train = rec["extra"]["train"]
    assert (train["backend"], train["plan"]["kind"], train["epochs"]) == ("nnunetv2", "reduced", 1)
    assert train["plan"]["spacing"] == [4.0, 4.0, 4.0]
    model = stage / "nnunet" / "nnUNet_results" / "Dataset501_CTSpine1K" / \
        "nnUNetTrainerSpine1k__nnUNetPlans_spine1k_reduced__3d_fullres"
    assert (model / "fold_all" / "checkpoint_final.pth").exists()
    assert sorted(p.name for p in (stage / "nnunet").iterdir()) == ["nnUNet_preprocessed", "nnUNet_raw",
                                                                   "nnUNet_results", "nnunet.log"]
    # every test case predicted by nnU-Net, on its input's grid, and scored by our evaluation
    scores = pd.read_csv(stage / "tables" / "case_scores.csv", dtype={"case_id": str})
    assert len(scores) >= 3
    assert not scores["failed"].astype(bool).any()
    for _, row in scores.iterrows():
        pred = stage / "predictions" / row["set"] / f"{row['case_id']}_seg.nii.gz"
        rows = pd.read_csv(stage / "evaluation" / row["set"] / "metrics_per_case.csv", dtype={"case_id": str})
        truth = rows.loc[rows["case_id"] == row["case_id"], "reference_file"].iloc[0]  # on its CT's grid
        assert rows.loc[rows["case_id"] == row["case_id"], "prediction_file"].iloc[0] == str(pred)
        _same_grid(pred, truth)
    table2 = pd.read_csv(stage / "tables" / "table2.csv", index_col=0)
    assert "Mean of Vertebrae" in table2.index
    assert (stage / "figures" / "training_curves.png").exists()  # nnU-Net's progress plot

    # the same stage with the cascade and the side-by-side
    params_dir = _params(tmp_path, backend="cascade", init_from="annotation", side_by_side=True)
    ran = pipeline.run("ci", stages_spec="04", params_dir=params_dir, report=False, log=log.append)
    assert ran["04_benchmark"] == "ran", "\n".join(log)
    table = pd.read_csv(stage / "tables" / "backend_comparison.csv")
    assert set(table["backend"]) == {"cascade", "nnunetv2"}
    sets = set(table.loc[table["backend"] == "cascade", "set"])
    assert set(table.loc[table["backend"] == "nnunetv2", "set"]) == sets
    assert table["mean_vertebra_dice"].between(0, 1).all()
    assert (table["train_s"] > 0).all()
    assert list((stage / "predictions_nnunetv2").glob("*/*_seg.nii.gz"))
