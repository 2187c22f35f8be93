"""04_benchmark with nnU-Net v2 as the backend, and the side-by-side of the two backends.

``backend: nnunetv2`` (the paper profile's default): the trainset cases are exported as an nnU-Net
v2 raw dataset under ``04_benchmark/nnunet/nnUNet_raw/`` (:func:`lib.datasets.nnunet.export_cases`),
checked by nnU-Net's own ``verify_dataset_integrity``, planned and preprocessed by nnU-Net
(``default`` plan: the paper's 3d_fullres; ``reduced``: nnU-Net's planner at a coarser spacing and
a smaller memory target, for a CPU), trained by nnU-Net's trainer on fold ``all`` and used by
nnU-Net's predictor; the workspace evaluates the predictions as it does its own
(:mod:`lib.ml.nnunet`). Everything nnU-Net writes stays in ``04_benchmark/nnunet/`` and its log in
``nnunet/nnunet.log``.

``side_by_side: true``: the cascade's model as usual, then nnU-Net v2 trained on the same
exported cases with the cascade's training wall-clock as its budget, predicting the same test
cases into ``predictions_nnunetv2/`` (evaluated into ``evaluation_nnunetv2/``); the comparison is
``tables/backend_comparison.csv`` (and ``.md``).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lib.core.cases import Case
from lib.core.parallel import CaseFailure, MapResult
from lib.core.paths import prediction_path
from lib.datasets.nnunet import dataset_folder, export_cases
from lib.evaluation.sets import evaluate_sets
from lib.io.atomic import write_text
from lib.ml import nnunet
from lib.ml.device import resolve_device
from lib.stages.context import StageContext

NNUNET_DIR = "nnunet"
COMPARISON_TABLE = "backend_comparison.csv"


def folders(ctx: StageContext) -> nnunet.NnunetFolders:
    """nnU-Net's three folders under ``04_benchmark/nnunet/`` (never the user's home)."""
    return nnunet.NnunetFolders(ctx.dir / NNUNET_DIR)


def _log(ctx: StageContext) -> Path:
    return ctx.dir / NNUNET_DIR / "nnunet.log"


def device(ctx: StageContext) -> str:
    """The params' device as nnU-Net names it (``auto``: cuda, mps or cpu)."""
    return resolve_device(ctx.P.device).type


def export_trainset(ctx: StageContext, train_cases: Sequence[Case]) -> Path:
    """The trainset cases as ``nnUNet_raw/Dataset501_CTSpine1K`` (pairs failing our integrity
    check skipped and listed in its ``skipped.txt``)."""
    ds = dataset_folder(folders(ctx).make().raw)
    return export_cases([(c.case_id, c.image, c.mask) for c in train_cases], [], ds, test_splits=())


def verify_export(ctx: StageContext, ds: Path) -> nnunet.IntegrityReport:
    """nnU-Net v2's own integrity check on the export (raises :class:`lib.ml.nnunet.NnunetIntegrityError`
    with its messages); the report goes into the run record (``nnunet_integrity``)."""
    report = nnunet.verify_dataset(ds, folders(ctx), num_processes=1, log=_log(ctx))
    ctx.facts["nnunet_integrity"] = report.to_json()
    return report


def train_nnunet(ctx: StageContext, train_cases: Sequence[Case], budget_s: float | None = None,
                 figure: str = "training_curves.png") -> nnunet.NnunetTrainResult:
    """Export, verify, plan + preprocess and train with nnU-Net v2 (``budget_s``: the training
    loop's wall-clock budget; None: ``nnunet_budget_s`` of the params). nnU-Net's progress plot
    is copied to ``figures/<figure>``."""
    P = ctx.P
    nnunet.require()
    t0 = time.perf_counter()
    ds = export_trainset(ctx, train_cases)
    verify_export(ctx, ds)
    plan = nnunet.plan_and_preprocess(ds, folders(ctx), kind=P.nnunet_plan, configuration=P.nnunet_configuration,
                                      target_spacing_mm=P.nnunet_target_spacing_mm, gpu_memory_gb=P.nnunet_gpu_memory_gb,
                                      num_processes=P.num_threads, log=_log(ctx))
    print(plan.describe())
    prepared = time.perf_counter() - t0
    result = nnunet.train(plan, folders(ctx), ds.name, epochs=P.nnunet_epochs, iterations_per_epoch=P.nnunet_iterations,
                          budget_s=P.nnunet_budget_s if budget_s is None else budget_s, device=device(ctx),
                          da_workers=P.nnunet_da_workers, num_threads=P.num_threads, log=_log(ctx))
    result.schedule["prepare_seconds"] = round(prepared, 1)
    if result.progress_png.exists():
        shutil.copyfile(result.progress_png, ctx.figures / figure)
    return result


def predict_nnunet(ctx: StageContext, model_dir: Path, cases: Sequence[Case],
                   folder: str = "predictions") -> tuple[list[Case], MapResult]:
    """nnU-Net's predictor on every test case into ``<folder>/<set>/<ID>_seg.nii.gz`` (kept when
    there: re-runs resume); failures are listed (``failed_cases.csv``), the others still run."""
    out = [c.with_prediction(prediction_path(ctx.dir, c.split, c.case_id, sub=folder)) for c in cases]
    items = [(f"{c.split}/{c.case_id}", c.image, c.prediction) for c in out]
    per_case = nnunet.predict(model_dir, items, folders(ctx), device=device(ctx), tta=ctx.P.tta,
                              num_threads=ctx.P.num_threads, log=_log(ctx))
    res = MapResult(values={k: v for k, v in per_case.items() if not v.get("error")},
                    failures=[CaseFailure(k, v["error"]) for k, v in per_case.items() if v.get("error")])
    ctx.add_failures(f"predict ({folder})", res.failures)
    return out, res


def _per_case_s(infer: MapResult, set_name: str) -> float | None:
    done = [v["seconds"] for k, v in infer.values.items() if k.startswith(f"{set_name}/") and not v.get("skipped")]
    return sum(done) / len(done) if done else None


def _row(backend: str, set_name: str, summary: dict, train_s: float, infer_s: float | None, note: str) -> dict:
    mv, ms = summary.get("mean_of_vertebrae", {}), summary.get("mean_of_spine", {})
    return {"backend": backend, "set": set_name, "cases": summary.get("n_cases"), "failed": summary.get("n_failed", 0),
            "mean_vertebra_dice": mv.get("dice", {}).get("mean"), "spine_dice": ms.get("dice", {}).get("mean"),
            "identification_rate": mv.get("identification_rate_pooled"),
            "localisation_mm": mv.get("localisation_mm", {}).get("mean"),
            "train_s": round(train_s, 1), "inference_s_per_case": None if infer_s is None else round(infer_s, 2),
            "notes": note}


def side_by_side(ctx: StageContext, train_cases: Sequence[Case], cases: Sequence[Case], cascade_train_s: float,
                 cascade_summaries: dict) -> pd.DataFrame | None:
    """Train nnU-Net v2 on the same trainset with the cascade's training time as its budget,
    predict and evaluate the same test cases, and write ``tables/backend_comparison.csv`` (+ .md):
    one row per backend and set. None when ``side_by_side`` is off; a table saying why when
    nnU-Net is not installed (nothing is substituted)."""
    P = ctx.P
    if not P.side_by_side:
        return None
    cascade_note = f"cascade ({P.init_from} start, {P.max_epochs} epochs)"
    reason = nnunet.missing_reason()
    predict_s = dict(ctx.timings).get("predict")  # the cascade's: the whole prediction step, per case
    per_case = predict_s / len(cases) if predict_s and cases else None
    rows = [_row("cascade", s, summary, cascade_train_s, per_case, cascade_note)
            for s, summary in cascade_summaries.items()]
    if reason:
        rows.append({"backend": "nnunetv2", "set": "-", "notes": f"not run: {reason}"})
        print(f"side by side: nnU-Net v2 not run: {reason}")
    else:
        result = train_nnunet(ctx, train_cases, budget_s=cascade_train_s, figure="training_curves_nnunetv2.png")
        pred_cases, infer = predict_nnunet(ctx, result.model_dir, cases, folder="predictions_nnunetv2")
        _, summaries = evaluate_sets(pred_cases, ctx.dir / "evaluation_nnunetv2", hd95=P.hd95, workers=P.workers)
        ctx.facts["side_by_side_nnunetv2"] = result.to_json()
        note = (f"nnU-Net v2 {result.plan.configuration} ({result.plan.kind} plan: "
                f"{'x'.join(f'{v:g}' for v in result.plan.spacing)} mm, patch {'x'.join(map(str, result.plan.patch_size))}), "
                f"scratch, {result.epochs} epochs x {P.nnunet_iterations} iterations"
                + (" (budget spent)" if result.budget_spent else ""))
        for s, summary in summaries.items():
            rows.append(_row("nnunetv2", s, summary, result.seconds + result.schedule.get("prepare_seconds", 0),
                             _per_case_s(infer, s), note))
    table = pd.DataFrame(rows)
    ctx.save_table(table, COMPARISON_TABLE)
    write_text(ctx.tables / "backend_comparison.md", comparison_markdown(table))
    return table


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison as a markdown table: fractions to 3 decimals, seconds to 1, empty for missing."""
    def cell(col: str, v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.1f}" if col.endswith("_s") or col.endswith("_mm") else f"{v:.3f}"
        return str(v)
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in cols) + " |" for _, r in table.iterrows()]
    return "\n".join(lines) + "\n"
