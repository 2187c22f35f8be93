"""Galleries of cases: best / median / worst, dislocated cases before and after the correction,
one preview per source of a release.

Cases are :class:`lib.core.cases.Case` with ``mask`` (truth) and ``prediction`` set; volumes are
read with :func:`lib.io.load_volume` (RAS+). Every function returns a matplotlib Figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lib.core import labels as L
from lib.core.cases import Case
from lib.core.paths import SPLITS
from lib.datasets.ctspine1k.ids import infer_source
from lib.io.integrity import load_mask
from lib.io.nifti import load_ct, strip_nifti_suffix
from lib.metrics.centroids import centroids_mm
from lib.viz.style import show_sagittal, spine_sagittal_index


def plot_gallery(scores: pd.DataFrame, cases: Sequence[Case]) -> Figure:
    """Best, median and worst case by mean vertebra Dice: sagittal CT with truth / prediction.

    Args:
        scores: per case ``set``, ``case_id``, ``mean_vertebra_dice`` (04's ``case_scores.csv``).
        cases: the scored cases, ``split`` = the set, ``mask`` and ``prediction`` set.
    """
    s = scores.dropna(subset=["mean_vertebra_dice"]).sort_values("mean_vertebra_dice")
    if s.empty:
        raise ValueError("no scored cases for the gallery")
    picks = [("worst", s.iloc[0]), ("median", s.iloc[len(s) // 2]), ("best", s.iloc[-1])]
    by_key = {(c.split, c.case_id): c for c in cases}
    fig, axes = plt.subplots(2, 3, figsize=(11, 8))
    for col, (name, row) in enumerate(picks):
        c = by_key[(row["set"], row["case_id"])]
        img = load_ct(c.image)
        gt = load_mask(c.mask).array
        pr = load_mask(c.prediction).array
        x = spine_sagittal_index(gt, img.shape)
        for r, (what, m) in enumerate((("truth", gt), ("prediction", pr))):
            ax = axes[r][col]
            show_sagittal(ax, img.array, m, x, img.spacing)
            ax.set_title(f"{name}: {c.case_id} ({c.split})\n{what}, Dice {row['mean_vertebra_dice']:.2f}"
                         if r == 0 else what, fontsize=8)
    fig.suptitle("Best / median / worst test case (mean vertebra Dice)")
    fig.tight_layout()
    return fig


def shift_case_order(shift: pd.DataFrame, max_cases: int = 6) -> pd.DataFrame:
    """The rows :func:`plot_shift_cases` draws: corrected cases first (L6 before the others), then
    the remaining dislocated cases, in table order, at most ``max_cases``."""
    rank = np.where(shift["correction_applied"], np.where(shift["variant"] == "L6", 0, 1),
                    np.where(shift["dislocated"], 2, 3))
    return shift.assign(_rank=rank)[rank < 3].sort_values("_rank", kind="stable").head(max_cases)


def plot_shift_cases(shift: pd.DataFrame, cases: Sequence[Case], corrected: Mapping[tuple[str, str], Path],
                     max_cases: int = 6) -> Figure | None:
    """Sagittal views of dislocated and variant cases: truth, prediction, corrected, labels written on.

    Args:
        shift: 05's ``label_shift.csv`` rows (set, case_id, variant, dislocated, offset,
            run_length, correction_applied, anchor).
        cases: the cases with ``mask`` (truth) and ``prediction`` (the baseline, 04).
        corrected: ``{(set, case_id): corrected mask}``.
        max_cases: rows drawn (:func:`shift_case_order`).

    Returns:
        The figure, or None when no case is dislocated or corrected.
    """
    sel = shift_case_order(shift, max_cases)
    if sel.empty:
        return None
    by_key = {(c.split, c.case_id): c for c in cases}
    fig, axes = plt.subplots(len(sel), 3, figsize=(10, 4.2 * len(sel)), squeeze=False)
    for r, (_, row) in enumerate(sel.iterrows()):
        key = (row["set"], row["case_id"])
        c = by_key[key]
        img = load_ct(c.image)
        masks = [("truth", load_mask(c.mask).array), ("prediction", load_mask(c.prediction).array),
                 ("corrected", load_mask(corrected[key]).array)]
        x = spine_sagittal_index(masks[0][1], img.shape)
        inv = np.linalg.inv(img.affine)
        for col, (what, m) in enumerate(masks):
            ax = axes[r][col]
            show_sagittal(ax, img.array, m, x, img.spacing)
            for lab, cen in centroids_mm(np.asarray(m), img.affine).items():
                v = inv @ np.r_[cen, 1.0]
                ax.text(v[1], img.shape[2] - 1 - v[2], L.name(lab), color="yellow", fontsize=6, ha="center",
                        va="center")
            ax.set_title(_shift_title(row, col, what, c.case_id), fontsize=7)
    fig.tight_layout()
    return fig


def _shift_title(row, col: int, what: str, case_id: str) -> str:
    title = f"{case_id} ({row['variant']})\n{what}" if col == 0 else what
    if col == 1:
        title += (f" — offset {row['offset']:+.0f} over {row['run_length']}" if row["dislocated"]
                  else " — not dislocated")
    if col == 2:
        title += f": {row['anchor']}" if row["correction_applied"] else ": unchanged"
    return title


def plot_release_previews(release_dir: str | Path, patterns: Mapping[str, Sequence[str]] | None = None) -> Figure:
    """Mid-sagittal slice (bone window) of the first case of each source in the release, in mm aspect."""
    rd = Path(release_dir)
    picks = {}
    for split in SPLITS:
        for f in sorted((rd / split / "data").glob("*.nii.gz")):
            picks.setdefault(infer_source(f.name, patterns), f)
    n = max(1, len(picks))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 4.2), squeeze=False)
    for ax, (src, f) in zip(axes[0], sorted(picks.items()), strict=False):
        v = load_ct(f)
        a = np.asarray(v.array)
        show_sagittal(ax, a, None, a.shape[0] // 2, v.spacing)
        ax.set_title(f"{src}\n{strip_nifti_suffix(f)[:26]}", fontsize=8)
    fig.suptitle("Release images: mid-sagittal, bone window")
    fig.tight_layout()
    return fig
