"""A case that cannot be scored is a failed case: in every table and mean, scored like a missing
prediction (never better), listed with its file and fault; the results are written as one set."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lib import evaluation as evaluate
from lib.core.parallel import CaseFailuresError
from lib.evaluation import folders as folders_mod
from lib.io import save_volume
from tests.helpers.label_boxes import AFFINE, _prediction, _truth


def _run(gt_dir, pred_dir, **kw):
    return evaluate.evaluate_folders(gt_dir, pred_dir, None, workers=0, progress=False, on_error="collect", **kw)


def _means(s):
    mov, mos = s["mean_of_vertebrae"], s["mean_of_spine"]
    return {"dice": mov["dice"]["mean"], "nsd": mov["nsd"]["mean"], "id": mov["identification_rate_pooled"],
            "spine": mos["dice"]["mean"], "missed": mov["missed"],
            **{f"{k} dice": v["dice"]["mean"] for k, v in s["mean"].items()}}


def _two_cases(tmp_path):
    """Case a (prediction close to truth) and case b (truth only, prediction written by the test)."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    save_volume(_truth(0), AFFINE, gt_dir / "a_seg.nii.gz")
    save_volume(_prediction(_truth(0), 0), AFFINE, pred_dir / "a.nii.gz")
    save_volume(_truth(1), AFFINE, gt_dir / "b_seg.nii.gz")
    return gt_dir, pred_dir


def test_label_99_truth_is_a_failed_case_scored_zero(tmp_path):
    gt_dir, pred_dir = _two_cases(tmp_path)
    save_volume(_truth(1), AFFINE, pred_dir / "b.nii.gz")  # a perfect prediction ...
    _, clean = _run(gt_dir, pred_dir)
    bad = _truth(1)
    bad[0, 0, 0] = 99  # ... of a truth holding a label the table cannot report
    save_volume(bad, AFFINE, gt_dir / "b_seg.nii.gz")
    df, s = _run(gt_dir, pred_dir)
    assert s["n_failed"] == 1
    assert s["n_cases"] == 2
    [f] = s["failed_cases"]
    assert (f["case_id"], f["kind"]) == ("b", "unknown_label")
    assert f["file"].endswith("b_seg.nii.gz")
    assert "b_seg.nii.gz" in f["message"]
    assert "[99]" in f["message"]
    rows = df[df["case_id"] == "b"]
    assert set(rows["label"]) == {0, 1, 2, 3, 4, 5}  # every vertebra the truth holds, plus the spine
    assert (rows["status"] == "failed").all()
    assert rows["failed"].all()
    assert (rows["dice"] == 0).all()
    assert rows["failure"].str.contains("b_seg.nii.gz").all()
    assert not df.loc[df["case_id"] == "a", "failed"].any()
    _, without = evaluate.evaluate_pairs([("a", gt_dir / "a_seg.nii.gz", pred_dir / "a.nii.gz")], workers=0,
                                         progress=False)
    assert s["mean_of_vertebrae"]["dice"]["mean"] < without["mean_of_vertebrae"]["dice"]["mean"]
    assert s["mean_of_vertebrae"]["dice"]["mean"] < clean["mean_of_vertebrae"]["dice"]["mean"]
    assert s["mean"]["C1"]["dice"]["n"] == 2  # counted, not dropped
    assert s["mean"]["C1"]["failed"] == 1
    entry = next(c for c in s["metric_per_case"] if c["case_id"] == "b")
    assert entry["failed"]
    assert "99" in entry["failure"]


def test_empty_truth_is_a_failed_case_counted(tmp_path):
    gt_dir, pred_dir = _two_cases(tmp_path)
    save_volume(np.zeros_like(_truth(1)), AFFINE, gt_dir / "b_seg.nii.gz")
    save_volume(_truth(1), AFFINE, pred_dir / "b.nii.gz")
    df, s = _run(gt_dir, pred_dir)
    assert [(f["case_id"], f["kind"]) for f in s["failed_cases"]] == [("b", "empty")]
    rows = df[df["case_id"] == "b"]
    assert list(rows["label"]) == [0]  # only the spine row: nothing else to score
    assert rows["dice"].tolist() == [0.0]
    assert s["mean_of_spine"]["dice"]["n"] == 2
    assert s["mean_of_spine"]["failed"] == 1


def test_unreadable_truth_gets_one_spine_row(tmp_path):
    gt_dir, pred_dir = _two_cases(tmp_path)
    (gt_dir / "b_seg.nii.gz").write_bytes(b"not a nifti file")
    save_volume(_truth(1), AFFINE, pred_dir / "b.nii.gz")
    df, s = _run(gt_dir, pred_dir)
    assert s["failed_cases"][0]["kind"] == "unreadable"
    rows = df[df["case_id"] == "b"]
    assert rows[["label", "status", "dice"]].values.tolist() == [[0, "failed", 0.0]]


@pytest.mark.parametrize("fault", ["truncated", "affine"])
def test_broken_prediction_scores_exactly_like_a_missing_one(tmp_path, fault):
    gt_dir, pred_dir = _two_cases(tmp_path)
    _, missing = _run(gt_dir, pred_dir)  # b has no prediction
    assert missing["missing_cases"] == ["b"]
    if fault == "truncated":
        save_volume(_truth(1), AFFINE, pred_dir / "b.nii.gz")
        data = (pred_dir / "b.nii.gz").read_bytes()
        (pred_dir / "b.nii.gz").write_bytes(data[: len(data) // 2])
    else:
        shifted = AFFINE.copy()
        shifted[2, 3] += 1.0  # the right labels, 1 mm off the truth's grid
        save_volume(_truth(1), shifted, pred_dir / "b.nii.gz")
    df, s = _run(gt_dir, pred_dir)
    [f] = s["failed_cases"]
    assert f["kind"] == ("unreadable" if fault == "truncated" else "affine")
    assert f["file"].endswith("b.nii.gz")
    assert "b.nii.gz" in f["message"]
    assert s["n_missing"] == 0
    assert s["n_failed"] == 1
    assert (df.loc[df["case_id"] == "b", "dice"] == 0).all()
    assert _means(s) == pytest.approx(_means(missing), nan_ok=True)
    # on_error="raise" lists the failure after every case ran
    with pytest.raises(CaseFailuresError, match=r"b\.nii\.gz"):
        evaluate.evaluate_folders(gt_dir, pred_dir, None, workers=0, progress=False, on_error="raise")


def test_exclude_drops_missing_but_never_failed_cases(tmp_path):
    gt_dir, pred_dir = _two_cases(tmp_path)
    save_volume(_truth(2), AFFINE, gt_dir / "c_seg.nii.gz")
    save_volume(_truth(2).astype(np.float32) + 0.5, AFFINE, pred_dir / "c.nii.gz")  # not integer
    df, s = _run(gt_dir, pred_dir, missing="exclude")
    assert set(df["case_id"]) == {"a", "c"}
    assert s["missing_cases"] == ["b"]
    assert [(f["case_id"], f["kind"]) for f in s["failed_cases"]] == [("c", "not_integer")]


def test_table2_counts_failed_cases_and_the_markdown_marks_them(tmp_path):
    gt_dir, pred_dir = _two_cases(tmp_path)
    save_volume(_truth(2), AFFINE, gt_dir / "c_seg.nii.gz")
    save_volume(_truth(1)[:, :, :-3], AFFINE, pred_dir / "b.nii.gz")  # wrong shape
    _, s = _run(gt_dir, pred_dir)
    t = evaluate.build_table2({"test_public": s})
    assert t.loc["Cases", "test_public DSC"] == 3
    assert t.loc["Failed", "test_public DSC"] == 1
    assert t.loc["Missing", "test_public DSC"] == 1
    md = evaluate.table2_markdown(t)
    marker = next(line for line in md.splitlines() if line.startswith("⚠"))
    assert marker.startswith("⚠ test_public: 1 failed case (scored Dice 0): b — ")
    assert "b.nii.gz" in marker
    assert "shape" in marker
    assert "| Failed | 1 |" in md


def test_results_are_one_set_with_a_manifest(tmp_path, monkeypatch):
    gt_dir, pred_dir = _two_cases(tmp_path)
    out = tmp_path / "out"
    df, s = evaluate.evaluate_folders(gt_dir, pred_dir, out, workers=0, progress=False)
    manifest = json.loads((out / evaluate.RESULTS_MANIFEST).read_text())
    assert set(manifest["files"]) == {evaluate.PER_CASE_CSV, evaluate.SUMMARY_JSON, evaluate.TABLE2_CSV,
                                      evaluate.TABLE2_MD}
    back, summary = evaluate.read_results(out)
    assert len(back) == len(df)
    assert summary["n_cases"] == s["n_cases"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    old = {f: (out / f).read_bytes() for f in manifest["files"]}

    # a crash while moving the third file into place: the previous set stays, consistent
    save_volume(_prediction(_truth(1), 1), AFFINE, pred_dir / "b.nii.gz")
    real = folders_mod._move_into_place
    calls = []

    def crash_on_third(src, dst):
        calls.append(dst.name)
        if len(calls) == 3:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(folders_mod, "_move_into_place", crash_on_third)
    with pytest.raises(OSError, match="disk full"):
        evaluate.evaluate_folders(gt_dir, pred_dir, out, workers=0, progress=False)
    assert calls[2] == evaluate.TABLE2_CSV
    assert {f: (out / f).read_bytes() for f in manifest["files"]} == old
    _, summary = evaluate.read_results(out)
    assert summary["n_missing"] == 1  # the old run's

    # a crash that kills the process midway leaves no manifest over mixed files: read_results refuses
    (out / evaluate.RESULTS_MANIFEST).unlink()
    with pytest.raises(evaluate.ResultsError, match="no results manifest"):
        evaluate.read_results(out)
    monkeypatch.setattr(folders_mod, "_move_into_place", real)
    evaluate.evaluate_folders(gt_dir, pred_dir, out, workers=0, progress=False)
    (out / evaluate.TABLE2_MD).write_text("edited by hand\n")
    with pytest.raises(evaluate.ResultsError, match="table2.md: does not match"):
        evaluate.read_results(out)


def test_cli_exit_status_3_lists_each_failed_case(tmp_path):
    gt_dir, pred_dir = _two_cases(tmp_path)
    (pred_dir / "b.nii.gz").write_bytes(b"\x1f\x8b truncated")
    out = tmp_path / "cli_out"
    proc = subprocess.run([sys.executable, "-m", "lib.evaluation", "--gt", str(gt_dir), "--pred", str(pred_dir),
                           "--out", str(out), "--workers", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("failed case")]
    assert len(lines) == 1
    assert lines[0].startswith("failed case b: ")
    assert "b.nii.gz" in lines[0]
    assert "[unreadable]" in lines[0]
    assert "Traceback" not in proc.stderr
    assert evaluate.read_results(out)[1]["n_failed"] == 1
