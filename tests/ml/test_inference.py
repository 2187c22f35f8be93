"""lib.ml.inference: predictions in the input's geometry, a trained toy model, many cases."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from lib.io import load_volume, save_volume
from lib.ml import inference, losses, planning, trainer
from tests.helpers.toy_cases import make_toy_case, toy_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny three-stage model trained for a few seconds on toy spines (shared by the tests)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("infer_model")
    cases = toy_cases(root / "d", 4)
    plan = planning.plan_experiment(cases, "synthetic", base_filters=4, max_filters=16, coarse_spacing_mm=4.0,
                                 roi_margin_mm=8.0, deep_supervision=1)
    res = trainer.train(cases, root / "model", plan, max_epochs=30, iterations_per_epoch=5, seed=0, progress=False,
                      device="cpu")
    return res.model_dir, cases


def _lps(spacing, shape, origin):
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [origin[0] + spacing[0] * (shape[0] - 1), origin[1] + spacing[1] * (shape[1] - 1), origin[2]]
    return aff


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_prediction_has_the_input_shape_and_affine(trained, tmp_path, orientation):
    model_dir, cases = trained
    ras = load_volume(cases[3][1])
    a = ras.array
    if orientation == "RAS":
        data, aff = a, ras.affine
    elif orientation == "LPS":
        data, aff = a[::-1, ::-1, :], _lps(ras.spacing, a.shape, ras.affine[:3, 3])
    else:  # oblique and permuted: file axis 0 runs mostly along z
        rot = Rotation.from_euler("xyz", [10, -6, 20], degrees=True).as_matrix()
        aff = np.eye(4)
        aff[:3, :3] = (rot @ np.diag(ras.spacing))[:, [2, 0, 1]]
        aff[:3, 3] = [-20.0, 5.0, 40.0]
        data = np.transpose(a, (2, 0, 1))
    src = tmp_path / f"img_{orientation}.nii.gz"
    save_volume(np.ascontiguousarray(data), aff, src)
    out = inference.predict_case(model_dir, src, tmp_path / f"pred_{orientation}.nii.gz")
    img_in, img_out = nib.load(str(src)), nib.load(str(out))
    assert img_out.shape == img_in.shape
    assert np.allclose(img_out.affine, img_in.affine, atol=1e-5)
    assert img_out.get_data_dtype() == np.uint8
    pred = np.asarray(img_out.dataobj)
    assert pred.any()
    if orientation != "RAS":  # same anatomy, same prediction once back in RAS order
        ref = np.asarray(nib.load(str(inference.predict_case(model_dir, cases[3][1], tmp_path / "pred_ref.nii.gz"))).dataobj)
        back = load_volume(out).array
        assert np.array_equal(back, ref)


def test_trained_toy_model_finds_the_spine(trained, tmp_path):
    model_dir, cases = trained
    make_toy_case(tmp_path / "new.nii.gz", tmp_path / "new_seg.nii.gz", seed=42)
    pred = load_volume(inference.predict_case(model_dir, tmp_path / "new.nii.gz", tmp_path / "p.nii.gz")).array
    gt = load_volume(tmp_path / "new_seg.nii.gz").array
    spine, _ = losses.dice_scores(pred > 0, gt > 0, 2)
    assert spine > 0.6
    assert set(np.unique(pred)) <= {0, 20, 21, 22, 23}


def test_predict_cases_parallel_collects_failures_and_skips_done(trained, tmp_path):
    model_dir, cases = trained
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(Path(cases[0][1]).read_bytes()[:200])  # truncated gzip
    items = [(c[0], c[1], str(tmp_path / f"{c[0]}_seg.nii.gz")) for c in cases[:2]]
    items.append(("broken", str(bad), str(tmp_path / "broken_seg.nii.gz")))
    res = inference.predict_cases(model_dir, items, workers=2, progress=False)
    assert sorted(res.values) == ["t0", "t1"], res.failures
    assert res.failed_ids == ["broken"]
    assert "broken.nii.gz" in res.failures[0].message
    stamp = (tmp_path / "t0_seg.nii.gz").stat().st_mtime_ns
    inference.predict_cases(model_dir, items[:1], workers=0, progress=False)
    assert (tmp_path / "t0_seg.nii.gz").stat().st_mtime_ns == stamp  # skipped
    inference.predict_cases(model_dir, items[:1], workers=0, overwrite=True, progress=False)
    assert (tmp_path / "t0_seg.nii.gz").stat().st_mtime_ns != stamp


def test_single_stage_plan_predicts_on_its_own_grid(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    fp = planning.extract_fingerprint(cases)
    plan = planning.plan_experiment(fp, "paper", base_filters=4, max_filters=8, memory_fraction=0.01,
                                 target_spacing_mm=[3.0, 3.0, 3.0], deep_supervision=1,
                                 training={"optimizer": "adamw", "lr": 3e-3, "amp": False, "num_workers": 0})
    res = trainer.train(cases, tmp_path / "m", plan, max_epochs=2, iterations_per_epoch=2, progress=False)
    m = inference.load_model(res.model_dir, "cpu")
    vol = load_volume(cases[0][1])
    lab = inference.predict_volume(m, vol.array, vol.spacing, tta=True)
    assert lab.shape == vol.shape
    assert lab.dtype == np.uint8
    assert set(np.unique(lab)) <= {0, 20, 21, 22, 23}
