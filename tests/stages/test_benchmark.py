"""lib.stages.benchmark: which model 04 starts from, its test sets, evaluation and Table 2 on disk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.core import params
from lib.core.paths import for_profile, prediction_path
from lib.io import save_volume
from lib.stages import benchmark
from lib.stages.context import StageContext
from tests.helpers.spines import AFFINE, spine_mask


def _ctx(**overrides) -> StageContext:
    values = params.load_params(params.params_file("ci", "04_benchmark"), "04_benchmark")
    values.update(overrides)
    ctx = StageContext("04_benchmark", params.Params(**values), for_profile("ci"))
    ctx.tables.mkdir(parents=True, exist_ok=True)
    return ctx


def _model(folder):
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"x")
    (folder / "plan.json").write_text("{}")
    return folder


def _release(pp, cases):
    """A tiny release: ``cases`` = {split: [(case_id, labels)]}, image + accepted mask each."""
    for split, items in cases.items():
        for cid, labels in items:
            m = spine_mask(labels)
            save_volume(np.where(m > 0, 500, 0).astype(np.int16), AFFINE, pp.split_dir(split, "data") / f"{cid}.nii.gz")
            save_volume(m, AFFINE, pp.split_dir(split, "gt") / f"{cid}_seg.nii.gz")


def test_initial_model_follows_init_from():
    pp = for_profile("ci")
    ann = _model(pp.stage("03_annotation") / "models" / "round_02")
    pre = _model(pp.models("02_pretraining"))
    assert benchmark.initial_model(_ctx(init_from="annotation")) == ann
    assert benchmark.initial_model(_ctx(init_from="pretrained")) == pre
    assert benchmark.initial_model(_ctx(init_from="scratch")) is None


def test_test_sets_hold_the_release_splits_and_test_verse(tmp_path):
    pp = for_profile("ci")
    _release(pp, {"trainset": [("liver_1", [24, 23, 22])], "test_public": [("liver_2", [24, 23])],
                  "test_private": [("HN_P001", [3, 2, 1])]})
    tab = pp.tables("02_pretraining")
    tab.mkdir(parents=True)
    pd.DataFrame({"case_id": ["sub-verse001", "sub-verse002"], "split": ["train", "heldout"]}).to_csv(tab / "split.csv", index=False)
    pd.DataFrame({"case_id": ["sub-verse001", "sub-verse002", "sub-verse003", "sub-verse004"],
                  "image": ["a", "b", "c", "d"], "mask": ["A", "B", "C", "D"],
                  "usable": [True, True, False, False],
                  "reason": ["", "", "cropped: the spine starts at C4", "mask spacing differs"]}).to_csv(
        tab / "verse_selection.csv", index=False)
    cases = benchmark.evaluation_cases(_ctx())
    assert [(c.split, c.case_id) for c in cases] == [("test_public", "liver_2"), ("test_private", "HN_P001"),
                                                      ("Test_VerSe", "sub-verse002"), ("Test_VerSe", "sub-verse003")]
    assert [c.case_id for c in benchmark.trainset(_ctx())] == ["liver_1"]
    (pp.split_dir("test_public", "gt") / "liver_2_seg.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="liver_2_seg.nii.gz"):
        benchmark.evaluation_cases(_ctx(), include_verse=False)


def test_evaluation_and_table2_of_perfect_and_shifted_predictions():
    pp = for_profile("ci")
    _release(pp, {"test_public": [("liver_2", [24, 23, 22])], "test_private": [("liver_3", [24, 23, 22])]})
    ctx = _ctx()
    cases = benchmark.evaluation_cases(ctx, include_verse=False)
    out = [c.with_prediction(prediction_path(ctx.dir, c.split, c.case_id)) for c in cases]
    save_volume(spine_mask([24, 23, 22]), AFFINE, out[0].prediction)      # perfect
    save_volume(spine_mask([23, 22, 21]), AFFINE, out[1].prediction)      # every label one level high
    per_case, summaries, scores = benchmark.evaluate(ctx, out)
    s = scores.set_index("set")
    assert s.loc["test_public", "mean_vertebra_dice"] == 1.0
    assert s.loc["test_private", "mean_vertebra_dice"] == 0.0
    assert s.loc["test_private", "spine_dice"] == 1.0  # the spine is right, only the labels are shifted
    assert (ctx.tables / "case_scores.csv").exists()
    assert (ctx.dir / "evaluation" / "test_public" / "summary.json").exists()
    table2 = benchmark.write_table2(ctx, summaries)
    assert table2.loc["Mean of Vertebrae", "test_public DSC"] == 1.0
    assert table2.loc["Mean of Vertebrae", "test_private DSC (paper)"] == pytest.approx(0.840)
    assert "Mean of Spine" in (ctx.tables / "table2.md").read_text()
    assert benchmark.median_case(scores, out).case_id in {"liver_2", "liver_3"}
