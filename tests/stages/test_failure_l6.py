"""lib.stages.failure_l6: label shifts found and corrected on disk; before / after tables by group."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lib.core import params
from lib.core.cases import Case
from lib.core.paths import for_profile, prediction_path
from lib.io import load_volume, save_volume
from lib.stages import failure_l6
from lib.stages.context import StageContext
from lib.synthetic import phantom


def _ctx() -> StageContext:
    values = params.load_params(params.params_file("ci", "05_failure_l6"), "05_failure_l6")
    return StageContext("05_failure_l6", params.Params(**values), for_profile("ci"))


def test_a_sacrum_counted_l6_case_is_found_dislocated_and_the_correction_is_written(tmp_path):
    case = phantom.generate_case(phantom.CaseSpec(seed=3, n_lumbar=6, fov="abdomen", spacing_mm=(2.0, 2.0, 2.0)))
    shifted = case.mask.copy()
    for v in range(20, 26):  # a network counting from the sacrum: L6 -> L5, ..., L1 -> T12
        shifted[case.mask == v] = v - 1
    img = save_volume(case.ct, case.affine, tmp_path / "liver_9.nii.gz")
    gt = save_volume(case.mask, case.affine, tmp_path / "liver_9_seg.nii.gz")
    pred = save_volume(shifted, case.affine, tmp_path / "pred" / "liver_9_seg.nii.gz")
    ctx = _ctx()
    rows = failure_l6.label_shift_cases(ctx, [Case("liver_9", img, gt, "test_public", pred)], anchors="any")
    r = rows.iloc[0]
    assert r["variant"] == "L6"
    assert r["dislocated"]
    assert r["offset"] == -1
    assert r["run_length"] >= 2
    corrected = prediction_path(ctx.dir, "test_public", "liver_9", "corrected")
    assert corrected.exists()
    assert load_volume(corrected).shape == case.mask.shape
    assert r["correction_applied"] == (not r["dislocated_after"])


def test_correction_tables_group_cases_by_variant_and_dislocation():
    def per_case(set_, cid, dice):
        return [{"set": set_, "case_id": cid, "label": 24, "name": "L5", "status": "detected", "dice": dice,
                 "identified": 1.0 if dice > 0.5 else 0.0},
                {"set": set_, "case_id": cid, "label": 0, "name": "spine", "status": "detected", "dice": 0.9,
                 "identified": np.nan}]
    before = pd.DataFrame(per_case("test_public", "a", 0.2) + per_case("test_public", "b", 0.9))
    after = pd.DataFrame(per_case("test_public", "a", 0.8) + per_case("test_public", "b", 0.9))
    shift = pd.DataFrame({"set": ["test_public"] * 2, "case_id": ["a", "b"], "variant": ["L6", "normal"],
                          "dislocated": [True, False], "correction_applied": [True, False]})
    scores = failure_l6.compare_correction(before, after, shift)
    assert scores.set_index("case_id").loc["a", "dice_delta"] == 0.8 - 0.2
    summary = failure_l6.correction_summary(scores).set_index("group")
    assert summary.loc["dislocated", "cases"] == 1
    assert summary.loc["normal", "dice_delta"] == 0.0
    assert summary.loc["variant L6", "id_rate_after"] == 1.0
    assert summary.loc["all", "corrected"] == 1
    l5 = failure_l6.label_before_after(before, after, "L5").iloc[0]
    assert l5["cases"] == 2
    assert l5["dice_before"] == (0.2 + 0.9) / 2
    assert l5["missed_after"] == 0
