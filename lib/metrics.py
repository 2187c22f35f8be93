"""Segmentation metrics per vertebra label: Dice, HD95, ASSD, NSD, identification rate.

Definitions (all distances in mm on the voxel grid, with the image spacing):

* **Surface voxels** of a binary mask: voxels of the mask with at least one 6-connected
  neighbour outside it; voxels outside the array count as outside (the same as
  ``mask ^ scipy.ndimage.binary_erosion(mask)``, the definition of medpy, MONAI and the
  nnU-Net v1 evaluator).
* **Directed surface distances** A->B: for every surface voxel of A, the Euclidean distance
  (mm, anisotropic spacing) to the nearest surface voxel of B.
* **Dice** ``2|G ∩ P| / (|G| + |P|)`` on voxels.
* **HD95**, two definitions selectable by name (see :data:`HD95_DEFINITIONS`):
  ``"pooled"`` = 95th percentile of both directed distance sets taken together (medpy
  ``hd95``, the nnU-Net v1 evaluator the CTSpine1K paper used); ``"max"`` = maximum of the
  95th percentiles of the two directed sets (MONAI ``compute_hausdorff_distance(percentile=95)``,
  DeepMind's surface-distance ``compute_robust_hausdorff``). Percentiles interpolate
  linearly between order statistics (``numpy.percentile``'s default, as medpy and MONAI).
* **ASSD** (average symmetric surface distance, Heimann et al. 2009): mean of both directed
  distance sets taken together, ``(Σ d(g,P) + Σ d(p,G)) / (|∂G| + |∂P|)`` (as MONAI
  ``compute_average_surface_distance(symmetric=True)``; medpy's ``assd`` instead averages the
  two directed means, which differs when the surfaces differ in size).
* **NSD** (normalised surface Dice at tolerance τ mm, Nikolov et al.): the fraction of both
  surfaces' voxels lying within τ of the other surface,
  ``(#{d(g,P) <= τ} + #{d(p,G) <= τ}) / (|∂G| + |∂P|)`` (as MONAI ``compute_surface_dice``
  with ``use_subvoxels=False``).
* **Centroid** of a label: mean voxel index of its voxels mapped through the affine (mm, world).
* **Identification** (VerSe): a true vertebra is identified when, among all predicted
  centroids, the one closest to its true centroid carries its label and lies within 20 mm.
  **Localisation error**: distance between the true and predicted centroid of the same label.

Conventions per label (the ``status`` of a row):

* absent in truth and prediction -> not evaluated (no row);
* present in both -> ``"detected"``: every metric computed;
* present in truth only -> ``"missed"``: Dice 0, NSD 0, HD95/ASSD ``NaN`` (missing, never
  a made-up number), not identified; counted as missed;
* present in prediction only -> ``"false_positive"``: a false-positive vertebra; Dice,
  distances and identification ``NaN`` (per-label statistics are over the labels present in
  the truth), counted as a false positive.

The binary spine (label > 0) gets the same treatment in a row with ``label == 0`` and
``name == "spine"``.

Speed and memory: one pass projects each mask to find the foreground box, one
``scipy.ndimage.find_objects`` pass on that box gives every label's bounding box, and all work
per label happens in the box of truth ∪ prediction plus a one-voxel ring; nearest surface
distances come from a KD-tree over surface voxels (``method="kdtree"``, default) or a cropped
Euclidean distance transform (``method="edt"``). No one-hot of all labels is ever built.

Arrays are label maps of any integer (or bool) dtype, axes ``(x, y, z)`` as loaded by
:func:`lib.io.load_volume` (RAS+); spacing is mm per array axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from lib.labels import CTSPINE1K_LABELS, LABELS

HD95_DEFINITIONS: dict[str, str] = {
    "pooled": "95th percentile of both directed surface-distance sets pooled together "
              "(medpy hd95; nnU-Net v1 evaluator, used by the CTSpine1K paper)",
    "max": "maximum of the two directed 95th percentiles "
           "(MONAI compute_hausdorff_distance(percentile=95); DeepMind surface-distance)",
}
"""The two HD95 definitions by name, with the tools that use each."""

DEFAULT_NSD_TOLERANCE_MM = 2.0
"""Default tolerance of the normalised surface Dice (mm): about 2-3 voxels of a spine CT."""

IDENTIFICATION_MAX_DIST_MM = 20.0
"""VerSe: a predicted centroid farther than this from the true one does not identify it."""

SPINE_LABEL = 0
SPINE_NAME = "spine"
DETECTED, MISSED, FALSE_POSITIVE = "detected", "missed", "false_positive"
METHODS = ("kdtree", "edt")

METRIC_COLUMNS = ("dice", "hd95", "assd", "nsd")
"""Per-row metric keys that summaries average."""


# ----------------------------------------------------------------------------- validation


def check_hd95_definition(hd95: str) -> str:
    """Return ``hd95`` if it names a definition in :data:`HD95_DEFINITIONS`, else raise ValueError."""
    if hd95 not in HD95_DEFINITIONS:
        raise ValueError(f"unknown HD95 definition {hd95!r}; expected one of {list(HD95_DEFINITIONS)}")
    return hd95


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> np.ndarray:
    sp = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if sp.size != ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} has {sp.size} values for a {ndim}D array")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing {tuple(spacing_mm)} must be finite and positive (mm)")
    return sp


def _as_label_map(arr: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype == bool:
        return a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what}: label map must have an integer or bool dtype, got {a.dtype} "
                        "(cast float masks holding integers first, e.g. with lib.evaluate's loader)")
    if np.issubdtype(a.dtype, np.signedinteger) and a.size and a.min() < 0:
        raise ValueError(f"{what}: negative label values (min {int(a.min())})")
    return a


# ----------------------------------------------------------------------------- geometry kernels


def _foreground_box(a: np.ndarray) -> list[tuple[int, int]] | None:
    """Index ranges ``[(lo, hi), ...]`` of the nonzero voxels; ``None`` when all zero.

    Two cheap reductions (the last axis, then the others), never a boolean copy of ``a``.
    """
    if a.ndim == 1:
        nz = np.flatnonzero(a)
        return None if nz.size == 0 else [(int(nz[0]), int(nz[-1]) + 1)]
    head = a.max(axis=-1)  # projection over the last axis: small
    first = _foreground_box(head)
    if first is None:
        return None
    sub = a[tuple(slice(lo, hi) for lo, hi in first)]
    last = np.flatnonzero(sub.max(axis=tuple(range(a.ndim - 1))))
    return first + [(int(last[0]), int(last[-1]) + 1)]


def _union_box(*boxes: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return [(min(b[k][0] for b in boxes), max(b[k][1] for b in boxes)) for k in range(len(boxes[0]))]


def _slices_to_box(sl: tuple[slice, ...] | None) -> list[tuple[int, int]] | None:
    return None if sl is None else [(s.start, s.stop) for s in sl]


def _padded_window(a: np.ndarray, box: list[tuple[int, int]]) -> np.ndarray:
    """``a[box]`` with a one-voxel ring of its real neighbours around it (zeros beyond ``a``)."""
    out = np.zeros(tuple(hi - lo + 2 for lo, hi in box), dtype=a.dtype)
    src, dst = [], []
    for (lo, hi), n in zip(box, a.shape, strict=True):
        s0, s1 = max(lo - 1, 0), min(hi + 1, n)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - (lo - 1), s1 - (lo - 1)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def _neighbours(m: np.ndarray):
    """Views of the 2·ndim face neighbours of the interior of a padded array."""
    inner = [slice(1, -1)] * m.ndim
    for k in range(m.ndim):
        for sl in (slice(None, -2), slice(2, None)):
            idx = list(inner)
            idx[k] = sl
            yield m[tuple(idx)]


def _interior(m: np.ndarray) -> np.ndarray:
    return m[(slice(1, -1),) * m.ndim]


def _surface_of_padded(m: np.ndarray) -> np.ndarray:
    """Surface voxels (interior shape) of a padded bool mask whose ring holds real neighbours."""
    nb = _neighbours(m)
    eroded = next(nb) & next(nb)
    for view in nb:
        eroded &= view
    inner = _interior(m)
    eroded &= inner
    return inner ^ eroded


def _touching(m: np.ndarray) -> np.ndarray:
    """Interior voxels with at least one face neighbour set in the padded bool ``m``."""
    nb = _neighbours(m)
    out = next(nb) | next(nb)
    for view in nb:
        out |= view
    return out


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a binary mask (6-connectivity in 3D; outside the array is background).

    Args:
        mask: bool array, any number of dimensions.

    Returns:
        Bool array of the same shape: ``mask & ~erode(mask)``.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    return _surface_of_padded(m)


def _directed_kdtree(src: np.ndarray, dst: np.ndarray, src_on_dst: np.ndarray | None = None,
                     ) -> np.ndarray:
    """Distances (mm) from each point of ``src`` (n, d) to the nearest point of ``dst``.

    ``src_on_dst`` flags source points known to be points of ``dst`` (distance 0, not queried).
    One thread; the tree is built unbalanced with leaves of 16 (fastest to build and query
    here, measured on the bench case).
    """
    out = np.zeros(len(src), dtype=np.float64)
    todo = slice(None) if src_on_dst is None else ~src_on_dst
    pts = src[todo]
    if len(pts):
        tree = cKDTree(dst, leafsize=16, balanced_tree=False, compact_nodes=False)
        out[todo] = tree.query(pts, k=1, workers=1)[0]
    return out


def _surface_distances_padded(g: np.ndarray, p: np.ndarray, sg: np.ndarray, sp: np.ndarray,
                              spacing: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances between the surfaces ``sg``/``sp`` (interior shape of padded g/p)."""
    if method == "edt":
        inner = (slice(1, -1),) * g.ndim
        border_p = np.zeros(g.shape, dtype=bool)
        border_p[inner] = sp
        d_gp = ndimage.distance_transform_edt(~border_p, sampling=spacing)[inner][sg]
        border_p[inner] = sg  # reuse the buffer for the other surface
        d_pg = ndimage.distance_transform_edt(~border_p, sampling=spacing)[inner][sp]
        return d_gp, d_pg
    both = sg & sp  # voxels on both surfaces are at distance 0 both ways
    pg = np.argwhere(sg).astype(np.float64)
    pg *= spacing
    pp = np.argwhere(sp).astype(np.float64)
    pp *= spacing
    d_gp = _directed_kdtree(pg, pp, src_on_dst=both[sg])
    d_pg = _directed_kdtree(pp, pg, src_on_dst=both[sp])
    return d_gp, d_pg


# ----------------------------------------------------------------------------- metric formulas


def hd95_from_distances(d_gt_to_pred: np.ndarray, d_pred_to_gt: np.ndarray,
                        definition: str = "pooled", percentile: float = 95.0) -> float:
    """HD95 (mm) from the two directed surface-distance sets.

    Args:
        d_gt_to_pred: distances (mm) from each truth surface voxel to the predicted surface.
        d_pred_to_gt: distances (mm) from each predicted surface voxel to the truth surface.
        definition: ``"pooled"`` or ``"max"`` (see :data:`HD95_DEFINITIONS`).
        percentile: 95 for HD95; 100 gives the Hausdorff distance under either definition.

    Returns:
        The distance in mm, ``NaN`` when either set is empty.
    """
    check_hd95_definition(definition)
    if len(d_gt_to_pred) == 0 or len(d_pred_to_gt) == 0:
        return math.nan
    if definition == "pooled":
        return float(np.percentile(np.concatenate([d_gt_to_pred, d_pred_to_gt]), percentile))
    return float(max(np.percentile(d_gt_to_pred, percentile), np.percentile(d_pred_to_gt, percentile)))


def assd_from_distances(d_gt_to_pred: np.ndarray, d_pred_to_gt: np.ndarray) -> float:
    """Average symmetric surface distance (mm): mean of both directed sets pooled; NaN if one is empty."""
    n = len(d_gt_to_pred) + len(d_pred_to_gt)
    if len(d_gt_to_pred) == 0 or len(d_pred_to_gt) == 0:
        return math.nan
    return float((np.sum(d_gt_to_pred) + np.sum(d_pred_to_gt)) / n)


def nsd_from_distances(d_gt_to_pred: np.ndarray, d_pred_to_gt: np.ndarray, tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm``: share of both surfaces within tolerance (0..1)."""
    n = len(d_gt_to_pred) + len(d_pred_to_gt)
    if n == 0:
        return math.nan
    ok = np.count_nonzero(d_gt_to_pred <= tolerance_mm) + np.count_nonzero(d_pred_to_gt <= tolerance_mm)
    return float(ok / n)


def surface_distances(gt_mask: np.ndarray, pred_mask: np.ndarray, spacing_mm: Sequence[float],
                      method: str = "kdtree") -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two binary masks, computed in their joint bounding box.

    Args:
        gt_mask: bool truth mask, axes as ``spacing_mm``.
        pred_mask: bool prediction mask of the same shape.
        spacing_mm: voxel size per axis (mm).
        method: ``"kdtree"`` or ``"edt"`` (same result to floating-point precision).

    Returns:
        ``(d_gt_to_pred, d_pred_to_gt)``: float64 distances in mm, one per surface voxel of
        the truth and of the prediction. A set is empty when its mask is empty, and holds
        ``inf`` values when only the other mask is empty.
    """
    g_full = np.asarray(gt_mask, dtype=bool)
    p_full = np.asarray(pred_mask, dtype=bool)
    if g_full.shape != p_full.shape:
        raise ValueError(f"mask shapes differ: truth {g_full.shape}, prediction {p_full.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    spacing = _check_spacing(spacing_mm, g_full.ndim)
    box = _union_box(_foreground_box(g_full.view(np.uint8)), _foreground_box(p_full.view(np.uint8)))
    empty = np.zeros(0, dtype=np.float64)
    if box is None:
        return empty, empty
    g = _padded_window(g_full, box)
    p = _padded_window(p_full, box)
    sg, sp = _surface_of_padded(g), _surface_of_padded(p)
    if not sg.any() or not sp.any():
        return (empty if not sg.any() else np.full(np.count_nonzero(sg), np.inf),
                empty if not sp.any() else np.full(np.count_nonzero(sp), np.inf))
    return _surface_distances_padded(g, p, sg, sp, spacing, method)


def compare_masks(gt_mask: np.ndarray, pred_mask: np.ndarray, spacing_mm: Sequence[float],
                  hd95: str = "pooled", nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                  method: str = "kdtree") -> dict[str, float]:
    """Dice, HD95, ASSD and NSD of one binary pair (both non-empty for distances).

    Returns:
        ``{"dice", "hd95", "assd", "nsd"}``; distances in mm, NaN when a mask is empty.
    """
    check_hd95_definition(hd95)
    g = np.asarray(gt_mask, dtype=bool)
    p = np.asarray(pred_mask, dtype=bool)
    n_g, n_p = np.count_nonzero(g), np.count_nonzero(p)
    dice = 2.0 * np.count_nonzero(g & p) / (n_g + n_p) if n_g + n_p else math.nan
    if n_g == 0 or n_p == 0:
        return {"dice": dice, "hd95": math.nan, "assd": math.nan, "nsd": 0.0 if n_g + n_p else math.nan}
    d_gp, d_pg = surface_distances(g, p, spacing_mm, method=method)
    return {"dice": dice, "hd95": hd95_from_distances(d_gp, d_pg, hd95),
            "assd": assd_from_distances(d_gp, d_pg),
            "nsd": nsd_from_distances(d_gp, d_pg, nsd_tolerance_mm)}


# ----------------------------------------------------------------------------- per label


@dataclass
class _Side:
    """What one mask (truth or prediction) holds for one label."""

    voxels: int = 0
    index_sum: np.ndarray | None = None  # sum of global voxel indices, for the centroid


def _centroid_sums(m_inner: np.ndarray, origin: Sequence[int]) -> np.ndarray:
    """Sum of global voxel indices of the set voxels of ``m_inner`` (one value per axis)."""
    sums = np.zeros(m_inner.ndim, dtype=np.float64)
    for k in range(m_inner.ndim):
        prof = np.count_nonzero(m_inner, axis=tuple(i for i in range(m_inner.ndim) if i != k))
        sums[k] = float(np.dot(prof, np.arange(origin[k], origin[k] + prof.size, dtype=np.float64)))
    return sums


def _affine_for(spacing: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    if affine is None:
        a = np.eye(spacing.size + 1)
        a[:-1, :-1] = np.diag(spacing)
        return a
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (spacing.size + 1, spacing.size + 1):
        raise ValueError(f"affine of shape {a.shape} does not fit a {spacing.size}D array")
    return a


def _to_world(index: np.ndarray, affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in affine[:-1, :-1] @ index + affine[:-1, -1])


def evaluate_case(gt: np.ndarray, pred: np.ndarray, spacing_mm: Sequence[float],
                  labels: Iterable[int] = CTSPINE1K_LABELS, hd95: str = "pooled",
                  nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                  affine: np.ndarray | None = None,
                  max_dist_mm: float = IDENTIFICATION_MAX_DIST_MM,
                  include_spine: bool = True, method: str = "kdtree") -> list[dict]:
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

    Returns:
        One dict per label present in truth or prediction (in ``labels`` order), then the
        spine row. Keys: ``label`` (int), ``name``, ``status`` (``detected``/``missed``/
        ``false_positive``), ``dice``, ``hd95`` (mm), ``assd`` (mm), ``nsd`` (0..1),
        ``hd95_definition``, ``gt_voxels``, ``pred_voxels``, ``identified`` (1.0/0.0, NaN when
        not applicable), ``localisation_mm`` (NaN when the label is not in both),
        ``gt_centroid_mm`` and ``pred_centroid_mm`` (tuples or None).

    Raises:
        ValueError: shapes differ, spacing invalid, unknown HD95 definition or method.
        TypeError: a float label map.
    """
    check_hd95_definition(hd95)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    gt = _as_label_map(gt, "truth")
    pred = _as_label_map(pred, "prediction")
    if gt.shape != pred.shape:
        raise ValueError(f"shape of truth {gt.shape} differs from prediction {pred.shape}")
    spacing = _check_spacing(spacing_mm, gt.ndim)
    aff = _affine_for(spacing, affine)
    labels = [int(v) for v in labels]
    fg = _union_box(_foreground_box(gt), _foreground_box(pred))
    if fg is None:
        return []
    origin = [lo for lo, _ in fg]
    view = tuple(slice(lo, hi) for lo, hi in fg)
    gv, pv = gt[view], pred[view]  # strided views: no copy
    top = int(max(gv.max(), pv.max()))
    obj_g = ndimage.find_objects(gv, max_label=top)
    obj_p = ndimage.find_objects(pv, max_label=top)

    want = set(labels)
    per_label: dict[int, tuple[_Side, _Side, tuple[np.ndarray, np.ndarray] | None, int]] = {}
    spine_pts_g: list[np.ndarray] = []
    spine_pts_p: list[np.ndarray] = []
    spine_both_g: list[np.ndarray] = []  # per spine surface voxel: also on the other surface?
    spine_both_p: list[np.ndarray] = []
    spine = {"gt": 0, "pred": 0, "inter": 0}
    for v in range(1, top + 1):
        bg, bp = _slices_to_box(obj_g[v - 1]), _slices_to_box(obj_p[v - 1])
        if bg is None and bp is None:
            continue
        box = _union_box(bg, bp)
        wg = _padded_window(gv, box)
        wp = _padded_window(pv, box)
        g, p = wg == v, wp == v
        g_in, p_in = _interior(g), _interior(p)
        glob = [origin[k] + box[k][0] for k in range(gt.ndim)]  # global index of the interior origin
        side_g, side_p = _Side(), _Side()
        for side, m_in, present in ((side_g, g_in, bg is not None), (side_p, p_in, bp is not None)):
            if present:
                side.voxels = int(np.count_nonzero(m_in))
                side.index_sum = _centroid_sums(m_in, glob)
        if include_spine:
            # spine surface voxels (label > 0 touching background) inside this window, for both
            # masks: the label-v ones are collected, the others tell which are on both surfaces
            shift = np.asarray([box[k][0] for k in range(gt.ndim)])
            on_g = (_interior(wg) > 0) & _touching(wg == 0)
            on_p = (_interior(wp) > 0) & _touching(wp == 0)
            for m_in, on_self, on_other, pts, both in ((g_in, on_g, on_p, spine_pts_g, spine_both_g),
                                                       (p_in, on_p, on_g, spine_pts_p, spine_both_p)):
                sel = m_in & on_self
                idx = np.argwhere(sel)
                idx += shift
                pts.append(idx)
                both.append(on_other[sel])
            spine["gt"] += side_g.voxels
            spine["pred"] += side_p.voxels
            if side_g.voxels:
                spine["inter"] += int(np.count_nonzero(g_in & (_interior(wp) > 0)))
        dist, inter = None, 0
        if v in want and side_g.voxels and side_p.voxels:
            inter = int(np.count_nonzero(g_in & p_in))
            dist = _surface_distances_padded(g, p, _surface_of_padded(g), _surface_of_padded(p),
                                             spacing, method)
        per_label[v] = (side_g, side_p, dist, inter)

    gt_c = {v: _to_world(s[0].index_sum / s[0].voxels, aff) for v, s in per_label.items() if s[0].voxels}
    pred_c = {v: _to_world(s[1].index_sum / s[1].voxels, aff) for v, s in per_label.items() if s[1].voxels}
    ident = identification(gt_c, pred_c, max_dist_mm=max_dist_mm)

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
    if include_spine and (spine["gt"] or spine["pred"]):
        dist = None
        if spine["gt"] and spine["pred"]:
            pg = np.concatenate(spine_pts_g).astype(np.float64) * spacing
            pp = np.concatenate(spine_pts_p).astype(np.float64) * spacing
            dist = (_directed_kdtree(pg, pp, src_on_dst=np.concatenate(spine_both_g)),
                    _directed_kdtree(pp, pg, src_on_dst=np.concatenate(spine_both_p)))
        row = _row(SPINE_LABEL, SPINE_NAME, spine["gt"], spine["pred"], dist, hd95,
                   nsd_tolerance_mm, spine["inter"])
        row["gt_centroid_mm"] = row["pred_centroid_mm"] = None
        rows.append(row)
    return rows


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
        row["dice"] = 2.0 * inter / (n_g + n_p)
        row["hd95"] = hd95_from_distances(d_gp, d_pg, hd95)
        row["assd"] = assd_from_distances(d_gp, d_pg)
        row["nsd"] = nsd_from_distances(d_gp, d_pg, tol)
    return row


# ----------------------------------------------------------------------------- centroids


def centroids_mm(mask: np.ndarray, affine: np.ndarray | None = None,
                 labels: Iterable[int] | None = None,
                 spacing_mm: Sequence[float] | None = None) -> dict[int, tuple[float, ...]]:
    """Centroid of every label of a label map, in world mm.

    Args:
        mask: label map (integer or bool), axes ``(x, y, z)``.
        affine: 4x4 voxel -> world (mm) matrix of ``mask``; if None, ``diag(spacing_mm)``.
        labels: restrict to these values (default: all present, > 0).
        spacing_mm: used only when ``affine`` is None (default 1 mm).

    Returns:
        ``{label: (x, y, z)}`` in mm for each present label, mean voxel index mapped through
        the affine.
    """
    m = _as_label_map(mask, "mask")
    sp = _check_spacing(spacing_mm if spacing_mm is not None else [1.0] * m.ndim, m.ndim)
    aff = _affine_for(sp, affine)
    fg = _foreground_box(m)
    if fg is None:
        return {}
    view = m[tuple(slice(lo, hi) for lo, hi in fg)]
    top = int(view.max())
    objs = ndimage.find_objects(view, max_label=top)
    want = None if labels is None else {int(v) for v in labels}
    out: dict[int, tuple[float, ...]] = {}
    for v in range(1, top + 1):
        sl = objs[v - 1]
        if sl is None or (want is not None and v not in want):
            continue
        sub = view[sl] == v
        n = np.count_nonzero(sub)
        origin = [fg[k][0] + sl[k].start for k in range(m.ndim)]
        out[v] = _to_world(_centroid_sums(sub, origin) / n, aff)
    return out


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
