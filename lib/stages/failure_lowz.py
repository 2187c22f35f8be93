"""Stage 06_failure_lowz: low z-resolution (thick slices) and the mitigation.

Notebook ``notebooks/06_failure_lowz.ipynb``; parameters ``params/<profile>/06_failure_lowz.yaml``.
The release test images are resampled to several z spacings by slab averaging
(:func:`lib.imaging.thick_slices.thick_slice_volume`), predicted by 04's model and by a
thick-slice-augmented fine-tune of it, resampled back (nearest neighbour) and scored on the
original grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib import metrics
from lib.core import labels as L
from lib.core.cases import Case
from lib.core.parallel import CaseFailure, map_cases
from lib.core.paths import find_model_dir
from lib.datasets.ctspine1k.ids import infer_source
from lib.datasets.ctspine1k.release import annotated_cases
from lib.evaluation.folders import truth_centroids
from lib.imaging.resampling import resample_nearest
from lib.imaging.thick_slices import thick_slice_volume
from lib.io.integrity import verify_case
from lib.io.nifti import load_volume, save_volume
from lib.ml import inference
from lib.ml.trainer import TrainResult, train
from lib.stages.context import StageContext, print_environment  # noqa: F401  (notebook API)
from lib.viz.charts import plot_dice_vs_z

STAGE = "06_failure_lowz"


def start(namespace: dict) -> StageContext:
    """Validate the notebook's parameters, create the stage folders, seed with ``P.seed``."""
    return StageContext.start(STAGE, namespace, seed=True)


def baseline_model(ctx: StageContext) -> Path:
    """04's final model."""
    return find_model_dir(ctx.paths.models("04_benchmark"))


def pick_per_source(cases: Sequence[Case], per_split: int, source_of) -> list[Case]:
    """At most ``per_split`` cases of each set, taken in turn from each source (sorted by name,
    cases in their listed order), so that a small sweep still holds every source (the first
    cases of a split are all one source when IDs sort by source). ``per_split`` 0: all."""
    if not per_split:
        return list(cases)
    out = []
    for set_name in dict.fromkeys(c.split for c in cases):
        queues: dict[str, list[Case]] = {}
        for c in (c for c in cases if c.split == set_name):
            queues.setdefault(source_of(c.case_id), []).append(c)
        picked, order = [], sorted(queues)
        while len(picked) < per_split and any(queues.values()):
            for src in order:
                if queues[src] and len(picked) < per_split:
                    picked.append(queues[src].pop(0))
        out.extend(c for c in cases if c in picked)
    return out


def sweep_cases(ctx: StageContext) -> tuple[list[Case], dict[str, str]]:
    """The swept release test cases (``max_cases`` per split, taken in turn from each source) and
    their source by case id."""
    cases = pick_per_source(annotated_cases(ctx.paths, list(ctx.P.splits)), ctx.P.max_cases, infer_source)
    return cases, {c.case_id: infer_source(c.case_id) for c in cases}


def describe_cases(cases: Sequence[Case], subset_of: dict[str, str]) -> str:
    """One line: cases and sources."""
    return f"{len(cases)} cases; sources: " + ", ".join(
        f"{k} {list(subset_of.values()).count(k)}" for k in sorted(set(subset_of.values())))


def train_augmented(ctx: StageContext, baseline: Path) -> TrainResult:
    """Fine-tune the baseline with thick-slice augmentation (``models/thick_aug``; 04's cache)."""
    P = ctx.P
    train_cases = annotated_cases(ctx.paths, ["trainset"])
    return train([c.triple() for c in train_cases], ctx.models / "thick_aug", init_from=baseline,
                 max_epochs=P.augmented_epochs, seed=P.seed, device=P.device, num_threads=P.num_threads,
                 augment={"thick_slice_prob": P.thick_slice_prob, "thick_slice_mm": list(P.thick_slice_mm)},
                 cache_dir=ctx.paths.stage("04_benchmark") / "cache")


@dataclass(frozen=True)
class LowzJob:
    """One (case, z spacing) of the low-z sweep (picklable)."""

    case_id: str
    set_name: str
    image: str
    truth: str
    z_mm: float
    model_dir: str
    work_dir: str
    device: str = "auto"


_MODEL_CACHE: dict[str, object] = {}


def run_lowz_job(job: LowzJob) -> dict:
    """Thick-slice the image to ``z_mm``, predict, resample the prediction back to the original
    grid (nearest neighbour) and score it against the truth there."""

    if job.model_dir not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[job.model_dir] = inference.load_model(job.model_dir, device=job.device)
    model = _MODEL_CACHE[job.model_dir]
    verify_case(job.image, job.truth, require_nonempty=True)
    img = load_volume(job.image)
    gt = np.asarray(load_volume(job.truth).array, dtype=np.uint8)
    native_z = float(img.spacing[2])
    thick, thick_aff = thick_slice_volume(np.asarray(img.array), img.affine, job.z_mm)
    thick_path = Path(job.work_dir) / "images" / f"z{job.z_mm:g}" / f"{job.case_id}.nii.gz"
    if not thick_path.exists():
        save_volume(thick, thick_aff, thick_path, dtype=np.int16)
    tv = load_volume(thick_path)
    pred_thick = inference.predict_volume(model, np.asarray(tv.array), tv.spacing, device=job.device)
    pred = resample_nearest(np.asarray(pred_thick, dtype=np.uint8), tv.affine, img.shape, img.affine)
    rows = metrics.evaluate_case(gt, pred, img.spacing, labels=L.CTSPINE1K_LABELS, affine=img.affine,
                                 gt_centroids=truth_centroids(Path(job.truth))[0])
    vert = [r for r in rows if r["label"] > 0 and r["status"] in ("detected", "missed")]
    spine = next((r for r in rows if r.get("label", 0) == 0), {})
    hd = [r["hd95"] for r in vert if r.get("hd95") is not None and np.isfinite(r["hd95"])]
    return {"case_id": job.case_id, "set": job.set_name, "z_mm": job.z_mm, "native_z_mm": native_z,
            "thick_slices": int(thick.shape[2]), "mean_vertebra_dice": float(np.mean([r["dice"] for r in vert])) if vert else np.nan,
            "spine_dice": spine.get("dice", np.nan), "mean_hd95_mm": float(np.mean(hd)) if hd else np.nan,
            "identification_rate": float(np.mean([bool(r.get("identified")) for r in vert])) if vert else np.nan,
            "failed": False, "failure": ""}


def lowz_sweep(model_dir: Path, cases: Sequence[Case], z_list: Sequence[float], work_dir: Path, model_name: str,
               workers: int = 0, device: str = "auto") -> pd.DataFrame:
    """Per case and z spacing: Dice / HD95 / identification of ``model_dir`` on thick-slice images.

    A (case, z) that fails stays in the table, scored as a failure: ``failed`` True, the message in
    ``failure``, vertebra and spine Dice 0 and identification 0 (so it pulls every mean down, as a
    missed case would); HD95 missing."""
    jobs = [LowzJob(c.case_id, c.split, str(c.image), str(c.mask), float(z), str(model_dir), str(work_dir), device)
            for z in z_list for c in cases]
    res = map_cases(run_lowz_job, jobs, ids=[f"{model_name}/{j.set_name}/{j.case_id}/z{j.z_mm:g}" for j in jobs],
                    workers=workers, on_error="collect", desc=f"low-z {model_name}")
    if not res.values:
        raise RuntimeError(f"low-z sweep of {model_name} ({model_dir}): all {len(jobs)} predictions failed; first: "
                           + (str(res.failures[0]) if res.failures else "no cases"))
    failed = {f.case_id: f.message for f in res.failures}
    rows = []
    for job, key in zip(jobs, [f"{model_name}/{j.set_name}/{j.case_id}/z{j.z_mm:g}" for j in jobs], strict=True):
        if key in failed:
            rows.append({"case_id": job.case_id, "set": job.set_name, "z_mm": job.z_mm, "native_z_mm": np.nan,
                         "thick_slices": 0, "mean_vertebra_dice": 0.0, "spine_dice": 0.0, "mean_hd95_mm": np.nan,
                         "identification_rate": 0.0, "failed": True, "failure": failed[key]})
        else:
            rows.append(res.values[key])
    df = pd.DataFrame(rows)
    df.insert(0, "model", model_name)
    return df


def summarise_lowz(per_case: pd.DataFrame, subset_of) -> pd.DataFrame:
    """``dice_vs_z.csv``: mean metrics per model, z and subset (all, and per source subset)."""
    df = per_case.copy()
    df["subset"] = df["case_id"].map(subset_of)
    parts = [df.assign(subset="all"), df]
    both = pd.concat(parts, ignore_index=True)
    g = both.groupby(["model", "subset", "z_mm"])
    out = g.agg(cases=("case_id", "nunique"), failed=("failed", "sum"), mean_vertebra_dice=("mean_vertebra_dice", "mean"),
                sd_vertebra_dice=("mean_vertebra_dice", "std"), spine_dice=("spine_dice", "mean"),
                mean_hd95_mm=("mean_hd95_mm", "mean"), identification_rate=("identification_rate", "mean"),
                native_z_mm=("native_z_mm", "mean")).reset_index()
    return out


def sweep(ctx: StageContext, models: dict[str, Path], cases: Sequence[Case], subset_of: dict[str, str]
          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every model over every case and z spacing; writes ``tables/lowz_per_case.csv`` and
    ``tables/dice_vs_z.csv`` and returns both."""
    per_case = pd.concat([lowz_sweep(model_dir, cases, ctx.P.z_mm_list, ctx.dir / "work", name, workers=ctx.P.workers,
                                     device=ctx.P.device) for name, model_dir in models.items()], ignore_index=True)
    ctx.save_table(per_case, "lowz_per_case.csv")
    for r in per_case[per_case["failed"].astype(bool)].itertuples():
        ctx.add_failures(f"sweep {r.model} z{r.z_mm:g}", [CaseFailure(f"{r.set}/{r.case_id}", r.failure)])
    summary = summarise_lowz(per_case, subset_of.get)
    ctx.save_table(summary, "dice_vs_z.csv")
    return per_case, summary


def save_dice_vs_z(ctx: StageContext, summary: pd.DataFrame) -> tuple[Path, pd.Series]:
    """``figures/dice_vs_z.png`` and the mean vertebra Dice of each model at 4.5 mm."""
    png = ctx.save_figure(plot_dice_vs_z(summary), "dice_vs_z.png")
    at45 = summary[(summary["subset"] == "all") & (summary["z_mm"] == 4.5)].set_index("model")["mean_vertebra_dice"]
    return png, at45
