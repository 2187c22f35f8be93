"""lib.imaging.thick_slices: slab averaging on a new grid, and the same-grid augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from lib.imaging import thick_slices


def test_thick_slice_simulation_blurs_z_only():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (12, 12, 48)).astype(np.float32)
    out = thick_slices.thick_slice_augment(img, 1.0, 5.0, 0.0)
    dz = np.abs(np.diff(out, axis=2)).mean()
    dx = np.abs(np.diff(out, axis=0)).mean()
    assert dz < 0.5 * np.abs(np.diff(img, axis=2)).mean()
    assert dx > 2 * dz  # in-plane detail kept
    assert np.array_equal(thick_slices.thick_slice_augment(img, 2.0, 2.5, 0.0), img)  # thinner than 1.5 voxels


def test_thick_slices_average_exactly_and_keep_world_geometry():
    aff = np.diag([1.0, 1.0, 1.5, 1.0])
    aff[:3, 3] = [5.0, -3.0, 100.0]
    z = np.arange(12, dtype=np.int16)
    ct = np.broadcast_to(z * 100, (2, 3, 12)).copy()
    thick, new = thick_slices.thick_slice_volume(ct, aff, 4.5)  # 3 slices per slab
    assert thick.shape == (2, 3, 4)
    assert np.allclose(thick[0, 0], [100, 400, 700, 1000])  # means of (0,1,2)*100, (3,4,5)*100, ...
    assert new[2, 2] == pytest.approx(4.5)
    # slab centre: world z of old slice 1 (middle of slices 0..2)
    assert (new @ [0, 0, 0, 1])[2] == pytest.approx((aff @ [0, 0, 1, 1])[2])
    # a non-integer ratio weights partial slices
    t2, _ = thick_slices.thick_slice_volume(ct, aff, 2.25)  # 1.5 slices per slab
    assert t2[0, 0, 0] == pytest.approx((0 * 1.0 + 100 * 0.5) / 1.5, abs=1)
    # finer than native: interpolated, same extent
    fine, fa = thick_slices.thick_slice_volume(ct, aff, 0.75)
    assert fine.shape[2] == 24
    assert fa[2, 2] == pytest.approx(0.75)
