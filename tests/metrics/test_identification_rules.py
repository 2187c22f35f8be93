"""lib.metrics.identification: the official VerSe rule (get_hits) and the previous rule, by name.

The reference below re-implements anjany/verse ``utils/eval_utilities.get_hits`` as that file
states it (NaN-filled arrays indexed by label, a predicted-by-true distance matrix over the
labels in both, the argmin per predicted row, the diagonal within 20 mm) so that the
workspace's rule is checked against the reference's own formulation, not against itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from lib import metrics
from lib.core import labels as L

MAX_VERT_IDX = 28  # VerSe labels 1..28 (T13 = 28)
T12, L1 = 19, 20
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def reference_get_hits(gt: dict, pred: dict) -> dict[int, float]:
    """hit_list of the reference as {label: 0/1} for the labels of the truth."""
    a = np.full((MAX_VERT_IDX, 3), np.nan)
    p = np.full((MAX_VERT_IDX, 3), np.nan)
    for v, c in gt.items():
        a[v - 1] = c
    for v, c in pred.items():
        p[v - 1] = c
    hit_list = np.full(MAX_VERT_IDX, np.nan)
    in_im = np.argwhere(~np.isnan(a[:, 0])) + 1
    in_pred = np.argwhere(~np.isnan(p[:, 0])) + 1
    hit_list[in_im - 1] = 0
    both = np.intersect1d(in_im, in_pred)
    if both.size:
        act = np.transpose(np.repeat(a[..., None], MAX_VERT_IDX, axis=2), [2, 1, 0])
        prd = np.repeat(p[..., None], MAX_VERT_IDX, axis=2)
        d = np.sqrt(np.sum(np.square(prd - act), axis=1))[both - 1, :][:, both - 1]
        keep = np.ones_like(d, dtype=bool)
        keep[range(d.shape[0]), np.argmin(d, axis=1)] = False
        d[keep] = np.nan
        diag = np.copy(np.diagonal(d))
        diag[diag > 20.0] = np.nan
        hit_list[both[~np.isnan(diag)] - 1] = 1
    return {v: float(hit_list[v - 1]) for v in gt}


def spine(labels_cranial_first: list[int], height: int = 10, gap: int = 2) -> np.ndarray:
    """A column of vertebrae along z (superior = +z): body block in front, a thin arch behind."""
    n = len(labels_cranial_first)
    m = np.zeros((24, 28, n * (height + gap) + 4), np.uint8)
    for k, v in enumerate(labels_cranial_first):
        z1 = m.shape[2] - 2 - k * (height + gap)
        z0 = z1 - height
        m[6:18, 14:26, z0:z1] = v  # body (anterior = +y)
        m[10:14, 2:14, z0 + 3:z1 - 3] = v  # posterior elements, 4 voxels thick
    return m


TRUTH_LABELS = [17, 18, 19, 20, 21, 22]  # T10 T11 T12 L1 L2 L3


def _shifted(m: np.ndarray, by: int) -> np.ndarray:
    out = m.copy()
    for v in TRUTH_LABELS:
        out[m == v] = v + by
    return out


def _merged(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[m == 21] = 20  # L1 and L2 as one L1
    out[m == 22] = 21
    return out


def _upper_l1_as_t13(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    z = np.nonzero((m == L1).any(axis=(0, 1)))[0]
    upper = np.zeros_like(m, dtype=bool)
    upper[:, :, z[2 * len(z) // 5]:] = True  # the upper 60 %
    out[(m == L1) & upper] = L.T13
    return out


def _relabelled_part(m: np.ndarray) -> np.ndarray:
    """Upper half of the spine right, lower half shifted by one (a dislocation below T12)."""
    out = m.copy()
    for v in (20, 21, 22):
        out[m == v] = v + 1
    return out


CASES = {"exact": lambda m: m, "shift +1": lambda m: _shifted(m, 1), "shift -1": lambda m: _shifted(m, -1),
         "merged L1+L2": _merged, "upper L1 called T13": _upper_l1_as_t13, "lower half shifted": _relabelled_part,
         "L3 missing": lambda m: np.where(m == 22, 0, m)}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("centroids", ["body", "mass"])
def test_identification_equals_the_reference_get_hits(kind, centroids):
    gt = spine(TRUTH_LABELS)
    pred = CASES[kind](gt).astype(np.uint8)
    rows = metrics.evaluate_case(gt, pred, [1.5, 1.5, 2.0], labels=list(range(1, 29)), affine=AFFINE,
                                 centroids=centroids, include_spine=False)
    got = {r["label"]: r["identified"] for r in rows if r["status"] in ("detected", "missed")}
    cg = {r["label"]: r["gt_centroid_mm"] for r in rows if r["gt_centroid_mm"] is not None}
    cp = {r["label"]: r["pred_centroid_mm"] for r in rows if r["pred_centroid_mm"] is not None}
    assert got == reference_get_hits(cg, cp)


def test_the_rules_differ_where_the_reference_says_they_do_and_both_are_selectable():
    gt = spine(TRUTH_LABELS)
    pred = _upper_l1_as_t13(gt)
    kw = dict(labels=list(range(1, 29)), affine=AFFINE, include_spine=False)
    official = {r["label"]: r["identified"] for r in metrics.evaluate_case(gt, pred, [1.5, 1.5, 2.0], **kw)
                if r["status"] == "detected"}
    old = {r["label"]: r["identified"]
           for r in metrics.evaluate_case(gt, pred, [1.5, 1.5, 2.0], identification_rule="nearest_prediction", **kw)
           if r["status"] == "detected"}
    # the extra T13 (upper half of L1) is ignored by get_hits: L1 (its lower half) is still identified;
    # under the nearest-prediction rule the T13 centroid is the nearest one to the true L1
    assert official[L1] == 1.0
    assert old[L1] == 0.0
    assert {v: official[v] for v in official if v != L1} == {v: old[v] for v in old if v != L1}
    with pytest.raises(ValueError, match="verse_get_hits"):
        metrics.evaluate_case(gt, pred, [1.5, 1.5, 2.0], identification_rule="closest", **kw)


def test_a_shift_by_one_level_identifies_nothing_and_the_truth_file_replaces_the_truth_estimate():
    gt = spine(TRUTH_LABELS)
    rows = metrics.evaluate_case(gt, _shifted(gt, 1), [1.5, 1.5, 2.0], labels=list(range(1, 29)), affine=AFFINE,
                                 include_spine=False)
    assert all(r["identified"] == 0.0 for r in rows if r["status"] == "detected")
    # truth centroids given (a VerSe _ctd.json): used as given, 25 mm off -> L1 no longer identified
    own = {r["label"]: r["gt_centroid_mm"] for r in metrics.evaluate_case(gt, gt, [1.5, 1.5, 2.0], affine=AFFINE)
           if r["label"] > 0}
    moved = {**own, L1: tuple(np.add(own[L1], (0.0, 25.0, 0.0)))}
    rows = metrics.evaluate_case(gt, gt, [1.5, 1.5, 2.0], affine=AFFINE, gt_centroids=moved, include_spine=False)
    by = {r["label"]: r for r in rows}
    assert by[L1]["identified"] == 0.0
    assert by[L1]["localisation_mm"] == pytest.approx(25.0, abs=1e-6)
    assert by[T12]["identified"] == 1.0
