"""lib.evaluation.folders: matching, per-case tables, summaries, errors naming both files, Dask."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lib import evaluation as evaluate
from lib import metrics
from lib.core.labels import name
from lib.core.parallel import CaseFailuresError
from lib.io import save_volume
from tests.helpers.label_boxes import AFFINE, SPACING, _prediction, _truth


def test_match_cases_pairs_by_id_and_lists_unmatched(folders):
    gt_dir, pred_dir = folders
    save_volume(np.zeros((4, 4, 4), np.uint8), AFFINE, pred_dir / "stray.nii.gz")
    pairs, unmatched = evaluate.match_cases(gt_dir, pred_dir)
    assert [p[0] for p in pairs] == ["HN_P000", "HN_P001", "HN_P002"]
    assert pairs[0][2].name == "HN_P000.nii.gz"
    assert pairs[2][2] is None
    assert [p.name for p in unmatched] == ["stray.nii.gz"]


@pytest.mark.parametrize(("side", "what"), [("gt", "truths"), ("pred", "predictions")])
def test_two_files_with_one_case_id_are_an_error_naming_both(folders, side, what):
    gt_dir, pred_dir = folders
    folder, name_ = (gt_dir, "HN_P000.nii.gz") if side == "gt" else (pred_dir, "HN_P000_seg.nii")
    save_volume(np.zeros((4, 4, 4), np.uint8), AFFINE, folder / name_)
    with pytest.raises(ValueError, match=f"two {what} for case 'HN_P000'") as err:
        evaluate.match_cases(gt_dir, pred_dir)
    assert name_ in str(err.value)
    assert str(folder) in str(err.value)


def test_identical_names_are_accepted(tmp_path):
    gt = _truth(4)
    save_volume(gt, AFFINE, tmp_path / "gt" / "liver_7.nii.gz")
    save_volume(gt, AFFINE, tmp_path / "pred" / "liver_7.nii.gz")
    df, summary = evaluate.evaluate_folders(tmp_path / "gt", tmp_path / "pred", None, workers=0,
                                            progress=False)
    assert summary["n_cases"] == 1
    assert summary["n_missing_cases"] == 0
    assert (df["dice"] == 1.0).all()
    assert (df["hd95"] == 0.0).all()


def test_evaluate_folders_writes_tables_and_counts_missing_case(folders, tmp_path):
    gt_dir, pred_dir = folders
    out = tmp_path / "out"
    df, summary = evaluate.evaluate_folders(gt_dir, pred_dir, out, labels=range(1, 26), hd95="max",
                                            workers=0, progress=False)
    for f in (evaluate.PER_CASE_CSV, evaluate.SUMMARY_JSON, evaluate.TABLE2_CSV, evaluate.TABLE2_MD):
        assert (out / f).is_file(), f
    # the missing prediction is listed, counted, and scored as empty
    assert summary["missing_cases"] == ["HN_P002"]
    assert summary["n_missing_cases"] == 1
    assert summary["n_cases"] == 3
    assert summary["set_name"] == "test_public"
    miss = df[df["case_id"] == "HN_P002"]
    assert len(miss) == 6
    assert miss["prediction_missing"].all()
    assert (miss.loc[miss["label"] > 0, "status"] == metrics.MISSED).all()
    assert (miss["dice"] == 0).all()
    assert miss["hd95"].isna().all()
    # C1 in 3 cases; L1 (label 5) missed everywhere
    assert summary["mean"]["C1"]["dice"]["n"] == 3
    assert summary["mean"]["C1"]["missed"] == 1
    assert summary["mean"]["C5"]["missed"] == 3
    assert summary["mean"]["C5"]["hd95"]["n"] == 0
    assert summary["mean_of_vertebrae"]["missed"] == 5 + 3 - 1
    # the JSON on disk is strict, states the definition and holds every case
    on_disk = json.loads((out / evaluate.SUMMARY_JSON).read_text())
    assert on_disk["hd95_definition"] == "max"
    assert "MONAI" in on_disk["hd95_definition_text"]
    assert [c["case_id"] for c in on_disk["metric_per_case"]] == ["HN_P000", "HN_P001", "HN_P002"]
    assert on_disk["mean"]["C5"]["hd95"]["mean"] is None
    csv = pd.read_csv(out / evaluate.PER_CASE_CSV)
    assert len(csv) == len(df)
    assert set(csv["hd95_definition"]) == {"max"}


def test_means_follow_the_stated_definitions(folders):
    gt_dir, pred_dir = folders
    df, s = evaluate.evaluate_folders(gt_dir, pred_dir, None, workers=0, progress=False)
    vert = df[df["label"] > 0]
    per_label = vert.groupby("label")["dice"].mean()
    assert s["mean_of_vertebrae"]["dice"]["mean"] == pytest.approx(per_label.mean())
    assert s["mean_of_vertebrae"]["dice"]["n"] == 5
    hd = vert.groupby("label")["hd95"].mean().dropna()
    assert s["mean_of_vertebrae"]["hd95"]["mean"] == pytest.approx(hd.mean())
    assert s["mean"]["C2"]["dice"]["sd"] == pytest.approx(vert[vert["label"] == 2]["dice"].std(ddof=1))
    spine = df[df["label"] == 0]
    assert s["mean_of_spine"]["dice"]["mean"] == pytest.approx(spine["dice"].mean())
    assert s["mean_of_vertebrae"]["identification_rate_pooled"] == pytest.approx(vert["identified"].mean())
    # missing="exclude" lists and counts the case but leaves it out of the means
    df2, s2 = evaluate.evaluate_folders(gt_dir, pred_dir, None, workers=0, missing="exclude", progress=False)
    assert s2["n_missing_cases"] == 1
    assert "HN_P002" not in set(df2["case_id"])
    assert s2["mean"]["C1"]["dice"]["n"] == 2
    assert s2["mean_of_vertebrae"]["dice"]["mean"] > s["mean_of_vertebrae"]["dice"]["mean"]


def test_shape_or_affine_mismatch_names_both_files(tmp_path):
    gt = _truth(1)
    save_volume(gt, AFFINE, tmp_path / "gt" / "a_seg.nii.gz")
    save_volume(gt[:, :, :-2], AFFINE, tmp_path / "pred" / "a.nii.gz")
    save_volume(gt, AFFINE, tmp_path / "gt" / "b_seg.nii.gz")
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    save_volume(gt, shifted, tmp_path / "pred" / "b.nii.gz")
    with pytest.raises(CaseFailuresError) as err:
        evaluate.evaluate_folders(tmp_path / "gt", tmp_path / "pred", None, workers=0, progress=False)
    text = str(err.value)
    for f in ("a_seg.nii.gz", "a.nii.gz", "b_seg.nii.gz", "b.nii.gz"):
        assert f in text
    assert "shape" in text
    assert "affine" in text
    _, s = evaluate.evaluate_folders(tmp_path / "gt", tmp_path / "pred", None, workers=0,
                                     on_error="collect", progress=False)
    assert [f["case_id"] for f in s["failed_cases"]] == ["a", "b"]


def test_float_masks_are_read_and_non_integer_values_rejected(tmp_path):
    gt = _truth(2)
    save_volume(gt, AFFINE, tmp_path / "gt" / "c_seg.nii.gz")
    save_volume(gt.astype(np.float32), AFFINE, tmp_path / "pred" / "c.nii.gz")
    rows = evaluate.evaluate_pair("c", tmp_path / "gt" / "c_seg.nii.gz", tmp_path / "pred" / "c.nii.gz")
    assert all(r["dice"] == 1.0 for r in rows)
    save_volume(gt.astype(np.float32) + 0.25, AFFINE, tmp_path / "pred" / "c.nii.gz")
    with pytest.raises(ValueError, match=r"c\.nii\.gz.*non-integer"):
        evaluate.evaluate_pair("c", tmp_path / "gt" / "c_seg.nii.gz", tmp_path / "pred" / "c.nii.gz")


def test_evaluate_pairs_in_memory_matches_metrics(folders):
    gt_dir, pred_dir = folders
    pairs = [("x", gt_dir / "HN_P000_seg.nii.gz", pred_dir / "HN_P000.nii.gz")]
    df, s = evaluate.evaluate_pairs(pairs, labels=range(1, 6), hd95="pooled", workers=0, progress=False)
    ref = metrics.evaluate_case(_truth(0), _prediction(_truth(0), 0), SPACING, labels=range(1, 6))
    assert list(df["label"]) == [r["label"] for r in ref]
    np.testing.assert_allclose(df["hd95"].to_numpy(float), [r["hd95"] for r in ref], equal_nan=True)
    # centroids are in world mm through the affine
    c1 = df[df["label"] == 1].iloc[0]
    expected = metrics.centroids_mm(_truth(0), AFFINE)[1]
    assert (c1["gt_centroid_x_mm"], c1["gt_centroid_y_mm"], c1["gt_centroid_z_mm"]) == pytest.approx(expected)
    assert s["n_cases"] == 1
    assert s["hd95_definition"] == "pooled"


def test_dask_local_cluster(folders):
    distributed = pytest.importorskip("distributed")
    gt_dir, pred_dir = folders
    local, _ = evaluate.evaluate_folders(gt_dir, pred_dir, None, workers=0, progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        remote, s = evaluate.evaluate_folders(gt_dir, pred_dir, None, scheduler=cluster.scheduler_address,
                                              progress=False)
    pd.testing.assert_frame_equal(local, remote)
    assert s["n_missing_cases"] == 1


def test_label_names_in_summary_follow_lib_labels(folders):
    gt_dir, pred_dir = folders
    _, s = evaluate.evaluate_folders(gt_dir, pred_dir, None, workers=0, progress=False)
    assert list(s["mean"]) == [name(v) for v in range(1, 6)]


def test_same_grid_in_another_axis_order_is_accepted(tmp_path):
    gt = _truth(3)
    save_volume(gt, AFFINE, tmp_path / "gt" / "d_seg.nii.gz")
    flipped = AFFINE.copy()  # the same voxels written with the first axis reversed (L instead of R)
    flipped[:3, 0] *= -1
    flipped[:3, 3] = AFFINE[:3, 3] + AFFINE[:3, 0] * (gt.shape[0] - 1)
    save_volume(gt[::-1], flipped, tmp_path / "pred" / "d.nii.gz")
    rows = evaluate.evaluate_pair("d", tmp_path / "gt" / "d_seg.nii.gz", tmp_path / "pred" / "d.nii.gz")
    assert rows
    assert all(r["dice"] == 1.0 for r in rows)
