"""lib.stages.benchmark: which model 04 starts from, its test sets, evaluation and Table 2 on disk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.core import params
from lib.core.paths import for_profile, prediction_path
from lib.datasets.benchmark_sets import benchmark_test_cases
from lib.io import load_volume, save_volume
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


def _verse_tables(pp, files=None):
    """02's tables: 001 trained, 002 held out, 003 cropped, 004 mask on another grid; with
    ``files`` (a folder) real image and mask files (T11, T12, T13, L1) for each."""
    paths = {c: ("a", "A") for c in "1234"}
    if files is not None:
        m = spine_mask([20, 28, 19, 18])
        for c in "1234":
            paths[c] = (str(save_volume(np.where(m > 0, 500, 0).astype(np.int16), AFFINE, files / f"{c}_ct.nii.gz")),
                        str(save_volume(m, AFFINE, files / f"{c}_msk.nii.gz")))
    tab = pp.tables("02_pretraining")
    tab.mkdir(parents=True)
    pd.DataFrame({"case_id": ["sub-verse001", "sub-verse002"], "subject": ["sub-verse001", "sub-verse002"],
                  "release": ["VerSe", "VerSe"], "split": ["train", "heldout"]}).to_csv(tab / "split.csv", index=False)
    pd.DataFrame({"case_id": ["sub-verse001", "sub-verse002", "sub-verse003", "sub-verse004"],
                  "subject": ["sub-verse001", "sub-verse002", "sub-verse003", "sub-verse004"],
                  "release": ["VerSe"] * 4, "layout": ["bids"] * 4,
                  "image": [paths[c][0] for c in "1234"], "mask": [paths[c][1] for c in "1234"],
                  "usable": [True, True, False, False],
                  "reason": ["", "", "cropped: the spine starts at C4", "mask spacing differs"]}).to_csv(
        tab / "verse_selection.csv", index=False)


@pytest.mark.parametrize(("init_from", "test_verse"), [("annotation", ["sub-verse002"]), ("pretrained", ["sub-verse002"]),
                                                       ("scratch", ["sub-verse001", "sub-verse002"])])
def test_test_sets_hold_the_release_splits_test_verse_and_verse_cropped(init_from, test_verse):
    pp = for_profile("ci")
    _release(pp, {"trainset": [("liver_1", [24, 23, 22])], "test_public": [("liver_2", [24, 23])],
                  "test_private": [("HN_P001", [3, 2, 1])]})
    _verse_tables(pp)
    ctx = _ctx(init_from=init_from)
    cases = benchmark.evaluation_cases(ctx)
    assert [(c.split, c.case_id) for c in cases] == [("test_public", "liver_2"), ("test_private", "HN_P001")] + [
        ("Test_VerSe", c) for c in test_verse] + [("VerSe_cropped", "sub-verse003")]
    written = pd.read_csv(ctx.tables / "test_verse_cases.csv", keep_default_na=False).set_index("case_id")
    assert written.loc["sub-verse004", "set"] == ""
    assert written.loc["sub-verse004", "why"] == "not evaluated: mask spacing differs"
    # 05 reads the sets back as 04 evaluated them
    assert [(c.split, c.case_id) for c in benchmark_test_cases(pp, include_verse=True)] == [
        (c.split, c.case_id) for c in cases]
    definition = benchmark.verse_definition(ctx)
    assert definition.startswith(f"Test_VerSe: {len(test_verse)} usable VerSe scan(s)")
    assert ("the paper's definition" in definition) == (init_from == "scratch")
    assert [c.case_id for c in benchmark.trainset(ctx)] == ["liver_1"]
    (pp.split_dir("test_public", "gt") / "liver_2_seg.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="liver_2_seg.nii.gz"):
        benchmark.evaluation_cases(ctx, include_verse=False)


def test_05_without_04s_verse_table_says_to_run_04():
    pp = for_profile("ci")
    _release(pp, {"test_public": [("liver_2", [24, 23])], "test_private": [("HN_P001", [3, 2, 1])]})
    with pytest.raises(FileNotFoundError, match="test_verse_cases.csv: missing; run 04_benchmark"):
        benchmark_test_cases(pp, include_verse=True)
    with pytest.raises(ValueError, match="init_from 'warm'"):
        benchmark_test_cases(pp, include_verse=True, init_from="warm")


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


def test_table2_states_which_test_verse_applied_and_the_verse_sets_score_t13(tmp_path):
    pp = for_profile("ci")
    _release(pp, {"test_public": [("liver_2", [24, 23, 22])], "test_private": [("liver_3", [24, 23, 22])]})
    _verse_tables(pp, files=tmp_path)
    ctx = _ctx(init_from="scratch")
    cases = benchmark.evaluation_cases(ctx)
    out = [c.with_prediction(prediction_path(ctx.dir, c.split, c.case_id)) for c in cases]
    for c in out:
        save_volume(load_volume(c.mask).array, AFFINE, c.prediction)  # perfect predictions
    _, summaries, _ = benchmark.evaluate(ctx, out)
    assert set(summaries) == {"test_public", "test_private", "Test_VerSe", "VerSe_cropped"}
    table2 = benchmark.write_table2(ctx, summaries)
    assert table2.loc["T13", "Test_VerSe DSC"] == 1.0
    assert table2.loc["T13", "VerSe_cropped DSC"] == 1.0
    assert "VerSe_cropped DSC (paper)" in table2  # the paper has no such set: its cells stay empty
    assert table2["VerSe_cropped DSC (paper)"].isna().all()
    md = (ctx.tables / "table2.md").read_text()
    assert "Test_VerSe: 2 usable VerSe scan(s) of 2 subjects (complete, uncropped" in md
    assert "(init_from: scratch; cases: tables/test_verse_cases.csv)" in md


def test_nnunet_backend_trains_from_scratch_only():
    values = params.load_params(params.params_file("ci", "04_benchmark"), "04_benchmark")
    values.update(backend="nnunetv2", init_from="annotation")
    with pytest.raises(ValueError, match="backend nnunetv2 trains from scratch.*init_from: scratch"):
        benchmark.start(values)
    values.update(init_from="scratch")
    assert benchmark.start(values).P.backend == "nnunetv2"


def test_side_by_side_without_nnunet_says_why_and_substitutes_nothing(monkeypatch):
    from lib.stages.benchmark import nnunet_backend
    monkeypatch.setattr(nnunet_backend.nnunet, "missing_reason", lambda: "nnU-Net v2 is not installed: make setup EXTRAS=nnunet")
    assert benchmark.side_by_side(_ctx(side_by_side=False), [], [], 10.0, {}) is None
    ctx = _ctx(side_by_side=True)
    summary = {"n_cases": 2, "n_failed": 0, "mean_of_vertebrae": {"dice": {"mean": 0.5}, "identification_rate_pooled": 0.25,
                                                                 "localisation_mm": {"mean": 7.0}},
               "mean_of_spine": {"dice": {"mean": 0.9}}}
    ctx.timings["predict"] = 8.0
    table = benchmark.side_by_side(ctx, [], [object()] * 4, 120.0, {"test_public": summary})
    rows = table.set_index("backend")
    assert rows.loc["cascade", ["mean_vertebra_dice", "spine_dice", "identification_rate", "train_s",
                                "inference_s_per_case"]].tolist() == [0.5, 0.9, 0.25, 120.0, 2.0]
    assert rows.loc["nnunetv2", "notes"] == "not run: nnU-Net v2 is not installed: make setup EXTRAS=nnunet"
    assert pd.isna(rows.loc["nnunetv2", "mean_vertebra_dice"])
    assert (ctx.tables / "backend_comparison.csv").exists()
