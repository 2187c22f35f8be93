"""lib.ml.sampling: deterministic patches and their augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from lib.ml import cache, planning, preprocessing, sampling
from tests.helpers.plans import tiny_plan
from tests.helpers.toy_cases import toy_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sampler(tmp_path, augment=None, stage="fine"):
    cases = toy_cases(tmp_path / "d", 3)
    plan = tiny_plan(cases)
    folder, metas = cache.build_cache(cases, plan, stage, tmp_path / "cache", progress=False)
    aug = plan.augmentation if augment is None else augment
    return sampling.PatchSampler(cache.open_cache(folder, metas), plan.stage(stage), plan, aug, seed=3, stage_index=1), plan


def test_patches_are_a_pure_function_of_seed_epoch_iteration_item(tmp_path):
    s, plan = _sampler(tmp_path, augment={**planning.default_augmentation("synthetic"), "p_rotate": 1.0,
                                          "p_scale": 1.0, "thick_slice_prob": 0.5})
    a = s.sample(2, 5, 1)
    b = s.sample(2, 5, 1)
    c = s.sample(2, 6, 1)
    assert np.array_equal(a[0], b[0])
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (1, *plan.stage("fine").patch_size)
    assert a[1].dtype == np.uint8
    # DDP: the two ranks' items together are the single-process batch
    full = s.batch(1, 0)
    r0, r1 = s.batch(1, 0, 0, 2), s.batch(1, 0, 1, 2)
    assert np.array_equal(full[0][0::2], r0[0])
    assert np.array_equal(full[0][1::2], r1[0])


def test_augmentation_mirrors_left_right_never_craniocaudal(tmp_path):
    shape = (16, 16, 32)
    img = np.broadcast_to(np.arange(32, dtype=np.float32), shape).copy()
    seg = np.zeros(shape, np.uint8)
    seg[:4, :, :16] = 1  # right-low corner only
    seg[:, :, 16:] = 2
    out_i, out_s = sampling.extract_patch(img, seg, (7.5, 7.5, 15.5), shape, (1, 1, 1), 0.0, None, flip_lr=True)
    assert np.array_equal(out_i, img)  # z order kept
    assert (out_s[-4:, :, :16] == 1).all()
    assert (out_s[:4, :, :16] == 0).all()
    # rotation/scale: labels stay labels (nearest neighbour), no new values
    m = sampling._rotation([0.3, 0.2, 0.1]) / 1.1
    ri, rs = sampling.extract_patch(img, seg, (7.5, 7.5, 15.5), shape, (1, 1, 1), -1.0, m)
    assert set(np.unique(rs)) <= {0, 1, 2}
    assert ri.shape == shape


def test_fov_crop_keeps_a_random_part_of_the_region_along_z_only(tmp_path):
    region = (np.array([3, 4, 10]), np.array([30, 31, 110]))
    lengths, starts = [], []
    for i in range(200):
        lo, hi = sampling.crop_region_z(region, np.random.default_rng(i), (0.3, 0.7))
        assert list(lo[:2]) == [3, 4]
        assert list(hi[:2]) == [30, 31]
        assert 10 <= lo[2] < hi[2] <= 110
        lengths.append(hi[2] - lo[2])
        starts.append(lo[2])
    assert min(lengths) >= 30
    assert max(lengths) <= 70
    assert min(starts) < 20
    assert max(starts) > 60
    # in the sampler: the whole-spine stage's patch is fill (and background) outside the kept
    # part, as if the scan ended there; without the augmentation the labels reach further
    none = {"p_fov_crop": 0.0}
    s0, plan = _sampler(tmp_path / "a", augment=none, stage="coarse")
    s1, _ = _sampler(tmp_path / "b", augment={"p_fov_crop": 1.0, "fov_crop_fraction": [0.3, 0.5]}, stage="coarse")
    fill = preprocessing.pad_value(plan.normalization)
    for item in range(4):
        (i0, g0), (i1, g1) = s0.sample(0, 0, item), s1.sample(0, 0, item)
        z0 = np.nonzero((g0 > 0).any(axis=(0, 1)))[0]
        z1 = np.nonzero((g1 > 0).any(axis=(0, 1)))[0]
        assert z1.size
        assert z1.size < z0.size
        assert set(z1) <= set(z0)
        seen0 = ~np.isclose(i0[0], fill).all(axis=(0, 1))
        seen1 = ~np.isclose(i1[0], fill).all(axis=(0, 1))
        assert seen1.sum() < seen0.sum()
        assert seen1[z1].all()
