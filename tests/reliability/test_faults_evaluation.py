"""Fault corpus, evaluation (``spine1k evaluate`` as a user runs it): every truth is a case; a case
that cannot be scored is scored as a failure (never better than a missing prediction), named with
its file and fault, and the exit status says so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.evaluation import cli, read_results
from tests.reliability import data
from tests.reliability.corpus import Fault, faults


def _folders(run, n=3):
    gt, pred = run.tmp / "gt", run.tmp / "pred"
    for i in range(1, n + 1):
        _, msk = data.pair(run.tmp / "img", f"c{i}")
        msk.rename(gt.mkdir(parents=True, exist_ok=True) or gt / msk.name)
        data.perfect_prediction(gt / msk.name, pred / f"c{i}.nii.gz")
    return gt, pred


def _evaluate(run, gt, pred, capsys=None):
    code = cli.main(["--gt", str(gt), "--pred", str(pred), "--out", str(run.tmp / "out"), "--workers", "0",
                     "--no-progress"])
    per_case, summary = read_results(run.tmp / "out") if code in (0, 3) else (None, None)
    return code, per_case, summary


def _case_fault(where, mutate, kind, *, dice_c2=0.0):
    """c2's truth or prediction gets ``mutate``; the case must be failed with ``kind``, scored
    ``dice_c2`` for every vertebra, and the mean must hold all three cases."""
    def check(run):
        gt, pred = _folders(run)
        mutate(gt / "c2_seg.nii.gz" if where == "truth" else pred / "c2.nii.gz")
        code, per_case, summary = _evaluate(run, gt, pred)
        assert code == cli.EXIT_FAILED_CASES
        [f] = summary["failed_cases"]
        assert f["case_id"] == "c2"
        assert f["kind"] == kind
        assert "c2" in f["file"]
        rows = per_case[per_case["case_id"] == "c2"]
        assert (rows["label"] == 0).sum() == 1  # its spine row, at least (an unreadable truth has no labels)
        assert (rows["dice"] == dice_c2).all()
        assert rows["status"].eq("failed").all()
        assert summary["mean_of_spine"]["dice"]["mean"] == pytest.approx((2 + dice_c2) / 3)
        if where == "prediction":  # every vertebra of the truth is in the per-label means, scored 0
            assert summary["mean_of_vertebrae"]["dice"]["mean"] == pytest.approx((2 + dice_c2) / 3)
        assert summary["n_cases"] == 3
        md = (run.tmp / "out" / "table2.md").read_text()
        assert "1 failed case" in md
        run.told(f"exit 3, c2 failed [{kind}], its rows Dice 0 in every mean (spine 2/3), Table 2 marks it")
    return check


def _other_shape(p):
    img = data.nib.load(str(p))
    data.write(p, np.asarray(img.dataobj)[:, :, :-4], img.affine, dtype=np.uint8)


def _nan_prediction(p):
    a = np.asarray(data.nib.load(str(p)).dataobj).astype(np.float32)
    a[0, 0, 0] = np.nan
    data.write(p, a, dtype=np.float32)


def _missing_prediction(run):
    gt, pred = _folders(run)
    (pred / "c2.nii.gz").unlink()
    code, per_case, summary = _evaluate(run, gt, pred)
    assert code == cli.EXIT_OK
    assert summary["missing_cases"] == ["c2"]
    assert summary["mean_of_vertebrae"]["dice"]["mean"] == pytest.approx(2 / 3)
    run.told("listed as missing, scored Dice 0 (counted, never skipped)")


def _two_predictions(run):
    gt, pred = _folders(run)
    data.perfect_prediction(gt / "c2_seg.nii.gz", pred / "c2_seg.nii.gz")
    code, _, _ = _evaluate(run, gt, pred)
    assert code == cli.EXIT_USAGE
    run.told("exit 2: two predictions for case 'c2', both files named")


def _no_folder(run, capsys=None):
    code = cli.main(["--gt", str(run.tmp / "nope"), "--pred", str(run.tmp), "--out", str(run.tmp / "o")])
    assert code == cli.EXIT_USAGE
    run.told("exit 2, one line: folder not found")


def _unmatched_prediction(run):
    gt, pred = _folders(run)
    data.perfect_prediction(gt / "c1_seg.nii.gz", pred / "c9.nii.gz")
    code, _, summary = _evaluate(run, gt, pred)
    assert code == cli.EXIT_OK
    assert [p.rsplit("/", 1)[-1] for p in summary["unmatched_predictions"]] == ["c9.nii.gz"]
    run.told("listed under unmatched_predictions")


def _edited_result(run):
    gt, pred = _folders(run)
    _evaluate(run, gt, pred)
    out = run.tmp / "out" / "metrics_per_case.csv"
    pd.read_csv(out).assign(dice=0.5).to_csv(out, index=False)
    with pytest.raises(ValueError, match="metrics_per_case.csv"):
        read_results(run.tmp / "out")
    run.told("read_results refuses the set: the manifest names the changed file")


FAULTS = faults(
    Fault("ev-01", "evaluate", "truth: label 99", _case_fault("truth", lambda p: data.set_label(p, 22, 99), "unknown_label")),
    Fault("ev-02", "evaluate", "truth: empty mask", _case_fault(
        "truth", lambda p: data.write(p, np.zeros((16, 16, 64), np.uint8)), "empty")),
    Fault("ev-03", "evaluate", "truth: truncated file", _case_fault("truth", data.truncate, "unreadable")),
    Fault("ev-04", "evaluate", "truth: float label 3.5", _case_fault("truth", lambda p: data.set_label(p, 22, 3.5),
                                                                       "not_integer")),
    Fault("ev-05", "evaluate", "prediction: truncated", _case_fault("prediction", data.truncate, "unreadable")),
    Fault("ev-06", "evaluate", "prediction: 1 mm off the truth's grid", _case_fault("prediction", data.shifted_affine,
                                                                                     "affine")),
    Fault("ev-07", "evaluate", "prediction: other shape", _case_fault("prediction", _other_shape, "shape")),
    Fault("ev-08", "evaluate", "prediction: NaN in a float map", _case_fault("prediction", _nan_prediction,
                                                                             "non_finite")),
    Fault("ev-09", "evaluate", "prediction: missing", _missing_prediction),
    Fault("ev-10", "evaluate", "two predictions for one case", _two_predictions),
    Fault("ev-11", "evaluate", "truth folder does not exist", _no_folder),
    Fault("ev-12", "evaluate", "a prediction without a truth", _unmatched_prediction),
    Fault("ev-13", "evaluate", "a result file edited after writing", _edited_result),
)


@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_fault(fault, run):
    fault.check(run)
