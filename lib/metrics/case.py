"""Every metric of one case, per vertebra label and for the binary spine (:func:`evaluate_case`).

Speed and memory: one pass projects each mask to find the foreground box, one
``scipy.ndimage.find_objects`` pass on that box gives every label's bounding box, and all work
per label happens in the box of truth ∪ prediction plus a one-voxel ring (:mod:`lib.metrics.arrays`).
Row conventions (detected / missed / false positive, the spine row): :mod:`lib.metrics.conventions`;
definitions: :mod:`lib.metrics.overlap`, :mod:`lib.metrics.surface`,
:mod:`lib.metrics.identification`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from lib.core.labels import CTSPINE1K_LABELS, LABELS
from lib.metrics.arrays import (
    as_label_map,
    check_spacing,
    foreground_box,
    interior,
    padded_window,
    slices_to_box,
    surface_of_padded,
    touching,
    union_box,
)
from lib.metrics.centroids import (
    CENTROID_METHODS,
    affine_for,
    body_centroids_mm,
    centroid_sums,
    to_world,
)
from lib.metrics.conventions import DETECTED, FALSE_POSITIVE, MISSED, SPINE_LABEL, SPINE_NAME
from lib.metrics.identification import (
    DEFAULT_IDENTIFICATION_RULE,
    IDENTIFICATION_MAX_DIST_MM,
    check_identification_rule,
    identification,
)
from lib.metrics.overlap import dice_from_counts
from lib.metrics.surface import (
    DEFAULT_NSD_TOLERANCE_MM,
    METHODS,
    assd_from_distances,
    check_hd95_definition,
    directed_distances,
    hd95_from_distances,
    nsd_from_distances,
    padded_surface_distances,
)


@dataclass
class _Side:
    """What one mask (truth or prediction) holds for one label."""

    voxels: int = 0
    index_sum: np.ndarray | None = None  # sum of global voxel indices, for the centroid


@dataclass
class _SpineSurface:
    """Spine surface voxels (label > 0 touching background) of both masks, gathered label by label."""

    pts_g: list[np.ndarray] = field(default_factory=list)
    pts_p: list[np.ndarray] = field(default_factory=list)
    both_g: list[np.ndarray] = field(default_factory=list)  # per spine surface voxel: also on the other surface?
    both_p: list[np.ndarray] = field(default_factory=list)
    gt: int = 0
    pred: int = 0
    inter: int = 0

    def add(self, wg, wp, g_in, p_in, box, side_g: _Side, side_p: _Side) -> None:
        """Collect the label-v spine surface voxels of this window, for both masks (the other
        labels' voxels in the window tell which are on both surfaces)."""
        shift = np.asarray([box[k][0] for k in range(g_in.ndim)])
        on_g = (interior(wg) > 0) & touching(wg == 0)
        on_p = (interior(wp) > 0) & touching(wp == 0)
        for m_in, on_self, on_other, pts, both in ((g_in, on_g, on_p, self.pts_g, self.both_g),
                                                   (p_in, on_p, on_g, self.pts_p, self.both_p)):
            sel = m_in & on_self
            idx = np.argwhere(sel)
            idx += shift
            pts.append(idx)
            both.append(on_other[sel])
        self.gt += side_g.voxels
        self.pred += side_p.voxels
        if side_g.voxels:
            self.inter += int(np.count_nonzero(g_in & (interior(wp) > 0)))

    def distances(self, spacing: np.ndarray):
        """Directed distances between the two spine surfaces (None when one mask is empty)."""
        if not (self.gt and self.pred):
            return None
        pg = np.concatenate(self.pts_g).astype(np.float64) * spacing
        pp = np.concatenate(self.pts_p).astype(np.float64) * spacing
        return (directed_distances(pg, pp, src_on_dst=np.concatenate(self.both_g)),
                directed_distances(pp, pg, src_on_dst=np.concatenate(self.both_p)))


def evaluate_case(gt: np.ndarray, pred: np.ndarray, spacing_mm: Sequence[float],
                  labels: Iterable[int] = CTSPINE1K_LABELS, hd95: str = "pooled",
                  nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                  affine: np.ndarray | None = None,
                  max_dist_mm: float = IDENTIFICATION_MAX_DIST_MM,
                  include_spine: bool = True, method: str = "kdtree",
                  identification_rule: str = DEFAULT_IDENTIFICATION_RULE, centroids: str = "body",
                  gt_centroids: Mapping[int, Sequence[float]] | None = None) -> list[dict]:
    """Every metric of one case, per vertebra label and for the binary spine.

    Args:
        gt: truth label map, integer or bool dtype, axes ``(x, y, z)``.
        pred: predicted label map of the same shape (any integer dtype).
        spacing_mm: voxel size per array axis in mm.
        labels: label values to report per label (others still count for the spine and
            for the "closest centroid" test of identification).
        hd95: ``"pooled"`` or ``"max"`` (see :data:`HD95_DEFINITIONS`).
        nsd_tolerance_mm: tolerance of the normalised surface Dice in mm.
        affine: voxel -> world (mm) matrix for centroids; default ``diag(spacing)`` (distances
            between centroids are the same for any affine with these column norms and
            orthogonal columns).
        max_dist_mm: identification distance limit (VerSe: 20 mm).
        include_spine: add the binary-spine row (``label 0``, ``name "spine"``).
        method: nearest-surface search, ``"kdtree"`` (default, faster here) or ``"edt"``.
        identification_rule: ``"verse_get_hits"`` (default, the official VerSe evaluator) or
            ``"nearest_prediction"`` (:mod:`lib.metrics.identification`).
        centroids: how centroids are taken from the masks: ``"body"`` (default: vertebral-body
            centroids, VerSe's convention, :func:`lib.metrics.body_centroids_mm`) or ``"mass"``
            (centre of mass of the whole label).
        gt_centroids: the truth's own centroids ``{label: (x, y, z)}`` in world mm (a VerSe
            ``_ctd.json``); when given they replace the truth side's estimate (labels the file
            lacks keep the estimate from the mask).

    Returns:
        One dict per label present in truth or prediction (in ``labels`` order), then the
        spine row. Keys: ``label`` (int), ``name``, ``status`` (``detected``/``missed``/
        ``false_positive``), ``dice``, ``hd95`` (mm), ``assd`` (mm), ``nsd`` (0..1),
        ``hd95_definition``, ``gt_voxels``, ``pred_voxels``, ``identified`` (1.0/0.0, NaN when
        not applicable), ``localisation_mm`` (NaN when the label is not in both),
        ``gt_centroid_mm`` and ``pred_centroid_mm`` (tuples or None).

    Raises:
        ValueError: shapes differ, spacing invalid, unknown HD95 definition, method, rule or
            centroid method.
        TypeError: a float label map.
    """
    check_hd95_definition(hd95)
    check_identification_rule(identification_rule)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if centroids not in CENTROID_METHODS:
        raise ValueError(f"unknown centroid method {centroids!r}; expected one of {CENTROID_METHODS}")
    gt = as_label_map(gt, "truth")
    pred = as_label_map(pred, "prediction")
    if gt.shape != pred.shape:
        raise ValueError(f"shape of truth {gt.shape} differs from prediction {pred.shape}")
    spacing = check_spacing(spacing_mm, gt.ndim)
    aff = affine_for(spacing, affine)
    labels = [int(v) for v in labels]
    fg = union_box(foreground_box(gt), foreground_box(pred))
    if fg is None:
        return []
    spine = _SpineSurface() if include_spine else None
    per_label = _scan_labels(gt, pred, fg, set(labels), spacing, method, spine)
    in_gt = {v for v, s in per_label.items() if s[0].voxels}
    given = {int(v): tuple(float(x) for x in c) for v, c in (gt_centroids or {}).items() if int(v) in in_gt}
    if centroids == "body":  # the truth's estimate only where its file gives none
        gt_c = body_centroids_mm(gt, aff, labels=in_gt - set(given)) if in_gt - set(given) else {}
        pred_c = body_centroids_mm(pred, aff)
    else:
        gt_c = {v: to_world(per_label[v][0].index_sum / per_label[v][0].voxels, aff) for v in in_gt}
        pred_c = {v: to_world(s[1].index_sum / s[1].voxels, aff) for v, s in per_label.items() if s[1].voxels}
    gt_c.update(given)
    ident = identification(gt_c, pred_c, max_dist_mm=max_dist_mm, rule=identification_rule)
    rows: list[dict] = []
    for v in labels:
        if v not in per_label:
            continue
        side_g, side_p, dist, inter = per_label[v]
        row = _row(v, LABELS[v].name if v in LABELS else str(v), side_g.voxels, side_p.voxels,
                   dist, hd95, nsd_tolerance_mm, inter)
        row["gt_centroid_mm"] = gt_c.get(v)
        row["pred_centroid_mm"] = pred_c.get(v)
        if v in ident:
            row["identified"] = float(ident[v]["identified"])
            row["localisation_mm"] = ident[v]["localisation_mm"]
        rows.append(row)
    if spine is not None and (spine.gt or spine.pred):
        row = _row(SPINE_LABEL, SPINE_NAME, spine.gt, spine.pred, spine.distances(spacing), hd95,
                   nsd_tolerance_mm, spine.inter)
        row["gt_centroid_mm"] = row["pred_centroid_mm"] = None
        rows.append(row)
    return rows


def _scan_labels(gt: np.ndarray, pred: np.ndarray, fg, want: set[int], spacing: np.ndarray, method: str,
                 spine: _SpineSurface | None) -> dict[int, tuple[_Side, _Side, tuple | None, int]]:
    """Per label present in either mask: voxel counts and index sums of both sides, the
    directed surface distances (labels in ``want`` present in both) and the intersection;
    feeds the spine surface on the way."""
    origin = [lo for lo, _ in fg]
    view = tuple(slice(lo, hi) for lo, hi in fg)
    gv, pv = gt[view], pred[view]  # strided views: no copy
    top = int(max(gv.max(), pv.max()))
    obj_g = ndimage.find_objects(gv, max_label=top)
    obj_p = ndimage.find_objects(pv, max_label=top)
    per_label: dict[int, tuple[_Side, _Side, tuple | None, int]] = {}
    for v in range(1, top + 1):
        bg, bp = slices_to_box(obj_g[v - 1]), slices_to_box(obj_p[v - 1])
        if bg is None and bp is None:
            continue
        box = union_box(bg, bp)
        wg = padded_window(gv, box)
        wp = padded_window(pv, box)
        g, p = wg == v, wp == v
        g_in, p_in = interior(g), interior(p)
        glob = [origin[k] + box[k][0] for k in range(gt.ndim)]  # global index of the interior origin
        side_g, side_p = _Side(), _Side()
        for side, m_in, present in ((side_g, g_in, bg is not None), (side_p, p_in, bp is not None)):
            if present:
                side.voxels = int(np.count_nonzero(m_in))
                side.index_sum = centroid_sums(m_in, glob)
        if spine is not None:
            spine.add(wg, wp, g_in, p_in, box, side_g, side_p)
        dist, inter = None, 0
        if v in want and side_g.voxels and side_p.voxels:
            inter = int(np.count_nonzero(g_in & p_in))
            dist = padded_surface_distances(g, p, surface_of_padded(g), surface_of_padded(p), spacing, method)
        per_label[v] = (side_g, side_p, dist, inter)
    return per_label


def _row(label: int, name: str, n_g: int, n_p: int, dist, hd95: str, tol: float, inter: int) -> dict:
    if n_g and n_p:
        status = DETECTED
    elif n_g:
        status = MISSED
    else:
        status = FALSE_POSITIVE
    row = {"label": label, "name": name, "status": status, "dice": math.nan, "hd95": math.nan,
           "assd": math.nan, "nsd": math.nan, "hd95_definition": hd95, "gt_voxels": n_g,
           "pred_voxels": n_p, "identified": math.nan, "localisation_mm": math.nan}
    if status == MISSED:
        row["dice"] = 0.0
        row["nsd"] = 0.0
    elif status == DETECTED:
        d_gp, d_pg = dist
        row["dice"] = dice_from_counts(inter, n_g, n_p)
        row["hd95"] = hd95_from_distances(d_gp, d_pg, hd95)
        row["assd"] = assd_from_distances(d_gp, d_pg)
        row["nsd"] = nsd_from_distances(d_gp, d_pg, tol)
    return row
