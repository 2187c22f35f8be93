"""Charts: Dice per vertebra, training curves, annotation effort, quality criteria, Dice vs z.

Every function returns a matplotlib Figure; save it with :func:`lib.viz.style.save_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lib.core import labels as L


def plot_dice_per_label(per_case: pd.DataFrame, title: str = "") -> Figure:
    """Bar chart of the mean Dice per vertebra (with case counts) from an evaluation table.

    Args:
        per_case: the per-case DataFrame of :func:`lib.evaluation.folders.evaluate_pairs` (columns
            ``label``, ``name``, ``status``, ``dice``); label 0 is the binary spine.
        title: figure title.

    Returns:
        A matplotlib Figure: one bar per vertebra in craniocaudal order, coloured by
        :mod:`lib.core.labels`, the binary spine as a line.
    """
    df = per_case[per_case["status"].isin(["detected", "missed", "failed"])] if "status" in per_case else per_case
    vert = df[df["label"] > 0]
    spine = df[df["label"] == 0]["dice"].mean() if (df["label"] == 0).any() else float("nan")
    labs = L.ordered(sorted(set(int(v) for v in vert["label"])))
    means = [float(vert[vert["label"] == v]["dice"].mean()) for v in labs]
    counts = [int((vert["label"] == v).sum()) for v in labs]
    fig, ax = plt.subplots(figsize=(max(6, 0.38 * len(labs) + 2), 3.6))
    colours = [np.array(L.LABELS[v].rgb) / 255 for v in labs]
    ax.bar(range(len(labs)), means, color=colours, edgecolor="black", linewidth=0.4)
    for i, (m, n) in enumerate(zip(means, counts, strict=True)):
        ax.text(i, min(m + 0.02, 1.02), str(n), ha="center", fontsize=6)
    if np.isfinite(spine):
        ax.axhline(spine, color="black", ls="--", lw=0.8, label=f"binary spine {spine:.3f}")
        ax.legend(fontsize=8, loc="lower left")
    ax.set_xticks(range(len(labs)), [L.name(v) for v in labs], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Dice (mean over cases)")
    mv = float(np.nanmean(means)) if means else float("nan")
    ax.set_title(title or f"mean of vertebrae {mv:.3f} (numbers: cases with the vertebra)", fontsize=9)
    fig.tight_layout()
    return fig



def plot_dice_by_vertebra(table2: pd.DataFrame) -> Figure:
    """Per-vertebra Dice by test set (lines), the paper's cells as markers where known."""
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
    return fig



def plot_training_curves(log_csv: str | Path, title: str | None = None) -> Figure:
    """Loss and Dice per epoch, one column per stage, from a ``train_log.csv`` (:mod:`lib.ml.trainer`)."""
    df = pd.read_csv(log_csv)
    stages = list(dict.fromkeys(df["stage"])) or ["-"]
    fig, axes = plt.subplots(2, len(stages), figsize=(4.2 * len(stages), 6), squeeze=False)
    for j, st in enumerate(stages):
        d = df[df["stage"] == st]
        ax = axes[0, j]
        ax.plot(d["epoch"], d["train_loss"], label="train loss")
        if d["val_loss"].notna().any():
            ax.plot(d["epoch"], d["val_loss"], label="val loss")
        ax.set_title(f"{st}: loss")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax = axes[1, j]
        for col, lab in (("train_dice_fg", "train Dice spine"), ("train_dice_mean", "train Dice mean class"),
                         ("val_dice_fg", "val Dice spine"), ("val_dice_mean", "val Dice mean class")):
            if col in d and d[col].notna().any():
                ax.plot(d["epoch"], d[col], label=lab, ls="-" if col.startswith("val") else ":")
        ax.set_ylim(0, 1)
        ax.set_xlabel("epoch")
        ax.set_title(f"{st}: Dice (patches)")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig



def plot_effort_by_round(rounds: pd.DataFrame, tiers: Sequence[str]) -> Figure:
    """Estimated minutes per case by annotation round, stacked by tier (``rounds.csv`` of 03)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(rounds))
    for t in tiers:
        col = f"minutes_{t}"
        if col in rounds:
            per_case = rounds[col].to_numpy() / rounds["cases"].clip(lower=1).to_numpy()
            ax.bar(rounds["round"], per_case, bottom=bottom, label=t)
            bottom += per_case
    ax.set_xlabel("round")
    ax.set_ylabel("estimated minutes per case")
    ax.set_title("Annotation effort per case by round")
    ax.legend(fontsize=8)
    for x, sp in zip(rounds["round"], rounds["split"], strict=True):
        ax.text(x, 0, sp.replace("test_", "t_"), rotation=90, va="bottom", ha="center", fontsize=7, color="white")
    fig.tight_layout()
    return fig



def plot_preannotation_dice(rounds: pd.DataFrame, cases: pd.DataFrame) -> Figure:
    """Pre-annotation Dice (vs the accepted mask) per case by round: boxes, points and the mean."""
    fig, ax = plt.subplots(figsize=(7, 4))
    data = [cases.loc[cases["round"] == r, "pre_dice"].dropna().to_numpy() for r in rounds["round"]]
    ax.boxplot(data, positions=list(rounds["round"]), widths=0.5)
    for r, d in zip(rounds["round"], data, strict=True):
        ax.scatter(np.full(len(d), r) + np.linspace(-0.15, 0.15, max(len(d), 1))[: len(d)], d, s=10, alpha=0.6)
    ax.plot(rounds["round"], rounds["pre_dice_mean"], "k--", lw=1, label="mean")
    ax.set_xlabel("round (model version = rounds of fine-tuning before it)")
    ax.set_ylabel("pre-annotation Dice vs accepted mask")
    ax.set_ylim(0, 1.02)
    ax.set_title("Pre-annotation quality by round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig



def plot_quality(records: Sequence[dict], failed: Sequence[bool], thresholds: Mapping[str, float],
                 sources: Sequence[str]) -> Figure:
    """Scatter of the measured criteria (noise, z extent, border fraction) per converted series,
    coloured by source, thresholds drawn (``max_noise_hu``, ``min_z_extent_mm``,
    ``max_slice_spacing_mm``, ``max_border_fraction``, ``min_slices``), failures (``failed``) marked."""
    recs = list(records)
    bad_of = {id(r): bool(f) for r, f in zip(recs, failed, strict=True)}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = {src: f"C{i}" for i, src in enumerate(sources)}
    specs = [("z_extent_mm", "noise_hu", "z extent (mm)", "noise SD (HU)"),
             ("slice_spacing_mm", "noise_hu", "slice spacing (mm)", "noise SD (HU)"),
             ("n_slices", "border_fraction", "slices", "body share of image border")]
    for ax, (xk, yk, xl, yl) in zip(axes, specs, strict=True):
        for src in sources:
            rs = [r for r in recs if r["source"] == src]
            if not rs:
                continue
            bad = [bad_of[id(r)] for r in rs]
            xs = [r["measures"][xk] for r in rs]
            ys = [r["measures"][yk] for r in rs]
            ax.scatter([x for x, b in zip(xs, bad, strict=True) if not b], [y for y, b in zip(ys, bad, strict=True) if not b],
                       s=18, c=colours[src], label=src, alpha=0.8)
            ax.scatter([x for x, b in zip(xs, bad, strict=True) if b], [y for y, b in zip(ys, bad, strict=True) if b],
                       s=60, c=colours[src], marker="x")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    axes[0].axhline(thresholds["max_noise_hu"], ls="--", c="k", lw=0.8)
    axes[0].axvline(thresholds["min_z_extent_mm"], ls="--", c="k", lw=0.8)
    axes[1].axhline(thresholds["max_noise_hu"], ls="--", c="k", lw=0.8)
    axes[1].axvline(thresholds["max_slice_spacing_mm"], ls="--", c="k", lw=0.8)
    axes[2].axhline(thresholds["max_border_fraction"], ls="--", c="k", lw=0.8)
    axes[2].axvline(thresholds["min_slices"], ls="--", c="k", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle("Measured quality criteria per converted series (x = fails a criterion; dashed = thresholds)")
    fig.tight_layout()
    return fig



def plot_dice_vs_z(summary: pd.DataFrame, highlight: str = "COVID19") -> Figure:
    """Mean vertebra Dice against z spacing, one line per model (solid: all test cases; dashed:
    the ``highlight`` subset)."""
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
    return fig
