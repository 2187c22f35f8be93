"""VerSe identification rate and localisation error, under two named matching rules.

* ``"verse_get_hits"`` (default): the rule of the official VerSe evaluator (``get_hits`` in
  anjany/verse ``utils/eval_utilities.py``; the VerSe 2019 challenge page words it the same
  way). Only labels present in both truth and prediction compete: a predicted vertebra ``v``
  identifies the true ``v`` when, among the true centroids of those labels, the one nearest
  to the predicted centroid of ``v`` is the true ``v`` (ties go to the lower label value) and it
  lies within 20 mm (inclusive). A true vertebra absent from the prediction is not identified.
* ``"nearest_prediction"``: the rule of the papers' wording as this workspace read it before:
  a true vertebra ``v`` is identified when, among *all* predicted centroids, the one nearest to
  the true centroid of ``v`` carries ``v`` and lies within 20 mm.

The two disagree, e.g., when the upper part of L1 is predicted as an extra vertebra T13 that
the truth lacks: ``get_hits`` ignores the T13 centroid (not in the truth), the other rule lets
it take T12's or L1's place. The localisation error of a label in both is the distance between
its true and predicted centroids, under either rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from lib.metrics.conventions import DETECTED, MISSED, SPINE_LABEL

IDENTIFICATION_MAX_DIST_MM = 20.0
"""VerSe: a predicted centroid farther than this from the true one does not identify it."""

IDENTIFICATION_RULES = ("verse_get_hits", "nearest_prediction")
"""Matching rules by name (module docstring); the first is the default."""

DEFAULT_IDENTIFICATION_RULE = IDENTIFICATION_RULES[0]


def check_identification_rule(rule: str) -> str:
    """``rule`` if it names a rule of :data:`IDENTIFICATION_RULES`; ValueError listing them otherwise."""
    if rule not in IDENTIFICATION_RULES:
        raise ValueError(f"unknown identification rule {rule!r}; expected one of {IDENTIFICATION_RULES}")
    return rule


def _points(centroids: Mapping[int, Sequence[float]], labels: Sequence[int]) -> np.ndarray:
    if not labels:
        return np.zeros((0, 3))
    return np.asarray([centroids[v] for v in labels], dtype=np.float64)


def _hits_get_hits(gt: Mapping[int, Sequence[float]], pred: Mapping[int, Sequence[float]],
                   max_dist_mm: float) -> dict[int, bool]:
    both = sorted(set(gt) & set(pred))
    if not both:
        return {}
    g, p = _points(gt, both), _points(pred, both)
    d = np.sqrt(((p[:, None, :] - g[None, :, :]) ** 2).sum(axis=2))  # [predicted, true]
    nearest = np.argmin(d, axis=1)  # first minimum: the lower label value on ties
    return {v: bool(nearest[i] == i and d[i, i] <= max_dist_mm) for i, v in enumerate(both)}


def _hits_nearest_prediction(gt: Mapping[int, Sequence[float]], pred: Mapping[int, Sequence[float]],
                             max_dist_mm: float) -> dict[int, bool]:
    p_labels = list(pred)
    p = _points(pred, p_labels)
    out = {}
    for v in set(gt) & set(pred):
        d = np.sqrt(((p - np.asarray(gt[v], dtype=np.float64)) ** 2).sum(axis=1))
        own = float(d[p_labels.index(v)])
        out[v] = bool(own <= d.min() and own <= max_dist_mm)
    return out


def identification(gt_centroids: Mapping[int, Sequence[float]],
                   pred_centroids: Mapping[int, Sequence[float]],
                   max_dist_mm: float = IDENTIFICATION_MAX_DIST_MM,
                   rule: str = DEFAULT_IDENTIFICATION_RULE) -> dict[int, dict]:
    """VerSe identification and localisation error per true vertebra.

    Args:
        gt_centroids: ``{label: (x, y, z)}`` in mm of the truth (VerSe: vertebral-body centroids).
        pred_centroids: ``{label: (x, y, z)}`` in mm of the prediction, defined the same way.
        max_dist_mm: distance limit (mm, inclusive).
        rule: ``"verse_get_hits"`` or ``"nearest_prediction"`` (module docstring).

    Returns:
        ``{label: {"identified": bool, "localisation_mm": float}}`` for every true label;
        the localisation error is NaN when the label is absent from the prediction.
    """
    check_identification_rule(rule)
    hits = (_hits_get_hits if rule == "verse_get_hits" else _hits_nearest_prediction)(
        gt_centroids, pred_centroids, max_dist_mm)
    out: dict[int, dict] = {}
    for v, c in gt_centroids.items():
        if v not in pred_centroids:  # also covers an empty prediction
            out[v] = {"identified": False, "localisation_mm": math.nan}
            continue
        own = float(np.linalg.norm(np.asarray(pred_centroids[v], dtype=np.float64) - np.asarray(c, dtype=np.float64)))
        out[v] = {"identified": hits[v], "localisation_mm": own}
    return out


def identification_rate(rows: Iterable[Mapping]) -> float:
    """Share of true vertebrae identified among ``rows`` of :func:`evaluate_case` (NaN if none)."""
    vals = [r["identified"] for r in rows if r.get("label") != SPINE_LABEL
            and r.get("status") in (DETECTED, MISSED) and not _isnan(r.get("identified"))]
    return float(np.mean(vals)) if vals else math.nan


def _isnan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
