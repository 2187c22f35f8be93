"""Stage 05_failure_l6: label shifts ("dislocations") and the L6 failure, and our correction.

Notebook ``notebooks/05_failure_l6.ipynb``; parameters ``params/<profile>/05_failure_l6.yaml``.
Reads 04's predictions (``04_benchmark/predictions/<set>/``); writes the corrected masks
(``corrected/<set>/``), their evaluation beside the baseline's, and the tables of the analysis.
Detector and correction: :mod:`lib.imaging.label_shift`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib.core.cases import Case
from lib.core.parallel import CaseFailure
from lib.core.paths import prediction_path
from lib.datasets.benchmark_sets import benchmark_test_cases
from lib.evaluation.sets import evaluate_sets
from lib.evaluation.summary import SCORED_STATUSES, case_scores
from lib.imaging.label_shift import correct_label_shift, dislocation, label_shift_table, variant_of
from lib.io.integrity import verify_case
from lib.io.nifti import load_volume, save_like
from lib.stages.context import StageContext, print_environment  # noqa: F401  (notebook API)
from lib.viz.gallery import plot_shift_cases

STAGE = "05_failure_l6"


def start(namespace: dict) -> StageContext:
    """Validate the notebook's parameters and create the stage folders."""
    return StageContext.start(STAGE, namespace)


def evaluation_cases(ctx: StageContext) -> list[Case]:
    """The test cases 04 evaluated, each with 04's prediction attached."""
    cases = benchmark_test_cases(ctx.paths, ctx.P.include_verse)
    stage04 = ctx.paths.stage("04_benchmark")
    return [c.with_prediction(prediction_path(stage04, c.split, c.case_id)) for c in cases]


def corrected_cases(ctx: StageContext, cases: Sequence[Case]) -> list[Case]:
    """The same cases with the corrected masks (``corrected/<set>/``) as predictions."""
    return [c.with_prediction(prediction_path(ctx.dir, c.split, c.case_id, "corrected")) for c in cases]


def shift_case(ctx: StageContext, c: Case, anchors: str = "both") -> dict:
    """Detector and correction on one case (its 04 prediction attached): the row of
    :func:`label_shift_cases`; the corrected mask goes to ``corrected/<set>/``.

    Raises:
        lib.io.IntegrityError: the image, truth or prediction is unreadable, not finite, or the
            truth / prediction does not lie on the image's grid (file and fault named).
    """
    verify_case(c.image, c.mask, require_nonempty=True)
    verify_case(c.image, c.prediction)
    img = load_volume(c.image)
    gt = np.asarray(load_volume(c.mask).array, dtype=np.uint8)
    pv = load_volume(c.prediction)
    pred = np.asarray(pv.array, dtype=np.uint8)
    tab = label_shift_table(gt, pred, img.affine)
    d = dislocation(tab)
    fixed, info = correct_label_shift(np.asarray(img.array), pred, img.affine, anchors=anchors)
    save_like(fixed, pv, prediction_path(ctx.dir, c.split, c.case_id, "corrected"), dtype=np.uint8)
    after = dislocation(label_shift_table(gt, fixed, img.affine))
    return {"set": c.split, "case_id": c.case_id, "variant": variant_of(gt) or "normal",
            "dislocated": d.dislocated, "offset": d.offset, "run_length": d.run_length,
            "shifted_labels": " ".join(d.shifted_labels), "correction_applied": info.applied,
            "anchor": info.anchor, "shift": info.shift, "labels_before": " ".join(info.labels_before),
            "labels_after": " ".join(info.labels_after), "dislocated_after": after.dislocated,
            "failed": False, "failure": ""}


def label_shift_cases(ctx: StageContext, cases: Sequence[Case], anchors: str = "both") -> pd.DataFrame:
    """Dislocation detector and correction on every test case.

    For each case (its 04 prediction attached): the label-shift table of the prediction, whether
    it is dislocated, the truth's variant (:func:`lib.imaging.label_shift.variant_of`), and our
    correction; the corrected mask is saved under ``corrected/<set>/``; ``anchors``: see
    :func:`lib.imaging.label_shift.correct_label_shift`. A case whose files are unreadable or
    invalid stays in the table as ``variant`` "failed" (``failed`` True, the message in
    ``failure``; not dislocated, not corrected) and goes to ``failed_cases.csv``; the others go on.

    Returns:
        One row per case: dislocated, offset, run length, shifted labels, variant, whether the
        correction was applied, its anchor and shift, labels before/after, failed.
    """
    rows = []
    for c in cases:
        try:
            rows.append(shift_case(ctx, c, anchors))
        except Exception as exc:  # listed per case (failed_cases.csv), the others go on
            msg = f"{type(exc).__name__}: {exc}"
            ctx.add_failures("detect_and_correct", [CaseFailure(f"{c.split}/{c.case_id}", msg)])
            rows.append({"set": c.split, "case_id": c.case_id, "variant": "failed", "dislocated": False,
                         "offset": 0, "run_length": 0, "shifted_labels": "", "correction_applied": False,
                         "anchor": "", "shift": 0, "labels_before": "", "labels_after": "",
                         "dislocated_after": False, "failed": True, "failure": msg})
    return pd.DataFrame(rows)


def compare_correction(before: pd.DataFrame, after: pd.DataFrame, shift: pd.DataFrame) -> pd.DataFrame:
    """Per case: mean vertebra Dice and identification rate before/after the correction, with
    the case's variant and whether the baseline was dislocated."""
    b = case_scores(before).rename(columns={"mean_vertebra_dice": "dice_before", "identification_rate": "id_before",
                                            "spine_dice": "spine_before"})
    a = case_scores(after).rename(columns={"mean_vertebra_dice": "dice_after", "identification_rate": "id_after",
                                           "spine_dice": "spine_after"})
    out = b.merge(a.drop(columns=["vertebrae"]), on=["set", "case_id"]).merge(
        shift[["set", "case_id", "variant", "dislocated", "correction_applied"]], on=["set", "case_id"])
    out["dice_delta"] = out["dice_after"] - out["dice_before"]
    out["id_delta"] = out["id_after"] - out["id_before"]
    return out


def correction_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Means before/after per group: all, dislocated, normal (no variant, not dislocated),
    and each variant."""
    groups = {"all": scores, "dislocated": scores[scores["dislocated"].astype(bool)],
              "normal": scores[(scores["variant"] == "normal") & ~scores["dislocated"]]}
    for v in sorted(set(scores["variant"]) - {"normal"}):
        groups[f"variant {v}"] = scores[scores["variant"] == v]
    rows = []
    for name, g in groups.items():
        rows.append({"group": name, "cases": len(g), "corrected": int(g["correction_applied"].sum()),
                     "dice_before": g["dice_before"].mean(), "dice_after": g["dice_after"].mean(),
                     "dice_delta": g["dice_delta"].mean(), "id_rate_before": g["id_before"].mean(),
                     "id_rate_after": g["id_after"].mean(), "id_rate_delta": g["id_delta"].mean()})
    return pd.DataFrame(rows)


def label_before_after(before: pd.DataFrame, after: pd.DataFrame, name: str) -> pd.DataFrame:
    """One vertebra (e.g. ``"L6"``) per set: cases holding it, mean Dice and identification
    rate before/after, how often it was missed."""
    rows = []
    for set_name in dict.fromkeys(before["set"]):
        r = {"set": set_name, "vertebra": name}
        for tag, df in (("before", before), ("after", after)):
            sub = df[(df["set"] == set_name) & (df["name"] == name) & df["status"].isin(SCORED_STATUSES)]
            r["cases"] = len(sub)
            r[f"dice_{tag}"] = sub["dice"].mean() if len(sub) else np.nan
            r[f"id_rate_{tag}"] = sub["identified"].astype(float).mean() if len(sub) else np.nan
            r[f"missed_{tag}"] = int(sub["status"].isin(["missed", "failed"]).sum())
            r[f"failed_{tag}"] = int((sub["status"] == "failed").sum())
        rows.append(r)
    return pd.DataFrame(rows)


def evaluate_before_after(ctx: StageContext, cases: Sequence[Case]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate 04's predictions (``evaluation_baseline/``, as 04 did; 04's own folder is never
    written by this stage) and the corrected masks (``evaluation_corrected/``); returns both
    per-case tables. Cases that cannot be scored are failures in both (Dice 0, listed)."""
    before, s_before = evaluate_sets(cases, ctx.dir / "evaluation_baseline", hd95=ctx.P.hd95, workers=ctx.P.workers)
    after, s_after = evaluate_sets(corrected_cases(ctx, cases), ctx.dir / "evaluation_corrected", hd95=ctx.P.hd95,
                                   workers=ctx.P.workers)
    for tag, summaries in (("baseline", s_before), ("corrected", s_after)):
        for set_name, summary in summaries.items():
            ctx.add_failures(f"evaluate {tag} {set_name}", summary.get("failed_cases", []))
    return before, after


def save_shift_figure(ctx: StageContext, shift: pd.DataFrame, cases: Sequence[Case]):
    """Sagittal truth / prediction / corrected of the dislocated and corrected cases
    (``figures/dislocated_cases.png``); None when there is none."""
    corrected = {(c.split, c.case_id): c.prediction for c in corrected_cases(ctx, cases)}
    fig = plot_shift_cases(shift, cases, corrected, ctx.P.max_figure_cases)
    return None if fig is None else ctx.save_figure(fig, "dislocated_cases.png")
