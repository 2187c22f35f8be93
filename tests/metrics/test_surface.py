"""lib.metrics.surface: hand-derived values, medpy (pooled HD95) and MONAI (max, ASSD, NSD) as references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from lib import metrics
from tests.helpers.label_maps import SPACING, _cube, _random_labels, _row


def _shifted_cube_distances(n: int, k: int, axis: int, spacing) -> np.ndarray:
    """Directed surface distances of an n-cube to itself shifted by k voxels along ``axis``.

    Derived by hand (valid for n - 1 - k >= k): put the shift axis first (x), the others y, z.
    * x = 0 face (n^2 voxels): k*s_x;
    * rings at 1 <= x < k (4(n-1) voxels each): (k - x)*s_x;
    * rings at k <= x <= n-1 (4(n-1) voxels each): 0, they lie on the other cube's side faces;
    * far face interior (x = n-1, 1 <= y, z <= n-2):
      min(k*s_x, y*s_y, (n-1-y)*s_y, z*s_z, (n-1-z)*s_z).
    Both directions give this multiset (mirror symmetry across the mid-plane).
    """
    others = [a for a in range(3) if a != axis]
    sx, sy, sz = spacing[axis], spacing[others[0]], spacing[others[1]]
    d = [k * sx] * (n * n)
    for x in range(1, n):
        d += [max(k - x, 0) * sx] * (4 * (n - 1))
    for y in range(1, n - 1):
        for z in range(1, n - 1):
            d.append(min(k * sx, y * sy, (n - 1 - y) * sy, z * sz, (n - 1 - z) * sz))
    return np.sort(np.asarray(d))


def _ball(shape, centre_vox, radius_mm, spacing):
    grids = np.meshgrid(*[(np.arange(s) - c) * sp for s, c, sp in zip(shape, centre_vox, spacing, strict=True)],
                        indexing="ij")
    return sum(g * g for g in grids) <= radius_mm ** 2


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_cube_matches_hand_derived_values(axis, k):
    n, shape = 12, (24, 24, 24)
    gt = _cube(shape, (5, 5, 5), n)
    pred = np.roll(gt, k, axis=axis)
    expected = _shifted_cube_distances(n, k, axis, SPACING)
    d_gp, d_pg = metrics.surface_distances(gt, pred, SPACING)
    np.testing.assert_allclose(np.sort(d_gp), expected, atol=1e-9)
    np.testing.assert_allclose(np.sort(d_pg), expected, atol=1e-9)
    rows = metrics.evaluate_case(gt.astype(np.uint8), pred.astype(np.uint8), SPACING, labels=[1],
                                 hd95="max", nsd_tolerance_mm=1.0)
    r = _row(rows, 1)
    assert r["dice"] == pytest.approx((n - k) / n, abs=1e-12)
    assert r["hd95"] == pytest.approx(np.percentile(expected, 95), abs=1e-9)
    assert r["assd"] == pytest.approx(expected.mean(), abs=1e-9)
    assert r["nsd"] == pytest.approx(np.mean(expected <= 1.0), abs=1e-12)
    pooled = metrics.evaluate_case(gt.astype(np.uint8), pred.astype(np.uint8), SPACING, labels=[1],
                                   hd95="pooled")
    assert _row(pooled, 1)["hd95"] == pytest.approx(np.percentile(np.r_[expected, expected], 95), abs=1e-9)
    # Hausdorff (100th percentile) of a pure shift is exactly the shift in mm
    assert metrics.hd95_from_distances(d_gp, d_pg, "max", percentile=100) == pytest.approx(k * SPACING[axis])


@pytest.mark.parametrize("direction", ["extra_in_pred", "extra_in_truth"])
def test_pooled_and_max_differ_as_derived_for_a_detached_plate(direction):
    """Cube + a 6x6 one-voxel plate 3 voxels off its x face, in one mask only.

    The plate's 36 voxels are all surface at 3*s_x from the cube face; the cube's surfaces
    coincide (distance 0, 488 voxels each). 36/(488+36) > 5 % so the directed 95th percentile
    from the plate side is 3*s_x ("max"); 36/(2*488+36) < 5 % so the pooled one is 0.
    """
    n, shape = 10, (24, 16, 16)
    cube = _cube(shape, (3, 3, 3), n)
    plated = cube.copy()
    x_plate = 3 + n - 1 + 3
    plated[x_plate, 5:11, 5:11] = True
    gt, pred = (cube, plated) if direction == "extra_in_pred" else (plated, cube)
    s_cube = n ** 3 - (n - 2) ** 3
    gap = 3 * SPACING[0]
    rows_max = metrics.evaluate_case(gt.astype(np.uint8), pred.astype(np.uint8), SPACING, labels=[1],
                                     hd95="max", nsd_tolerance_mm=gap - 0.1)
    rows_pooled = metrics.evaluate_case(gt.astype(np.uint8), pred.astype(np.uint8), SPACING, labels=[1],
                                        hd95="pooled")
    r = _row(rows_max, 1)
    assert r["hd95"] == pytest.approx(gap, abs=1e-9)
    assert _row(rows_pooled, 1)["hd95"] == pytest.approx(0.0, abs=1e-12)
    assert r["dice"] == pytest.approx(2 * n ** 3 / (2 * n ** 3 + 36))
    assert r["assd"] == pytest.approx(36 * gap / (2 * s_cube + 36))
    assert r["nsd"] == pytest.approx(2 * s_cube / (2 * s_cube + 36))


@pytest.mark.parametrize(("axis", "k"), [(0, 2), (1, 1), (2, 1)])
def test_shifted_ellipsoidal_sphere_has_known_hausdorff_and_dice(axis, k):
    """A ball of radius 9 mm (an ellipsoid in voxels) shifted by k voxels.

    Every surface voxel of one ball lies k*s voxels from a surface voxel of the other, and the
    trailing pole has nothing closer: Hausdorff = k*s exactly, all distances <= k*s. Dice
    follows the continuous two-sphere overlap up to voxelisation.
    """
    shape, radius = (40, 24, 16), 9.0
    centre = (20, 12, 8)
    gt = _ball(shape, centre, radius, SPACING)
    pred = np.roll(gt, k, axis=axis)
    shift = k * SPACING[axis]
    d_gp, d_pg = metrics.surface_distances(gt, pred, SPACING)
    assert max(d_gp.max(), d_pg.max()) == pytest.approx(shift, abs=1e-9)
    for definition in ("pooled", "max"):
        hd = metrics.hd95_from_distances(d_gp, d_pg, definition)
        assert 0 < hd <= shift + 1e-9
    # mirror symmetry: both directed sets are the same multiset
    np.testing.assert_allclose(np.sort(d_gp), np.sort(d_pg), atol=1e-9)
    r = metrics.compare_masks(gt, pred, SPACING)
    v_int = math.pi * (4 * radius + shift) * (2 * radius - shift) ** 2 / 12
    assert r["dice"] == pytest.approx(v_int / (4 / 3 * math.pi * radius ** 3), abs=0.03)
    assert r["dice"] == pytest.approx(np.count_nonzero(gt & pred) / np.count_nonzero(gt), abs=1e-12)


def test_surface_voxels_equal_mask_minus_six_connected_erosion():
    m = _random_labels((17, 15, 13), 1, seed=3) > 0
    m[0, :, :] |= m[1, :, :]  # touch the array border
    ref = m ^ ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1))
    np.testing.assert_array_equal(metrics.surface_voxels(m), ref)


@pytest.mark.parametrize("method", metrics.METHODS)
def test_random_volumes_match_medpy_pooled(random_pair, method):
    from medpy.metric import binary as mb

    gt, pred = random_pair
    rows = metrics.evaluate_case(gt, pred, SPACING, labels=range(1, 10), hd95="pooled", method=method)
    checked = 0
    for r in rows:
        if r["status"] != metrics.DETECTED:
            continue
        g = gt > 0 if r["label"] == 0 else gt == r["label"]
        p = pred > 0 if r["label"] == 0 else pred == r["label"]
        assert abs(r["hd95"] - mb.hd95(p, g, voxelspacing=SPACING)) < 1e-3, r
        assert r["dice"] == pytest.approx(mb.dc(p, g), abs=1e-12)
        checked += 1
    assert checked == 6  # labels 1-5 and the spine


def test_random_volumes_match_monai_max_assd_nsd(random_pair):
    torch = pytest.importorskip("torch")
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    gt, pred = random_pair
    tol = 1.7
    rows = metrics.evaluate_case(gt, pred, SPACING, labels=range(1, 10), hd95="max", nsd_tolerance_mm=tol)
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in rows:
            if r["status"] != metrics.DETECTED:
                continue
            g = gt > 0 if r["label"] == 0 else gt == r["label"]
            p = pred > 0 if r["label"] == 0 else pred == r["label"]
            tp = torch.from_numpy(p)[None, None].float()
            tg = torch.from_numpy(g)[None, None].float()
            hd = float(compute_hausdorff_distance(tp, tg, include_background=True, percentile=95, spacing=SPACING))
            asd = float(compute_average_surface_distance(tp, tg, include_background=True, symmetric=True,
                                                         spacing=SPACING))
            nsd = float(compute_surface_dice(tp, tg, [tol], include_background=True, spacing=SPACING))
            assert abs(r["hd95"] - hd) < 1e-3, r
            assert abs(r["assd"] - asd) < 1e-3, r
            assert abs(r["nsd"] - nsd) < 1e-6, r
            checked += 1
    assert checked == 6


def test_kdtree_and_edt_agree(random_pair):
    gt, pred = random_pair
    a = metrics.evaluate_case(gt, pred, SPACING, labels=range(1, 10), method="kdtree")
    b = metrics.evaluate_case(gt, pred, SPACING, labels=range(1, 10), method="edt")
    assert [r["label"] for r in a] == [r["label"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in ("dice", "hd95", "assd", "nsd"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-9, nan_ok=True)


def test_one_empty_mask_gives_missing_distances_not_numbers():
    gt = _cube((10, 10, 10), (2, 2, 2), 4)
    empty = np.zeros_like(gt)
    r = metrics.compare_masks(gt, empty, SPACING)
    assert r["dice"] == 0.0
    assert r["nsd"] == 0.0
    assert math.isnan(r["hd95"])
    assert math.isnan(r["assd"])
    d_gp, d_pg = metrics.surface_distances(gt, empty, SPACING)
    assert d_pg.size == 0
    assert np.isinf(d_gp).all()
    assert d_gp.size == 4 ** 3 - 2 ** 3
    rows = metrics.evaluate_case(gt.astype(np.uint8), empty.astype(np.uint8), SPACING, labels=[1],
                                 include_spine=False)
    assert [r["status"] for r in rows] == [metrics.MISSED]
