"""Fault corpus, stages: a case that fails in 02-06 is listed (``failed_cases.csv``, the run record)
and counted in every table as a failure -- never dropped from a mean, never crashing a later step;
``on_error: raise`` fails the stage after listing every failure."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lib.core import params
from lib.core.cases import Case
from lib.core.parallel import CaseFailure
from lib.core.paths import for_profile, prediction_path
from lib.datasets.verse import select_pretraining_cases
from lib.io import save_volume
from lib.stages import benchmark, failure_l6, failure_lowz
from lib.stages.annotation.ledger import Ledger
from lib.stages.annotation.loop import LoopConfig, run_rounds
from lib.stages.annotation.tiers import SimulatedTiers
from lib.stages.context import FAILED_CASES_CSV, StageContext, StageFailuresError
from tests.helpers.spines import AFFINE, FakeModel, make_cases, spine_mask
from tests.reliability import data
from tests.reliability.corpus import Fault, faults


def _ctx(stage: str, **overrides) -> StageContext:
    values = params.load_params(params.params_file("ci", stage), stage)
    values.update(overrides)
    ctx = StageContext(stage, params.Params(**values), for_profile("ci"))
    ctx.tables.mkdir(parents=True, exist_ok=True)
    ctx.figures.mkdir(parents=True, exist_ok=True)
    return ctx


def _release(split, ids, labels=(24, 23, 22)):
    pp = for_profile("ci")
    pp.split_dir(split, "gt").mkdir(parents=True, exist_ok=True)
    for cid in ids:
        _, msk = data.pair(pp.split_dir(split, "data"), cid, labels)
        msk.rename(pp.split_dir(split, "gt") / msk.name)
    return pp


def _benchmark_with(broken: str):
    """04 on three test_public cases: liver_1 perfect, liver_2 ``broken``, liver_3 not predicted."""
    _release("test_public", ["liver_1", "liver_2", "liver_3"])
    ctx = _ctx("04_benchmark")
    cases = benchmark.evaluation_cases(ctx, include_verse=False)
    out = [c.with_prediction(prediction_path(ctx.dir, c.split, c.case_id)) for c in cases]
    for c in out[:2]:
        data.perfect_prediction(c.mask, c.prediction)
    {"truncated": data.truncate, "shifted": data.shifted_affine,
     "float": lambda p: data.set_label(p, 22, 3.5)}[broken](out[1].prediction)
    return ctx, out


def _04_broken_prediction(broken):
    def check(run):
        ctx, out = _benchmark_with(broken)
        per_case, summaries, scores = benchmark.evaluate(ctx, out)
        s = scores.set_index("case_id")
        assert s.loc["liver_1", "mean_vertebra_dice"] == 1.0
        assert s.loc["liver_2", "mean_vertebra_dice"] == 0.0   # a broken file scores like no file ...
        assert s.loc["liver_3", "mean_vertebra_dice"] == 0.0
        assert bool(s.loc["liver_2", "failed"])                 # ... and is marked
        assert not bool(s.loc["liver_3", "failed"])
        assert [(r["step"], r["case_id"]) for r in ctx.failures] == [("evaluate test_public", "liver_2")]
        assert "liver_2" in ctx.failures[0]["file"] + ctx.failures[0]["message"]
        table2 = benchmark.write_table2(ctx, summaries)
        assert table2.loc["Failed", "test_public DSC"] == 1
        assert table2.loc["Mean of Vertebrae", "test_public DSC"] == pytest.approx(1 / 3)
        assert "failed" in (ctx.tables / "table2.md").read_text().lower()
        assert benchmark.median_case(scores, out).case_id in {"liver_1", "liver_3"}  # never the broken one
        ctx.write_record({})
        assert pd.read_csv(ctx.dir / FAILED_CASES_CSV)["case_id"].tolist() == ["liver_2"]
        run.told(f"scored Dice 0, marked failed, Table 2 Failed = 1 ({ctx.failures[0]['kind']}); gallery skips it")
    return check


def _04_predict_failure(run):
    ctx = _ctx("04_benchmark")
    ctx.add_failures("predict", [CaseFailure("test_public/liver_2", "IntegrityError: liver_2.nii.gz: 3 NaN/inf voxels")])
    ctx.write_record({})
    rec = json.loads((ctx.dir / "run_record.json").read_text())
    assert rec["extra"]["n_failed"] == 1
    assert "NaN" in pd.read_csv(ctx.dir / FAILED_CASES_CSV)["message"].iloc[0]
    run.told("listed in failed_cases.csv and the run record (n_failed 1)")


def _on_error_raise(run):
    ctx = _ctx("05_failure_l6", on_error="raise")
    ctx.add_failures("detect_and_correct", [CaseFailure("test_private/x", "IntegrityError: x_seg.nii.gz: 4 NaN")])
    with pytest.raises(StageFailuresError, match=r"(?s)1 failed case.*test_private/x.*NaN"):
        ctx.write_record({})
    assert json.loads((ctx.dir / "run_record.json").read_text())["extra"]["n_failed"] == 1
    run.told("stage fails after the record and failed_cases.csv were written")


def _05_cases(first_fault):
    pp = _release("test_public", ["liver_1", "liver_2"])
    cases = []
    for cid in ("liver_1", "liver_2"):
        pred = prediction_path(pp.stage("04_benchmark"), "test_public", cid)
        c = Case(cid, pp.split_dir("test_public", "data") / f"{cid}.nii.gz",
                 pp.split_dir("test_public", "gt") / f"{cid}_seg.nii.gz", "test_public", pred)
        data.perfect_prediction(c.mask, pred)
        cases.append(c)
    first_fault(cases[0])
    return pp, cases


def _05_bad_case(fault_of, prediction_scored: bool = True):
    def check(run):
        pp, cases = _05_cases(fault_of)
        ctx = _ctx("05_failure_l6")
        shift = failure_l6.label_shift_cases(ctx, cases)
        assert shift["case_id"].tolist() == ["liver_1", "liver_2"]   # both in the table
        bad = shift.set_index("case_id").loc["liver_1"]
        assert bool(bad["failed"])
        assert bad["variant"] == "failed"
        assert "liver_1" in bad["failure"]
        assert prediction_path(ctx.dir, "test_public", "liver_2", "corrected").exists()  # the other went on
        assert [r["case_id"] for r in ctx.failures] == ["test_public/liver_1"]
        before, after = failure_l6.evaluate_before_after(ctx, cases)
        assert not (pp.stage("04_benchmark") / "evaluation").exists()  # 05 never writes into 04's folder
        scores = failure_l6.compare_correction(before, after, shift)
        assert sorted(scores["case_id"]) == ["liver_1", "liver_2"]
        # 04's prediction itself is evaluated as 04 did (Dice 0 when it is the broken file); the
        # correction of the failed case does not exist, so its "after" is a miss, never dropped
        before_dice = scores.set_index("case_id").loc["liver_1", "dice_before"]
        assert before_dice == (0.0 if prediction_scored else 1.0)
        assert scores.set_index("case_id").loc["liver_1", "dice_after"] == 0.0
        summary = failure_l6.correction_summary(scores).set_index("group")
        assert summary.loc["all", "cases"] == 2
        assert summary.loc["variant failed", "cases"] == 1
        run.told(f"listed, kept as variant 'failed' (Dice 0); the other case corrected: {bad['failure'][:60]}")
    return check


def _06_failed_job(run):
    def flaky(job):
        if job.case_id == "b" and job.z_mm == 3.0:
            raise ValueError(f"{job.image}: 12 NaN/inf voxels")
        return {"case_id": job.case_id, "set": job.set_name, "z_mm": job.z_mm, "native_z_mm": 1.0,
                "thick_slices": 10, "mean_vertebra_dice": 0.8, "spine_dice": 0.9, "mean_hd95_mm": 2.0,
                "identification_rate": 1.0, "failed": False, "failure": ""}

    run.monkeypatch.setattr(failure_lowz, "run_lowz_job", flaky)
    cases = [Case(c, run.tmp / f"{c}.nii.gz", run.tmp / f"{c}_seg.nii.gz", "test_public") for c in ("a", "b")]
    df = failure_lowz.lowz_sweep(run.tmp / "model", cases, [1.0, 3.0], run.tmp / "work", "baseline")
    assert len(df) == 4
    row = df[(df["case_id"] == "b") & (df["z_mm"] == 3.0)].iloc[0]
    assert bool(row["failed"])
    assert row["mean_vertebra_dice"] == 0.0
    assert "NaN" in row["failure"]
    summary = failure_lowz.summarise_lowz(df, {"a": "COLONOG", "b": "COLONOG"}.get)
    at3 = summary[(summary["subset"] == "all") & (summary["z_mm"] == 3.0)].iloc[0]
    assert at3["failed"] == 1
    assert at3["mean_vertebra_dice"] == pytest.approx(0.4)  # the failure pulls the mean down
    run.told("kept in lowz_per_case.csv scored 0; dice_vs_z.csv counts failed = 1")


def _02_faulty_verse_scan(run):
    root = run.tmp / "VerSe"
    for i, fault in enumerate([None, data.nan_slab]):
        sub = f"sub-verse{500 + i}"
        img, msk = data.pair(run.tmp / "raw", sub, labels=[3, 2, 1])
        (root / "rawdata" / sub).mkdir(parents=True, exist_ok=True)
        (root / "derivatives" / sub).mkdir(parents=True, exist_ok=True)
        img = img.rename(root / "rawdata" / sub / f"{sub}_ct.nii.gz")
        msk.rename(root / "derivatives" / sub / f"{sub}_seg-vert_msk.nii.gz")
        if fault:
            fault(img)
    _, table = select_pretraining_cases(root, workers=0, progress=False)
    t = table.set_index("case_id")
    bad = t.loc["sub-verse501"]
    assert bool(bad["fault"])
    assert not bool(bad["usable"])
    assert "NaN" in bad["reason"]
    assert not bool(t.loc["sub-verse500", "fault"])  # a cropped / rule-excluded scan is not a fault
    run.told(f"excluded with its reason, fault=True (02 lists it as failed): {bad['reason'][:60]}")


def _03_unreadable_image(run):
    root = run.tmp
    cases = make_cases(root)
    data.truncate(cases[0].image)
    (root / "model0.json").write_text(json.dumps({"version": 0}))
    fake, failed = FakeModel(root), []
    with Ledger(root / "ledger.sqlite") as ledger:
        run_rounds(ledger, cases, LoopConfig(batch_size=2, seed=7), root / "model0.json", fake.predict, fake.finetune,
                   fake.truth, SimulatedTiers(seed=7), root / "work", log=lambda m: None,
                   on_failure=lambda c, e: failed.append((c.case_id, str(e))))
        accepted = set(ledger.accepted())
    assert [f[0] for f in failed] == [cases[0].case_id]
    assert cases[0].image.name in failed[0][1]
    assert accepted == {c.case_id for c in cases[1:]}  # every other case went through its round
    run.told("case listed, left un-accepted (retried on re-run); the round went on")


FAULTS = faults(
    Fault("st-01", "04", "a truncated prediction", _04_broken_prediction("truncated")),
    Fault("st-02", "04", "a prediction 1 mm off the truth's grid", _04_broken_prediction("shifted")),
    Fault("st-03", "04", "a prediction with a float label 3.5", _04_broken_prediction("float")),
    Fault("st-04", "04", "a case whose prediction raised", _04_predict_failure),
    Fault("st-05", "stages", "on_error: raise with a failed case", _on_error_raise),
    Fault("st-06", "05", "a truncated 04 prediction", _05_bad_case(lambda c: data.truncate(c.prediction))),
    Fault("st-07", "05", "a NaN slab in a test image", _05_bad_case(lambda c: data.nan_slab(c.image), prediction_scored=False)),
    Fault("st-08", "05", "an empty truth mask", _05_bad_case(
        lambda c: save_volume(np.zeros(spine_mask([24]).shape, np.uint8), AFFINE, c.mask), prediction_scored=True)),
    Fault("st-09", "06", "one (case, z) of the sweep fails", _06_failed_job),
    Fault("st-10", "02", "a NaN slab in a VerSe CT", _02_faulty_verse_scan),
    Fault("st-11", "03", "an unreadable release image in a round", _03_unreadable_image),
)


@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_fault(fault, run):
    fault.check(run)
