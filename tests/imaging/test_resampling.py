"""lib.imaging.resampling: the nearest-neighbour label resampler, exact copies on coinciding grids, linear image resampling."""

from __future__ import annotations

import numpy as np
import pytest

from lib.imaging import resampling
from tests.helpers.grids import _affine, _labels


def test_resample_nearest_identity_permutation_and_coarse_grid(rng):
    lab = rng.integers(0, 26, size=(8, 9, 10)).astype(np.uint8)
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    assert np.array_equal(resampling.resample_nearest(lab, aff, lab.shape, aff), lab)
    # the same grid described with flipped x: exact copy, flipped
    flip = aff.copy()
    flip[0, 0] = -1.5
    flip[0, 3] = 1.5 * 7
    assert np.array_equal(resampling.resample_nearest(lab, aff, lab.shape, flip), lab[::-1])
    # a 2x coarser z grid takes every other slice (centres coincide at even indices)
    coarse = aff.copy()
    coarse[2, 2] = 4.0
    out = resampling.resample_nearest(lab, aff, (8, 9, 5), coarse)
    assert np.array_equal(out, lab[:, :, ::2])
    assert set(np.unique(out)) <= set(np.unique(lab))  # labels are never blended
    # outside the source: fill
    far = aff.copy()
    far[:3, 3] = 1000.0
    assert (resampling.resample_nearest(lab, aff, (2, 2, 2), far, fill=0) == 0).all()


def test_resample_image_keeps_extent_and_constants():
    a = np.full((10, 12, 14), 3.5, np.float32)
    assert np.allclose(resampling.resample_image(a, (5, 6, 7)), 3.5)
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32), (4, 4, 20)).copy()
    down = resampling.resample_image(ramp, (4, 4, 10))
    # voxel edges aligned: new voxel j covers old voxels 2j, 2j+1 -> centre 2j + 0.5
    assert np.allclose(down[0, 0], np.arange(10) * 2 + 0.5)


def test_resample_labels_per_class_keeps_blocks_and_values():
    seg = np.zeros((20, 20, 40), np.uint8)
    seg[4:16, 4:16, 2:18] = 7
    seg[4:16, 4:16, 22:38] = 28
    down = resampling.resample_labels(seg, (10, 10, 20))
    assert set(np.unique(down)) == {0, 7, 28}
    assert (down[:, :, 1:9] == 7).sum() == 6 * 6 * 8
    back = resampling.resample_labels(down, seg.shape)
    assert (back == seg).mean() > 0.97


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("P", "I", "R")])
def test_resample_is_an_exact_copy_when_grids_coincide_up_to_flips(axcodes):
    lab, aff = _labels(), _affine()
    stored, st_aff = resampling.reorient_array(lab, aff, axcodes)
    back = resampling.resample_labels_to(stored, st_aff, lab.shape, aff)
    np.testing.assert_array_equal(back, lab)


def test_resample_is_nearest_neighbour_by_world_coordinates():
    lab, aff = _labels(), _affine()
    # target: every second voxel along z, shifted by one voxel in x, plus a voxel outside
    tgt = aff @ np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], float)
    out = resampling.resample_labels_to(lab, aff, (12, 10, 4), tgt)
    np.testing.assert_array_equal(out[:11], lab[1:, :, ::2])
    assert (out[11] == 0).all()  # outside the truth grid
    # a tiny shift (0.3 voxel) still picks the nearest voxel, labels never interpolated
    tgt2 = aff.copy()
    tgt2[:3, 3] += np.array([0.3, 0.0, 0.0])
    out2 = resampling.resample_labels_to(lab, aff, lab.shape, tgt2)
    np.testing.assert_array_equal(out2, lab)
    assert set(np.unique(out2)) <= set(np.unique(lab))


@pytest.mark.parametrize(("shape", "new"), [((37, 41, 53), (20, 70, 31)), ((30, 30, 9), (45, 12, 80)),
                                            ((16, 16, 40), (16, 16, 17))])
def test_resample_image_in_slabs_equals_the_whole_volume_axis_by_axis(rng, shape, new):
    img = (rng.normal(size=shape) * 100).astype(np.float32)
    ref = img
    for axis in range(3):
        if ref.shape[axis] != new[axis]:
            ref = resampling.interp_axis(ref, axis, resampling.source_coords(shape[axis], new[axis]))
    for slab in (resampling.RESAMPLE_SLAB_VOXELS, 7 * new[0] * new[1], 1):
        assert np.array_equal(resampling.resample_image(img, new, slab_voxels=slab), ref)
