"""Overlap: the one Dice coefficient, per label and over the vertebrae of a case.

``Dice = 2 |A ∩ B| / (|A| + |B|)`` on voxels; every Dice in the workspace (evaluation rows,
training-patch scores, annotation effort, the case browser) is computed by
:func:`dice_from_counts`. Label maps are integer arrays of one shape, axes ``(x, y, z)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def dice_from_counts(intersection: int, size_a: int, size_b: int) -> float:
    """``2 * intersection / (size_a + size_b)``; NaN when both sets are empty."""
    if not size_a + size_b:
        return math.nan
    return float(2.0 * intersection / (size_a + size_b))


def dice(a: np.ndarray, b: np.ndarray, empty: float = math.nan) -> float:
    """Dice of two binary masks (anything non-zero is foreground); ``empty`` when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n_a, n_b = np.count_nonzero(a), np.count_nonzero(b)
    if not n_a + n_b:
        return empty
    return dice_from_counts(np.count_nonzero(a & b), n_a, n_b)


def label_histogram(a: np.ndarray, b: np.ndarray, top: int | None = None) -> np.ndarray:
    """Joint histogram ``h[i, j]`` = voxels with label ``i`` in ``a`` and ``j`` in ``b`` (one pass)."""
    a = np.asarray(a).astype(np.int64, copy=False).ravel()
    b = np.asarray(b).astype(np.int64, copy=False).ravel()
    k = int(max(a.max(initial=0), b.max(initial=0), top or 0)) + 1
    return np.bincount(a * k + b, minlength=k * k).reshape(k, k)


def dice_per_label(a: np.ndarray, b: np.ndarray, values: Iterable[int]) -> dict[int, float]:
    """Dice per label value over the labels present in ``a`` or ``b`` (others have no entry)."""
    values = [int(v) for v in values]
    hist = label_histogram(a, b, max(values, default=0))
    out = {}
    for v in values:
        na, nb, inter = hist[v].sum(), hist[:, v].sum(), hist[v, v]
        if na + nb:
            out[v] = dice_from_counts(inter, na, nb)
    return out


def mean_vertebra_dice(truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean Dice over the vertebra labels present in ``truth`` (missing in ``mask`` -> 0)."""
    present = [int(v) for v in np.unique(truth) if v]
    if not present:
        return float("nan")
    d = dice_per_label(truth, mask, present)
    return float(np.mean([d.get(v, 0.0) for v in present]))
