"""lib.io.load_mask / read_mask / load_ct / load_pair: smallest types, slab by slab, faults named."""

from __future__ import annotations

import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from lib.io import (
    IntegrityError,
    NiftiReadError,
    check_mask,
    load_ct,
    load_mask,
    load_pair,
    load_volume,
    read_mask,
    smallest_int_dtype,
)
from lib.io import nifti as nifti_mod

PIR = np.array([[0, 0, 0.8, -20], [-0.9, 0, 0, 30], [0, -1.1, 0, 40], [0, 0, 0, 1]], dtype=float)


def _write(path, arr, affine=PIR, dtype=None, slope=None, inter=None):
    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype) if dtype else np.asarray(arr), affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    nib.save(img, str(path))
    return path


def _labels(shape=(20, 24, 30), top=25, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, top + 1, size=shape)


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of 2 x 20 x 24 voxels: every read goes through many slabs."""
    monkeypatch.setattr(nifti_mod, "SLAB_VOXELS", 2 * 20 * 24)


@pytest.mark.parametrize(("top", "dtype"), [(25, np.uint8), (300, np.uint16), (70000, np.uint32)])
def test_float64_mask_comes_back_in_the_smallest_unsigned_type(tmp_path, small_slabs, top, dtype):
    lab = _labels(top=top)
    lab[0, 0, -1] = top  # the largest value in the last slab: the type must grow on the way
    p = _write(tmp_path / "sub-verse004_seg-vert_msk.nii.gz", lab, dtype=np.float64)
    vol = load_mask(p)
    ref = load_volume(p)
    assert vol.array.dtype == dtype
    assert np.array_equal(vol.array, ref.array)
    assert np.allclose(vol.affine, ref.affine)
    assert vol.shape == ref.shape  # RAS+ order from PIR
    assert vol.meta["stored_dtype"] == "float64"
    counts = vol.meta["label_scan"].counts
    assert counts == {int(v): int(n) for v, n in zip(*np.unique(lab, return_counts=True), strict=True)}


def test_negative_labels_get_a_signed_type_and_a_fault_in_check_mask(tmp_path):
    lab = _labels(top=5).astype(np.int32)
    lab[3, 3, 3] = -2
    p = _write(tmp_path / "neg.nii.gz", lab)
    vol = load_mask(p)
    assert vol.array.dtype == np.int8
    assert int(vol.array.min()) == -2
    assert [f.kind for f in check_mask(p)] == ["negative_label"]


def test_scaled_integer_mask_is_read_with_its_scaling(tmp_path, small_slabs):
    lab = _labels(top=10).astype(np.int16)
    p = _write(tmp_path / "scaled.nii.gz", lab, slope=2.0, inter=1.0)
    vol = load_mask(p)
    assert vol.array.dtype == np.uint8
    assert np.array_equal(vol.array, np.asarray(load_volume(p).array))
    assert int(vol.array.max()) == 21


def test_non_integer_and_nan_masks_are_refused_naming_the_file(tmp_path, small_slabs):
    lab = _labels(top=5).astype(np.float64)
    lab[1, 2, 25] = 2.5
    p = _write(tmp_path / "half.nii.gz", lab)
    with pytest.raises(IntegrityError) as err:
        load_mask(p)
    assert err.value.kinds == ["not_integer"]
    assert str(p) in str(err.value)
    assert "2.5" in str(err.value)
    lab[1, 2, 25] = np.nan
    q = _write(tmp_path / "nan.nii.gz", lab)
    with pytest.raises(IntegrityError) as err:
        load_mask(q)
    assert err.value.kinds == ["non_finite"]
    # read_mask keeps going: the bad voxel is 0, counted in the scan
    vol = read_mask(q)
    assert vol.meta["label_scan"].non_finite == 1
    assert vol.array.dtype == np.uint8


def test_unreadable_mask_is_an_integrity_error_of_kind_unreadable(tmp_path):
    p = tmp_path / "cut.nii.gz"
    _write(p, _labels(), dtype=np.float64)
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(IntegrityError) as err:
        load_mask(p)
    assert err.value.kinds == ["unreadable"]
    assert str(p) in str(err.value)


def test_four_d_single_frame_mask(tmp_path):
    lab = _labels()[..., None]
    p = _write(tmp_path / "frame.nii.gz", lab, dtype=np.float32)
    assert load_mask(p).shape == load_volume(p).shape


def test_reading_a_float64_mask_never_holds_a_float64_copy(tmp_path, monkeypatch):
    shape = (64, 64, 200)  # 6.6 MB as float64, 0.8 MB as uint8
    p = _write(tmp_path / "big_msk.nii", _labels(shape, top=24), dtype=np.float64)
    monkeypatch.setattr(nifti_mod, "SLAB_VOXELS", 64 * 64 * 8)
    tracemalloc.start()
    vol = load_mask(p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert vol.array.dtype == np.uint8
    # the uint8 result plus a few slab temporaries; load_volume would need the 6.6 MB float64 array
    assert peak < 3.0e6, peak


@pytest.mark.parametrize(("stored", "slope", "inter", "want"), [
    (np.int16, None, None, np.int16),
    (np.uint16, 1.0, -1024.0, np.float32),    # uint16 range + intercept exceeds int16: float32
    (np.int16, 1.0, -1024.0, np.float32),     # int16 - 1024 can leave int16: float32
    (np.int8, 1.0, -100.0, np.int16),         # fits int16 exactly
    (np.float64, None, None, np.float32),
])
def test_load_ct_int16_when_exact_else_float32(tmp_path, small_slabs, stored, slope, inter, want):
    rng = np.random.default_rng(1)
    hu = rng.integers(-100 if stored != np.uint16 else 0, 100, size=(20, 24, 30))
    p = _write(tmp_path / "ct.nii.gz", hu.astype(stored), slope=slope, inter=inter)
    vol = load_ct(p)
    assert vol.array.dtype == want
    assert np.array_equal(vol.array.astype(np.float64), np.asarray(load_volume(p).array, dtype=np.float64))
    assert np.allclose(vol.affine, load_volume(p).affine)


def test_load_ct_missing_file_names_it(tmp_path):
    with pytest.raises(NiftiReadError, match="missing.nii.gz: file not found"):
        load_ct(tmp_path / "missing.nii.gz")


def test_load_pair_reads_and_checks_both(tmp_path):
    lab = _labels(top=5)
    img = _write(tmp_path / "ct.nii.gz", lab.astype(np.int16) * 100)
    msk = _write(tmp_path / "seg.nii.gz", lab, dtype=np.float64)
    ct, m = load_pair(img, msk, allowed_labels=range(1, 6))
    assert ct.array.dtype == np.int16
    assert m.array.dtype == np.uint8
    with pytest.raises(IntegrityError) as err:
        load_pair(img, msk, allowed_labels=range(1, 4))
    assert err.value.kinds == ["unknown_label"]
    shifted = PIR.copy()
    shifted[0, 3] += 2.0
    other = _write(tmp_path / "seg_moved.nii.gz", lab, affine=shifted, dtype=np.float64)
    with pytest.raises(IntegrityError) as err:
        load_pair(img, other)
    assert err.value.kinds == ["affine"]


@pytest.mark.parametrize(("lo", "hi", "want"), [(0, 0, np.uint8), (0, 255, np.uint8), (0, 256, np.uint16),
                                               (-1, 5, np.int8), (-1, 200, np.int16), (0, 2**40, np.int64)])
def test_smallest_int_dtype(lo, hi, want):
    assert smallest_int_dtype(lo, hi) == want
