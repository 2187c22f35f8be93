"""Benchmark and failure-analysis stages (04_benchmark, 05_failure_l6, 06_failure_lowz).

The notebooks stay thin; the loops over cases, the figures and the table builders live here.

* Test sets: ``test_public`` and ``test_private`` from the release (masks from the annotation
  rounds), ``Test_VerSe`` from the VerSe subjects held out of pretraining.
* :func:`predict_sets` / :func:`evaluate_sets`: predictions under ``<stage>/predictions/<set>/``
  and evaluation with :mod:`lib.evaluate` (per-case CSV + summary JSON per set), Table 2.
* :func:`label_shift_cases`: the dislocation detector and our correction on every test case,
  evaluated before/after.
* :func:`lowz_sweep`: thick-slice resampling of test images to several z spacings,
  prediction, and evaluation in the original grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core import labels as L
from lib.imaging.label_shift import correct_label_shift, dislocation, label_shift_table
from lib.imaging.resampling import resample_nearest
from lib.imaging.thick_slices import thick_slice_volume
from lib.io import load_volume, save_like, save_volume, strip_nifti_suffix

SET_NAMES = ("test_public", "test_private", "Test_VerSe")


@dataclass(frozen=True)
class TestCase:
    """One evaluated case: id, set, image and truth paths."""

    case_id: str
    set_name: str
    image: Path
    truth: Path


def release_test_cases(paths, splits: Sequence[str] = ("test_public", "test_private")) -> list[TestCase]:
    """Release test cases with their annotated masks; a missing mask is an error naming it."""
    out, missing = [], []
    for split in splits:
        for img in sorted(paths.split_dir(split, "data").glob("*.nii.gz")):
            cid = strip_nifti_suffix(img)
            gt = paths.split_dir(split, "gt") / f"{cid}_seg.nii.gz"
            (out if gt.exists() else missing).append(TestCase(cid, split, img, gt))
    if missing:
        raise FileNotFoundError(f"{len(missing)} test case(s) without a mask (run 03_annotation): "
                                + ", ".join(str(m.truth) for m in missing[:5]))
    return out


def pick_per_source(cases: Sequence[TestCase], per_split: int, source_of) -> list[TestCase]:
    """At most ``per_split`` cases of each set, taken in turn from each source (sorted by name,
    cases in their listed order), so that a small sweep still holds every source (the first
    cases of a split are all one source when IDs sort by source). ``per_split`` 0: all."""
    if not per_split:
        return list(cases)
    out = []
    for set_name in dict.fromkeys(c.set_name for c in cases):
        queues: dict[str, list[TestCase]] = {}
        for c in (c for c in cases if c.set_name == set_name):
            queues.setdefault(source_of(c.case_id), []).append(c)
        picked, order = [], sorted(queues)
        while len(picked) < per_split and any(queues.values()):
            for src in order:
                if queues[src] and len(picked) < per_split:
                    picked.append(queues[src].pop(0))
        out.extend(c for c in cases if c in picked)
    return out


def trainset_triples(paths) -> list[tuple[str, str, str]]:
    """``(case_id, image, mask)`` of every trainset case; a missing mask is an error."""
    triples, missing = [], []
    for img in sorted(paths.split_dir("trainset", "data").glob("*.nii.gz")):
        cid = strip_nifti_suffix(img)
        gt = paths.split_dir("trainset", "gt") / f"{cid}_seg.nii.gz"
        if gt.exists():
            triples.append((cid, str(img), str(gt)))
        else:
            missing.append(str(gt))
    if missing:
        raise FileNotFoundError(f"{len(missing)} trainset mask(s) missing (run 03_annotation): {missing[:5]}")
    if not triples:
        raise FileNotFoundError(f"{paths.split_dir('trainset', 'data')}: no trainset images")
    return triples


def verse_test_cases(paths) -> list[TestCase]:
    """Test_VerSe: every VerSe scan 02_pretraining did not train on whose mask shares the image
    grid — the held-out complete scans and the cropped scans (from its ``tables/split.csv`` and
    ``tables/verse_selection.csv``)."""
    tab = paths.tables("02_pretraining")
    split_csv, sel_csv = tab / "split.csv", tab / "verse_selection.csv"
    for f in (split_csv, sel_csv):
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing; run 02_pretraining first")
    trained = set(pd.read_csv(split_csv).query("split == 'train'")["case_id"].astype(str))
    sel = pd.read_csv(sel_csv)
    keep = sel[~sel["case_id"].astype(str).isin(trained)
               & (sel["usable"].astype(bool) | sel["reason"].astype(str).str.startswith("cropped"))]
    return [TestCase(str(r.case_id), "Test_VerSe", Path(r.image), Path(r.mask)) for r in keep.itertuples()]


def prediction_path(stage_dir: Path, case: TestCase, sub: str = "predictions") -> Path:
    return Path(stage_dir) / sub / case.set_name / f"{case.case_id}_seg.nii.gz"


def predict_sets(model_dir: Path, cases: Sequence[TestCase], stage_dir: Path, tta: bool = False,
                 workers: int = 0, device: str = "auto", num_threads: int | None = None):
    """Predict every test case (skipping existing outputs); returns the MapResult."""
    from lib import infer

    items = [(f"{c.set_name}/{c.case_id}", str(c.image), str(prediction_path(stage_dir, c))) for c in cases]
    for _, _, out in items:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    return infer.predict_cases(model_dir, items, workers=workers, tta=tta, device=device,
                               num_threads=num_threads, on_error="collect")


def evaluate_sets(cases: Sequence[TestCase], stage_dir: Path, hd95: str = "pooled", workers: int = 0,
                  sub: str = "predictions", eval_sub: str = "evaluation") -> tuple[pd.DataFrame, dict[str, dict]]:
    """Evaluate predictions per test set with :mod:`lib.evaluate`; writes
    ``<stage>/<eval_sub>/<set>/`` (per-case CSV, summary JSON, Table 2 of the set).

    Returns:
        (all per-case rows with a ``set`` column, ``{set: summary}``).
    """
    from lib import evaluate

    frames, summaries = [], {}
    for set_name in dict.fromkeys(c.set_name for c in cases):
        mine = [c for c in cases if c.set_name == set_name]
        labels = list(L.CTSPINE1K_LABELS) + ([L.T13] if set_name == "Test_VerSe" else [])
        pairs = [(c.case_id, c.truth, prediction_path(stage_dir, c, sub)) for c in mine]
        df, summary = evaluate.evaluate_pairs(pairs, labels=labels, hd95=hd95, workers=workers, progress=False)
        summary["set_name"] = set_name
        evaluate.write_results(df, summary, Path(stage_dir) / eval_sub / set_name, set_name=set_name)
        frames.append(df.assign(set=set_name))
        summaries[set_name] = summary
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), summaries


def case_scores(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per case: mean vertebra Dice (labels in truth), spine Dice, identification rate."""
    vert = per_case[(per_case["label"] > 0) & per_case["status"].isin(["detected", "missed"])]
    g = vert.groupby(["set", "case_id"])
    out = pd.DataFrame({"mean_vertebra_dice": g["dice"].mean(),
                        "identification_rate": g["identified"].mean(),
                        "vertebrae": g.size()})
    spine = per_case[per_case["label"] == 0].set_index(["set", "case_id"])["dice"].rename("spine_dice")
    return out.join(spine).reset_index()


# ----------------------------------------------------------------------------- figures


def _save(fig, path: Path) -> Path:
    from lib.viz import save_figure

    save_figure(fig, path)
    return Path(path)


def plot_dice_by_vertebra(table2: pd.DataFrame, path: Path) -> Path:
    """Per-vertebra Dice by test set (lines), the paper's cells as markers where known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table2.index if r in L.NAME_TO_VALUE]
    fig, ax = plt.subplots(figsize=(11, 4))
    for col in [c for c in table2.columns if c.endswith(" DSC")]:
        set_name = col[: -len(" DSC")]
        y = table2.loc[rows, col].to_numpy(dtype=float)
        ax.plot(range(len(rows)), y, marker="o", ms=4, label=set_name)
        pcol = f"{set_name} DSC (paper)"
        if pcol in table2:
            py = table2.loc[rows, pcol].to_numpy(dtype=float)
            ok = np.isfinite(py)
            if ok.any():
                ax.scatter(np.arange(len(rows))[ok], py[ok], marker="x", s=60, color=ax.lines[-1].get_color(),
                           label=f"{set_name} (paper)")
    ax.set_xticks(range(len(rows)), rows, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title("Per-vertebra Dice by test set (missing = vertebra absent from that set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return _save(fig, path)


def plot_gallery(scores: pd.DataFrame, cases: Sequence[TestCase], stage_dir: Path, path: Path) -> Path:
    """Best, median and worst case by mean vertebra Dice: sagittal CT with truth / prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    s = scores.dropna(subset=["mean_vertebra_dice"]).sort_values("mean_vertebra_dice")
    if s.empty:
        raise ValueError("no scored cases for the gallery")
    picks = [("worst", s.iloc[0]), ("median", s.iloc[len(s) // 2]), ("best", s.iloc[-1])]
    by_key = {(c.set_name, c.case_id): c for c in cases}
    cmap = ListedColormap(L.colour_lut(28))
    fig, axes = plt.subplots(2, 3, figsize=(11, 8))
    for col, (name, row) in enumerate(picks):
        c = by_key[(row["set"], row["case_id"])]
        img = load_volume(c.image)
        gt = load_volume(c.truth).array
        pr = load_volume(prediction_path(stage_dir, c)).array
        xs = np.flatnonzero((gt > 0).any(axis=(1, 2)))
        x = int(np.median(xs)) if xs.size else img.shape[0] // 2
        sx, sy, sz = img.spacing
        for r, (what, m) in enumerate((("truth", gt), ("prediction", pr))):
            ax = axes[r][col]
            ax.imshow(np.rot90(img.array[x]), cmap="gray", vmin=-500, vmax=1300, aspect=sz / sy)
            ax.imshow(np.ma.masked_equal(np.rot90(m[x]).astype(int), 0), cmap=cmap, vmin=0, vmax=28, alpha=0.5,
                      aspect=sz / sy, interpolation="nearest")
            ax.set_title(f"{name}: {c.case_id} ({c.set_name})\n{what}, Dice {row['mean_vertebra_dice']:.2f}"
                         if r == 0 else what, fontsize=8)
            ax.axis("off")
    fig.suptitle("Best / median / worst test case (mean vertebra Dice)")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- 05: label shift


def label_shift_cases(cases: Sequence[TestCase], stage04: Path, out_dir: Path, variant_of,
                      anchors: str = "both") -> pd.DataFrame:
    """Dislocation detector and correction on every test case.

    For each case: the label-shift table of the prediction (``lib.analysis``), whether it is
    dislocated, the truth's variant (``variant_of(truth)``), and our correction; the corrected
    mask is saved under ``out_dir/corrected/<set>/``; ``anchors``: see
    :func:`lib.analysis.correct_label_shift`.

    Returns:
        One row per case: dislocated, offset, run length, shifted labels, variant, whether the
        correction was applied, its anchor and shift, labels before/after.
    """
    rows = []
    for c in cases:
        img = load_volume(c.image)
        gt = np.asarray(load_volume(c.truth).array, dtype=np.uint8)
        pred_path = prediction_path(stage04, c)
        pv = load_volume(pred_path)
        pred = np.asarray(pv.array, dtype=np.uint8)
        tab = label_shift_table(gt, pred, img.affine)
        d = dislocation(tab)
        fixed, info = correct_label_shift(np.asarray(img.array), pred, img.affine, anchors=anchors)
        save_like(fixed, pv, prediction_path(out_dir, c, "corrected"), dtype=np.uint8)
        after = dislocation(label_shift_table(gt, fixed, img.affine))
        rows.append({"set": c.set_name, "case_id": c.case_id, "variant": variant_of(gt) or "normal",
                     "dislocated": d.dislocated, "offset": d.offset, "run_length": d.run_length,
                     "shifted_labels": " ".join(d.shifted_labels), "correction_applied": info.applied,
                     "anchor": info.anchor, "shift": info.shift, "labels_before": " ".join(info.labels_before),
                     "labels_after": " ".join(info.labels_after), "dislocated_after": after.dislocated})
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
    groups = {"all": scores, "dislocated": scores[scores["dislocated"]],
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
            sub = df[(df["set"] == set_name) & (df["name"] == name) & df["status"].isin(["detected", "missed"])]
            r["cases"] = len(sub)
            r[f"dice_{tag}"] = sub["dice"].mean() if len(sub) else np.nan
            r[f"id_rate_{tag}"] = sub["identified"].mean() if len(sub) else np.nan
            r[f"missed_{tag}"] = int((sub["status"] == "missed").sum())
        rows.append(r)
    return pd.DataFrame(rows)


def plot_shift_cases(shift: pd.DataFrame, cases: Sequence[TestCase], stage04: Path, stage05: Path, path: Path,
                     max_cases: int = 6) -> Path | None:
    """Sagittal views of dislocated and variant cases: truth, prediction, corrected, labels
    written on. The cases the correction changed come first (L6 cases before the others), then
    the remaining dislocated cases, in table order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from lib.metrics import centroids_mm

    rank = np.where(shift["correction_applied"], np.where(shift["variant"] == "L6", 0, 1),
                    np.where(shift["dislocated"], 2, 3))
    sel = shift.assign(_rank=rank)[rank < 3].sort_values("_rank", kind="stable").head(max_cases)
    if sel.empty:
        return None
    by_key = {(c.set_name, c.case_id): c for c in cases}
    cmap = ListedColormap(L.colour_lut(28))
    fig, axes = plt.subplots(len(sel), 3, figsize=(10, 4.2 * len(sel)), squeeze=False)
    for r, (_, row) in enumerate(sel.iterrows()):
        c = by_key[(row["set"], row["case_id"])]
        img = load_volume(c.image)
        masks = [("truth", load_volume(c.truth).array), ("prediction", load_volume(prediction_path(stage04, c)).array),
                 ("corrected", load_volume(prediction_path(stage05, c, "corrected")).array)]
        gt = masks[0][1]
        xs = np.flatnonzero((gt > 0).any(axis=(1, 2)))
        x = int(np.median(xs)) if xs.size else img.shape[0] // 2
        sx, sy, sz = img.spacing
        inv = np.linalg.inv(img.affine)
        for col, (what, m) in enumerate(masks):
            ax = axes[r][col]
            ax.imshow(np.rot90(img.array[x]), cmap="gray", vmin=-500, vmax=1300, aspect=sz / sy)
            ax.imshow(np.ma.masked_equal(np.rot90(m[x]).astype(int), 0), cmap=cmap, vmin=0, vmax=28, alpha=0.5,
                      aspect=sz / sy, interpolation="nearest")
            for lab, cen in centroids_mm(np.asarray(m), img.affine).items():
                v = inv @ np.r_[cen, 1.0]
                ax.text(v[1], img.shape[2] - 1 - v[2], L.name(lab),
                        color="yellow", fontsize=6, ha="center", va="center")
            title = f"{c.case_id} ({row['variant']})\n{what}" if col == 0 else what
            if col == 1:
                title += (f" — offset {row['offset']:+.0f} over {row['run_length']}" if row["dislocated"]
                          else " — not dislocated")
            if col == 2:
                title += f": {row['anchor']}" if row["correction_applied"] else ": unchanged"
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- 06: low z


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
    from lib import infer, metrics

    if job.model_dir not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[job.model_dir] = infer.load_model(job.model_dir, device=job.device)
    model = _MODEL_CACHE[job.model_dir]
    img = load_volume(job.image)
    gt = np.asarray(load_volume(job.truth).array, dtype=np.uint8)
    native_z = float(img.spacing[2])
    thick, thick_aff = thick_slice_volume(np.asarray(img.array), img.affine, job.z_mm)
    thick_path = Path(job.work_dir) / "images" / f"z{job.z_mm:g}" / f"{job.case_id}.nii.gz"
    if not thick_path.exists():
        save_volume(thick, thick_aff, thick_path, dtype=np.int16)
    tv = load_volume(thick_path)
    pred_thick = infer.predict_volume(model, np.asarray(tv.array), tv.spacing, device=job.device)
    pred = resample_nearest(np.asarray(pred_thick, dtype=np.uint8), tv.affine, img.shape, img.affine)
    rows = metrics.evaluate_case(gt, pred, img.spacing, labels=L.CTSPINE1K_LABELS, affine=img.affine)
    vert = [r for r in rows if r["label"] > 0 and r["status"] in ("detected", "missed")]
    spine = next((r for r in rows if r.get("label", 0) == 0), {})
    hd = [r["hd95"] for r in vert if r.get("hd95") is not None and np.isfinite(r["hd95"])]
    return {"case_id": job.case_id, "set": job.set_name, "z_mm": job.z_mm, "native_z_mm": native_z,
            "thick_slices": int(thick.shape[2]), "mean_vertebra_dice": float(np.mean([r["dice"] for r in vert])) if vert else np.nan,
            "spine_dice": spine.get("dice", np.nan), "mean_hd95_mm": float(np.mean(hd)) if hd else np.nan,
            "identification_rate": float(np.mean([bool(r.get("identified")) for r in vert])) if vert else np.nan}


def lowz_sweep(model_dir: Path, cases: Sequence[TestCase], z_list: Sequence[float], work_dir: Path, model_name: str,
               workers: int = 0, device: str = "auto") -> pd.DataFrame:
    """Per case and z spacing: Dice / HD95 / identification of ``model_dir`` on thick-slice images."""
    from lib.core.parallel import map_cases

    jobs = [LowzJob(c.case_id, c.set_name, str(c.image), str(c.truth), float(z), str(model_dir), str(work_dir), device)
            for z in z_list for c in cases]
    res = map_cases(run_lowz_job, jobs, ids=[f"{model_name}/{j.set_name}/{j.case_id}/z{j.z_mm:g}" for j in jobs],
                    workers=workers, on_error="collect", desc=f"low-z {model_name}")
    if res.failures:
        print(f"low-z sweep: {len(res.failures)} failed: " + "; ".join(str(f) for f in res.failures[:5]))
    if not res.values:
        raise RuntimeError(f"low-z sweep of {model_name} ({model_dir}): all {len(jobs)} predictions failed; first: "
                           + (str(res.failures[0]) if res.failures else "no cases"))
    df = pd.DataFrame(list(res.values.values()))
    df.insert(0, "model", model_name)
    return df


def summarise_lowz(per_case: pd.DataFrame, subset_of) -> pd.DataFrame:
    """``dice_vs_z.csv``: mean metrics per model, z and subset (all, and per source subset)."""
    df = per_case.copy()
    df["subset"] = df["case_id"].map(subset_of)
    parts = [df.assign(subset="all"), df]
    both = pd.concat(parts, ignore_index=True)
    g = both.groupby(["model", "subset", "z_mm"])
    out = g.agg(cases=("case_id", "nunique"), mean_vertebra_dice=("mean_vertebra_dice", "mean"),
                sd_vertebra_dice=("mean_vertebra_dice", "std"), spine_dice=("spine_dice", "mean"),
                mean_hd95_mm=("mean_hd95_mm", "mean"), identification_rate=("identification_rate", "mean"),
                native_z_mm=("native_z_mm", "mean")).reset_index()
    return out


def plot_dice_vs_z(summary: pd.DataFrame, path: Path, highlight: str = "COVID19") -> Path:
    """Mean vertebra Dice against z spacing, one line per model (solid: all test cases; dashed:
    the ``highlight`` subset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "mean_vertebra_dice", "mean vertebra Dice"),
                              (axes[1], "spine_dice", "spine (binary) Dice")):
        for i, model in enumerate(dict.fromkeys(summary["model"])):
            colour = f"C{i}"
            for subset, style in (("all", "-"), (highlight, "--")):
                s = summary[(summary["model"] == model) & (summary["subset"] == subset)].sort_values("z_mm")
                if not s.empty:
                    ax.plot(s["z_mm"], s[metric], style, marker="o", color=colour,
                            label=f"{model} ({'all test' if subset == 'all' else subset})")
        ax.set_xlabel("z spacing = slice thickness (mm)")
        ax.set_ylabel(label)
        ax.axvline(4.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Segmentation against slice thickness (4.5 mm = COVID-19 scans)")
    fig.tight_layout()
    return _save(fig, path)
