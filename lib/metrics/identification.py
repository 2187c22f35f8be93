"""VerSe identification rate and localisation error.

A true vertebra is identified when, among all predicted centroids, the one closest to its true
centroid carries its label and lies within 20 mm; the localisation error is the distance between
the true and predicted centroid of the same label.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from lib.metrics.conventions import DETECTED, MISSED, SPINE_LABEL

IDENTIFICATION_MAX_DIST_MM = 20.0
"""VerSe: a predicted centroid farther than this from the true one does not identify it."""


def identification(gt_centroids: Mapping[int, Sequence[float]],
                   pred_centroids: Mapping[int, Sequence[float]],
                   max_dist_mm: float = IDENTIFICATION_MAX_DIST_MM) -> dict[int, dict]:
    """VerSe identification and localisation error per true vertebra.

    A true vertebra ``v`` is identified when, among all predicted centroids, the one nearest
    to its true centroid has label ``v`` and lies within ``max_dist_mm`` (inclusive). (The
    VerSe reference script restricts the nearest-centroid test to labels present in both and
    searches from the predicted side; this follows the wording of the papers.)

    Args:
        gt_centroids: ``{label: (x, y, z)}`` in mm from the truth.
        pred_centroids: ``{label: (x, y, z)}`` in mm from the prediction.
        max_dist_mm: distance limit (mm).

    Returns:
        ``{label: {"identified": bool, "localisation_mm": float}}`` for every true label;
        the localisation error is NaN when the label is absent from the prediction.
    """
    out: dict[int, dict] = {}
    p_labels = list(pred_centroids)
    p_pts = np.asarray([pred_centroids[v] for v in p_labels], dtype=np.float64)
    for v, c in gt_centroids.items():
        c = np.asarray(c, dtype=np.float64)
        if v not in pred_centroids:  # also covers an empty prediction
            out[v] = {"identified": False, "localisation_mm": math.nan}
            continue
        d = np.sqrt(((p_pts - c) ** 2).sum(axis=1))
        own = float(d[p_labels.index(v)])
        closest = bool(own <= d.min())
        out[v] = {"identified": bool(closest and own <= max_dist_mm), "localisation_mm": own}
    return out


def identification_rate(rows: Iterable[Mapping]) -> float:
    """Share of true vertebrae identified among ``rows`` of :func:`evaluate_case` (NaN if none)."""
    vals = [r["identified"] for r in rows if r.get("label") != SPINE_LABEL
            and r.get("status") in (DETECTED, MISSED) and not _isnan(r.get("identified"))]
    return float(np.mean(vals)) if vals else math.nan


def _isnan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
