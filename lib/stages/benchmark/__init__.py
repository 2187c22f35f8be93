"""Stage 04_benchmark: the final model on Test_public, Test_private and Test_VerSe (Table 2), and
on the cropped VerSe scans (VerSe_cropped) for information.

Notebook ``notebooks/04_benchmark.ipynb``; parameters ``params/<profile>/04_benchmark.yaml``.
The final model is trained on the trainset masks of the annotation rounds (warm-started from the
last round's model, the VerSe-pretrained one, or from scratch as the paper's nnU-Net), predicts
every test case (``predictions/<set>/<ID>_seg.nii.gz``), and is evaluated per set
(``evaluation/<set>/``: per-case CSV, summary JSON, Table 2 of the set) with :mod:`lib.evaluation`.
Test_VerSe follows what the final model has seen (:mod:`lib.datasets.benchmark_sets`): from
scratch, every usable VerSe scan (the paper's); warm-started from a VerSe-pretrained model, the
usable scans 02 held out. ``tables/test_verse_cases.csv`` lists each VerSe scan and why it is in a
set or not; the run record and ``tables/table2.md`` state the definition that applied.

``backend`` chooses who trains and predicts: ``cascade`` (the workspace's MONAI cascade) or
``nnunetv2`` (nnU-Net v2 itself, from scratch as the paper; :mod:`lib.stages.benchmark.nnunet_backend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lib.core.cases import Case
from lib.core.parallel import MapResult
from lib.core.paths import find_model_dir, prediction_path
from lib.datasets.benchmark_sets import (
    VERSE_SETS_TABLE,
    benchmark_test_cases,
    pretrained_on_verse,
    verse_sets,
)
from lib.datasets.ctspine1k.release import annotated_cases
from lib.datasets.ctspine1k.table1 import build_table1
from lib.datasets.verse import TEST_VERSE, VERSE_CROPPED, test_verse_definition, verse_cases
from lib.evaluation.sets import evaluate_sets
from lib.evaluation.summary import case_scores
from lib.evaluation.table2 import build_table2, table2_markdown
from lib.io.atomic import write_text
from lib.io.nifti import load_volume
from lib.ml.inference import predict_cases
from lib.ml.trainer import train
from lib.stages.benchmark import nnunet_backend
from lib.stages.benchmark.nnunet_backend import side_by_side  # noqa: F401  (notebook API)
from lib.stages.context import StageContext, print_environment  # noqa: F401  (notebook API)
from lib.viz.browser import CaseBrowser
from lib.viz.charts import plot_dice_by_vertebra, plot_training_curves
from lib.viz.gallery import plot_gallery
from lib.viz.preview import preview_3d
from lib.viz.render3d import plot_3d

STAGE = "04_benchmark"


def start(namespace: dict) -> StageContext:
    """Validate the notebook's parameters, create the stage folders, seed with ``P.seed``.

    Raises:
        ValueError: ``backend: nnunetv2`` with ``init_from`` other than ``scratch`` (nnU-Net v2
            trains from scratch here, as the paper's did).
    """
    ctx = StageContext.start(STAGE, namespace, seed=True)
    if ctx.P.backend == "nnunetv2" and ctx.P.init_from != "scratch":
        raise ValueError(f"04_benchmark: backend nnunetv2 trains from scratch, as the paper's nnU-Net; set "
                         f"init_from: scratch (it is {ctx.P.init_from!r}) or backend: cascade")
    return ctx


def initial_model(ctx: StageContext) -> Path | None:
    """The model the final one starts from: ``annotation`` (the last round's, 03),
    ``pretrained`` (02) or ``scratch`` (None, as the paper's nnU-Net)."""
    pp = ctx.paths
    return {"annotation": lambda: find_model_dir(pp.stage("03_annotation") / "models"),
            "pretrained": lambda: find_model_dir(pp.models("02_pretraining")),
            "scratch": lambda: None}[ctx.P.init_from]()


def trainset(ctx: StageContext) -> list[Case]:
    """Every trainset case with its accepted mask (a missing mask is an error naming it)."""
    return annotated_cases(ctx.paths, ["trainset"])


def evaluation_cases(ctx: StageContext, include_verse: bool = True) -> list[Case]:
    """Test_public and Test_private (release masks from the annotation rounds) and, with
    ``include_verse``, Test_VerSe and VerSe_cropped for a model started from ``init_from``
    (:func:`lib.datasets.benchmark_sets.verse_sets`); writes ``tables/test_verse_cases.csv``
    (every VerSe scan, its set, why) and prints the definition of Test_VerSe that applies."""
    cases = benchmark_test_cases(ctx.paths, include_verse=False)
    if include_verse:
        table, definition = verse_sets(ctx.paths, ctx.P.init_from)
        ctx.save_table(table, VERSE_SETS_TABLE)
        print(definition)
        cases += verse_cases(table)
    return cases


def verse_definition(ctx: StageContext) -> str | None:
    """The definition of the VerSe sets this run evaluated (from ``tables/test_verse_cases.csv``),
    or None when it evaluated no VerSe."""
    f = ctx.tables / VERSE_SETS_TABLE
    if not (ctx.P.include_verse and f.exists()):
        return None
    table = pd.read_csv(f, dtype={"case_id": str}, keep_default_na=False)
    return test_verse_definition(table, pretrained_on_verse(ctx.P.init_from))


def describe_cases(train_cases: Sequence[Case], cases: Sequence[Case]) -> str:
    """One line: trainset size and test cases per set."""
    return f"trainset {len(train_cases)} cases; test cases: " + ", ".join(
        f"{s} {sum(c.split == s for c in cases)}" for s in dict.fromkeys(c.split for c in cases))


def train_final(ctx: StageContext, train_cases: Sequence[Case], init: Path | None):
    """Train the final model and save its training curves (``figures/training_curves.png``):
    the cascade into ``models/final`` (a :class:`lib.ml.trainer.TrainResult`), or nnU-Net v2 into
    ``nnunet/nnUNet_results`` (a :class:`lib.ml.nnunet.NnunetTrainResult`)."""
    P = ctx.P
    if P.backend == "nnunetv2":
        return nnunet_backend.train_nnunet(ctx, train_cases)
    result = train([c.triple() for c in train_cases], ctx.models / "final", init_from=init, max_epochs=P.max_epochs,
                   lr=P.learning_rate or None, seed=P.seed, device=P.device, num_threads=P.num_threads,
                   cache_dir=ctx.dir / "cache")
    ctx.save_figure(plot_training_curves(result.log_csv, title="04_benchmark: final model"), "training_curves.png")
    return result


def predict(ctx: StageContext, model_dir: Path, cases: Sequence[Case]) -> tuple[list[Case], MapResult]:
    """Predict every test case into ``predictions/<set>/`` (existing outputs are kept: re-runs
    resume); returns the cases with ``prediction`` set and the map result (failures listed)."""
    if ctx.P.backend == "nnunetv2":
        return nnunet_backend.predict_nnunet(ctx, model_dir, cases)
    out = [c.with_prediction(prediction_path(ctx.dir, c.split, c.case_id)) for c in cases]
    for c in out:
        c.prediction.parent.mkdir(parents=True, exist_ok=True)
    items = [(f"{c.split}/{c.case_id}", str(c.image), str(c.prediction)) for c in out]
    res = predict_cases(model_dir, items, workers=ctx.P.workers, tta=ctx.P.tta, device=ctx.P.device, on_error="collect")
    ctx.add_failures("predict", res.failures)
    return out, res


def evaluate(ctx: StageContext, cases: Sequence[Case]) -> tuple[pd.DataFrame, dict[str, dict], pd.DataFrame]:
    """Evaluate per set (``evaluation/<set>/``); returns the per-case rows, the summaries and the
    per-case scores (written as ``tables/case_scores.csv``). A case that could not be predicted
    or scored is in every table as a failure (Dice 0, ``failed``) and in ``failed_cases.csv``."""
    per_case, summaries = evaluate_sets(cases, ctx.dir / "evaluation", hd95=ctx.P.hd95, workers=ctx.P.workers)
    for set_name, summary in summaries.items():
        ctx.add_failures(f"evaluate {set_name}", summary.get("failed_cases", []))
    scores = case_scores(per_case)
    ctx.save_table(scores, "case_scores.csv")
    return per_case, summaries, scores


def write_table2(ctx: StageContext, summaries: dict[str, dict]) -> pd.DataFrame:
    """Table 2 beside the paper (``tables/table2.csv`` and ``table2.md``; the markdown ends with
    the definition of Test_VerSe / VerSe_cropped that applied, when they were evaluated)."""
    table2 = build_table2(summaries)
    ctx.save_table(table2, "table2.csv", index=True)
    text = table2_markdown(table2)
    definition = verse_definition(ctx)
    if definition and ({TEST_VERSE, VERSE_CROPPED} & set(summaries)):
        text += f"\n\n{definition} (init_from: {ctx.P.init_from}; cases: tables/{VERSE_SETS_TABLE})"
    write_text(ctx.tables / "table2.md", text + "\n")
    return table2


def write_table1(ctx: StageContext) -> pd.DataFrame:
    """Table 1 with vertebra counts from the annotated masks (``tables/table1.csv``)."""
    table1 = build_table1(ctx.paths, with_masks=True)
    ctx.save_table(table1, "table1.csv")
    return table1


def scored_cases(scores: pd.DataFrame) -> pd.DataFrame:
    """The per-case scores of the cases that were scored (failed cases have nothing to draw)."""
    return scores[~scores["failed"].astype(bool)] if "failed" in scores else scores


def median_case(scores: pd.DataFrame, cases: Sequence[Case]) -> Case:
    """The scored case of median mean vertebra Dice."""
    scores = scored_cases(scores)
    if scores.empty:
        raise ValueError("no test case was scored: nothing to draw (see failed_cases.csv)")
    median = scores.sort_values("mean_vertebra_dice").iloc[len(scores) // 2]
    return next(c for c in cases if c.case_id == median["case_id"] and c.split == median["set"])


def save_figures(ctx: StageContext, table2: pd.DataFrame, scores: pd.DataFrame, cases: Sequence[Case]) -> list[Path]:
    """Dice by vertebra (paper beside run), best / median / worst of the scored cases, a 3D render
    of the median case."""
    c = median_case(scores, cases)
    render = plot_3d(load_volume(c.prediction).array, load_volume(c.image).spacing, title=f"{c.case_id}: prediction")
    return [ctx.save_figure(plot_dice_by_vertebra(table2), "dice_by_vertebra.png"),
            ctx.save_figure(plot_gallery(scored_cases(scores), cases), "gallery_best_median_worst.png"),
            ctx.save_figure(render, "render3d_median_prediction.png", dpi=90)]


def explore(ctx: StageContext, cases: Sequence[Case]):
    """The case browser over the test cases (interactive sessions) and a 3D preview of the first
    case: itkwidgets only when asked for and online; a saved offline render otherwise."""
    browser = CaseBrowser(cases) if ctx.P.interactive else None
    preview = preview_3d(cases[0], interactive=ctx.P.interactive, use_itkwidgets=ctx.P.use_itkwidgets,
                         offline_png=ctx.figures / f"preview3d_{cases[0].case_id}.png")
    return browser, preview


def record(ctx: StageContext, result, init: Path | None, pred: MapResult, summaries: dict) -> Path:
    """The run record: backend, training, initial model, prediction failures, mean vertebra Dice per set."""
    return ctx.write_record({
        "backend": ctx.P.backend, "train": result.to_json(), "init_from": str(init), "prediction_failures": [str(f) for f in pred.failures],
        "mean_of_vertebrae": {s: v.get("mean_of_vertebrae", {}).get("dice", {}).get("mean") for s, v in summaries.items()},
        "hd95_definition": ctx.P.hd95, "test_verse_definition": verse_definition(ctx),
        "cases_per_set": {s: v.get("n_cases") for s, v in summaries.items()},
        "failed_per_set": {s: len(v.get("failed_cases", [])) for s, v in summaries.items()}})
