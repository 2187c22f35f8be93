"""Stage 02_pretraining: the segmentation model pretrained on VerSe, before any CTSpine1K annotation.

Notebook ``notebooks/02_pretraining.ipynb``; parameters ``params/<profile>/02_pretraining.yaml``.
The paper's rules decide which VerSe scans may pretrain the model (complete, uncropped, image and
mask on one grid: :func:`lib.datasets.verse.select_pretraining_cases`) among every VerSe release
found (:func:`lib.datasets.verse.discover_verse`; a scan in VerSe 2019 and 2020 counts once); a
seeded hold-out of the usable scans, drawn by subject, is never trained on; the plan comes from a fingerprint of the training scans
(:mod:`lib.ml.planning`), training from :mod:`lib.ml.trainer`. The held-out scans and, for
information, some cropped scans are predicted and scored with :mod:`lib.evaluation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lib.core import labels as L
from lib.core.paths import ensure
from lib.datasets.verse import (
    discover_verse,
    select_pretraining_cases,
    split_by_subject,
    verse_subject,
)
from lib.evaluation.folders import evaluate_pairs, write_results
from lib.ml.device import set_threads
from lib.ml.inference import evaluation_pairs, predict_cases, prediction_items
from lib.ml.planning import describe_plan, plan_experiment
from lib.ml.plans import Plan
from lib.ml.trainer import TrainResult, train
from lib.stages.context import StageContext, print_environment  # noqa: F401  (notebook API)
from lib.viz.charts import plot_dice_per_label, plot_training_curves
from lib.viz.ortho import plot_prediction

STAGE = "02_pretraining"

Triple = tuple[str, str, str]


def start(namespace: dict) -> StageContext:
    """Validate the parameters, create the stage folders, seed with ``P.seed`` and set torch's
    CPU threads (``num_threads``; 0 keeps torch's default)."""
    ctx = StageContext.start(STAGE, namespace, seed=True)
    set_threads(ctx.P.num_threads)
    return ctx


DUPLICATES_TABLE = "verse_duplicates.csv"


def verse_root(ctx: StageContext) -> Path:
    """The VerSe root: ``verse_dir`` (the folder holding the ``dataset-verse19*`` /
    ``dataset-verse20*`` release folders, or one BIDS folder), else ``data/<profile>/sources/VerSe``."""
    return Path(ctx.P.verse_dir) if ctx.P.verse_dir else ctx.paths.sources / "VerSe"


def select(ctx: StageContext) -> tuple[list[Triple], pd.DataFrame]:
    """The usable VerSe scans and the selection table (``tables/verse_selection.csv``), one row per
    scan (case id, subject, release, layout, files) with the reason it was left out; the copies of
    scans found in several releases go to ``tables/verse_duplicates.csv`` (one kept). A scan left
    out for a fault of its files (unreadable, NaN, mask off the image's grid, bad labels, empty
    mask; ``fault`` in the table) is also a failed case (``failed_cases.csv``); one left out by the
    paper's rules (cropped) is not."""
    found = discover_verse(verse_root(ctx))
    usable, selection = select_pretraining_cases(found, workers=ctx.P.workers)
    faulty = selection[selection["fault"].astype(bool)] if "fault" in selection else selection.iloc[:0]
    ctx.add_failures("selection", [{"case_id": r.case_id, "file": r.image, "kind": "fault", "message": r.reason}
                                   for r in faulty.itertuples()])
    ctx.save_table(selection, "verse_selection.csv")
    ctx.save_table(found.duplicates, DUPLICATES_TABLE)
    print("VerSe scans per release:", found.per_release())
    if not found.duplicates.empty:
        print(f"{found.duplicates['scan_key'].nunique()} scan(s) found in several releases; kept once "
              f"(tables/{DUPLICATES_TABLE})")
    return usable, selection


def exclusion_summary(selection: pd.DataFrame) -> pd.DataFrame:
    """Excluded scans counted by the first word of their reason."""
    return (selection[~selection["usable"]].groupby(selection["reason"].str.split(":").str[0]).size()
            .rename("excluded scans").to_frame())


def _scan_info(ctx: StageContext, selection: pd.DataFrame | None) -> dict[str, tuple[str, str]]:
    """``{case_id: (subject, release)}`` from the selection (else this run's selection table)."""
    if selection is None and (ctx.tables / "verse_selection.csv").exists():
        selection = pd.read_csv(ctx.tables / "verse_selection.csv", dtype={"case_id": str})
    if selection is None or "subject" not in selection:
        return {}
    release = selection["release"] if "release" in selection else pd.Series("", index=selection.index)
    return {str(c): (str(s), str(r)) for c, s, r in zip(selection["case_id"], selection["subject"], release, strict=True)}


def hold_out(ctx: StageContext, usable: Sequence[Triple], selection: pd.DataFrame | None = None,
             ) -> tuple[list[Triple], list[Triple], pd.DataFrame]:
    """Seeded split of the usable scans into training and held-out scans, by subject: every scan
    of a subject lands on one side (:func:`lib.datasets.verse.split_by_subject`; subjects from
    ``selection`` or this run's ``tables/verse_selection.csv``). ``n_holdout`` scans at least are
    held out while one subject at least trains. Writes ``tables/split.csv`` (case id, subject,
    release, split)."""
    if not usable:
        raise RuntimeError(f"{verse_root(ctx)}: no usable (complete, image/mask-consistent) VerSe scan; "
                           "see the selection table")
    info = _scan_info(ctx, selection)
    subjects = {cid: s for cid, (s, _) in info.items()}
    train_cases, heldout = split_by_subject(usable, subjects, ctx.P.n_holdout, seed=ctx.P.seed)
    rows = [(c[0], "train") for c in train_cases] + [(c[0], "heldout") for c in heldout]
    split = pd.DataFrame([(cid, *info.get(cid, (verse_subject(cid), "")), part) for cid, part in rows],
                         columns=["case_id", "subject", "release", "split"])
    ctx.save_table(split, "split.csv")
    return train_cases, heldout, split


def plan(ctx: StageContext, train_cases: Sequence[Triple]) -> Plan:
    """The plan from a fingerprint of the training scans.

    Every CTSpine1K label (and T13 when kept) is planned, whatever the few VerSe training scans
    hold: the annotation rounds fine-tune this model on masks that may have any of them.
    """
    P = ctx.P
    label_map = {L.T13: P.t13_label} if P.t13_label != L.T13 else {}
    model_labels = L.ordered(list(L.CTSPINE1K_LABELS) + ([P.t13_label] if P.t13_label else []))
    result = plan_experiment(train_cases, P.profile_kind, label_map=label_map, labels=model_labels,
                             coarse_spacing_mm=P.coarse_spacing_mm, deep_supervision=P.deep_supervision,
                             target_spacing_mm=[P.fine_spacing_mm] * 3 if P.fine_spacing_mm else None,
                             workers=P.workers, augmentation={"thick_slice_prob": P.thick_slice_prob})
    print(describe_plan(result))
    print("labels:", " ".join(L.name(v) for v in result.labels))
    return result


def train_model(ctx: StageContext, plan_: Plan, train_cases: Sequence[Triple], heldout: Sequence[Triple]) -> TrainResult:
    """Train (resumes from its checkpoints) into ``models/``; saves ``figures/training_curves.png``."""
    P = ctx.P
    result = train(train_cases, ctx.models, plan_, val_cases=heldout, max_epochs=P.max_epochs,
                   iterations_per_epoch=P.iterations_per_epoch, time_budget_s=P.time_budget_s or None,
                   lr=P.learning_rate or None, seed=P.seed, device=P.device, workers=P.workers,
                   cache_dir=ctx.dir / "cache", num_threads=P.num_threads or None)
    print(f"trained {result.epochs} epochs in {result.seconds:.0f} s (stopped by {result.stopped_by})")
    ctx.save_figure(plot_training_curves(result.log_csv, title="02_pretraining: loss and patch Dice"),
                    "training_curves.png")
    return result


def evaluate_scans(ctx: StageContext, cases: Sequence[Triple], labels: Sequence[int], name: str, set_name: str,
                   title: str) -> tuple[pd.DataFrame, dict]:
    """Predict ``cases`` (``predictions/<name>/``), score them (``tables/<name>/``: per-case CSV,
    summary JSON, Table 2) and save ``figures/<name>_dice_per_vertebra.png`` and
    ``figures/<name>_prediction.png`` (the first case)."""
    P = ctx.P
    pred_dir = ensure(ctx.dir / "predictions" / name)
    with ctx.timings(f"predict_{name}"):
        pred = predict_cases(ctx.models, prediction_items(cases, pred_dir), workers=P.workers, tta=P.tta,
                             device=P.device, overwrite=True)
    print(pred.summary(), f"| {ctx.timings[f'predict_{name}'] / len(cases):.2f} s per scan")
    ctx.add_failures(f"predict {name}", pred.failures)
    table, summary = evaluate_pairs(evaluation_pairs(cases, pred_dir), labels=labels, hd95=P.hd95, workers=P.workers,
                                    on_error="collect")
    ctx.add_failures(f"evaluate {name}", summary.get("failed_cases", []))
    write_results(table, summary, ctx.tables / name, set_name=set_name)
    ctx.save_figure(plot_dice_per_label(table), f"{name}_dice_per_vertebra.png")
    first = cases[0]
    ctx.save_figure(plot_prediction(first[1], first[2], pred_dir / f"{first[0]}.nii.gz", title=f"{title}: {first[0]}"),
                    f"{name}_prediction.png")
    return table, summary


def scores(summary: dict, seconds_per_scan: float) -> dict[str, float]:
    """The headline numbers of an evaluation summary."""
    return {"spine_dice": summary["mean_of_spine"]["dice"]["mean"],
            "vertebra_dice": summary["mean_of_vertebrae"]["dice"]["mean"],
            "vertebra_hd95_mm": summary["mean_of_vertebrae"]["hd95"]["mean"],
            "identification_rate": summary["mean_of_vertebrae"]["identification_rate_pooled"],
            "seconds_per_scan": seconds_per_scan}


def cropped_cases(ctx: StageContext, selection: pd.DataFrame) -> list[Triple]:
    """The cropped VerSe scans to score for information (``max_cropped_cases``, 0: all)."""
    if not ctx.P.evaluate_cropped:
        return []
    cropped = [(r.case_id, r.image, r.mask) for r in selection.itertuples() if str(r.reason).startswith("cropped")]
    return cropped[: ctx.P.max_cropped_cases or None]


def duplicates_summary(duplicates: pd.DataFrame) -> list[dict]:
    """One entry per scan found in several releases: the copy kept and every copy's path."""
    out = []
    for key, g in duplicates.groupby("scan_key", sort=True):
        kept = g[g["kept"].astype(bool)].iloc[0]
        out.append({"scan": key, "kept": kept["image"], "kept_release": kept["release"],
                    "copies": g[["release", "layout", "image"]].to_dict("records")})
    return out


def _subject_counts(ctx: StageContext, selection: pd.DataFrame, train_cases: Sequence[Triple],
                    heldout: Sequence[Triple]) -> dict:
    """Scans per release and subjects in all / training / held out."""
    info = _scan_info(ctx, selection)
    subj = {cid: s for cid, (s, _) in info.items()}

    def n_subjects(cases):
        return len({subj.get(c[0]) or verse_subject(c[0]) for c in cases})

    per_release = selection.groupby("release").size().astype(int).to_dict() if "release" in selection else {}
    return {"verse_per_release": per_release,
            "subjects": int(selection["subject"].nunique()) if "subject" in selection else None,
            "train_subjects": n_subjects(train_cases), "heldout_subjects": n_subjects(heldout)}


def record(ctx: StageContext, selection: pd.DataFrame, usable: Sequence[Triple], train_cases: Sequence[Triple],
           heldout: Sequence[Triple], result: TrainResult, heldout_scores: dict, cropped_summary: dict) -> Path:
    """The run record: the selection (scans per release, the duplicates kept once), the split by
    subject, training and the held-out / cropped scores."""
    dup_file = ctx.tables / DUPLICATES_TABLE
    duplicates = pd.read_csv(dup_file) if dup_file.exists() else pd.DataFrame()
    return ctx.write_record({
        "verse_scans": len(selection), "usable": len(usable), **_subject_counts(ctx, selection, train_cases, heldout),
        "duplicates": duplicates_summary(duplicates) if not duplicates.empty else [],
        "excluded": selection[~selection["usable"]][["case_id", "reason"]].to_dict("records"),
        "train_cases": [c[0] for c in train_cases], "heldout_cases": [c[0] for c in heldout],
        "train_seconds": result.seconds, "epochs": result.epochs, "stopped_by": result.stopped_by,
        "heldout": heldout_scores,
        "cropped": {"spine_dice": cropped_summary.get("mean_of_spine", {}).get("dice", {}).get("mean"),
                    "vertebra_dice": cropped_summary.get("mean_of_vertebrae", {}).get("dice", {}).get("mean")},
        "model_dir": str(ctx.models)})
