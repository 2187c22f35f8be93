"""lib.io.integrity: image / mask pair checks name the file and the fault."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lib import io
from tests.helpers.nifti_files import _write


def test_check_pair_shape_label_and_affine_faults(tmp_path, rng):
    img = _write(tmp_path / "HN_P001.nii.gz", rng.normal(0, 100, (10, 12, 14)).astype(np.int16), np.eye(4))
    ok_mask = np.zeros((10, 12, 14), np.uint8)
    ok_mask[2:5, 2:5, 2:5] = 20
    good = _write(tmp_path / "HN_P001_seg.nii.gz", ok_mask, np.eye(4))
    assert io.check_pair(img, good, allowed_labels=range(1, 26)) == []

    wrong_shape = _write(tmp_path / "shape_seg.nii.gz", np.zeros((10, 12, 13), np.uint8), np.eye(4))
    faults = io.check_pair(img, wrong_shape, allowed_labels=range(1, 26))
    assert len(faults) == 1
    assert "shape_seg.nii.gz" in str(faults[0])
    assert "(10, 12, 13)" in faults[0].message

    m99 = ok_mask.copy()
    m99[0, 0, 0] = 99
    bad_label = _write(tmp_path / "lab_seg.nii.gz", m99, np.eye(4))
    faults = io.check_pair(img, bad_label, allowed_labels=range(1, 26))
    assert [f.path for f in faults] == [str(bad_label)]
    assert "[99]" in faults[0].message
    with pytest.raises(io.IntegrityError, match="lab_seg.nii.gz: unexpected label values \\[99\\]"):
        io.require_pair(img, bad_label, allowed_labels=range(1, 26))

    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    moved = _write(tmp_path / "moved_seg.nii.gz", ok_mask, shifted)
    faults = io.check_pair(img, moved, allowed_labels=range(1, 26))
    assert len(faults) == 1
    assert "affine" in faults[0].message


def test_nan_image_is_reported(tmp_path):
    arr = np.zeros((5, 5, 5), np.float32)
    arr[1, 1, 1] = np.nan
    p = _write(tmp_path / "nan.nii.gz", arr, np.eye(4))
    faults = io.check_pair(p)
    assert faults
    assert "NaN" in faults[0].message
    assert faults[0].path == str(p)


# --- one test per fault kind: the kind, and the file named in the message -------------------------

SHAPE = (8, 9, 10)


def _image(tmp_path, name="ct.nii.gz", affine=None):
    arr = np.linspace(-1000, 1000, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    return _write(tmp_path / name, arr, np.eye(4) if affine is None else affine)


def _mask(tmp_path, name="ct_seg.nii.gz", dtype=np.uint8, affine=None, value=20):
    m = np.zeros(SHAPE, dtype)
    m[2:5, 2:6, 3:7] = value
    return _write(tmp_path / name, m, np.eye(4) if affine is None else affine)


def _only(faults, kind, name):
    assert [f.kind for f in faults] == [kind], faults
    assert name in str(faults[0])
    assert name in faults[0].path
    return faults[0]


def test_fault_kinds_are_the_documented_ones():
    assert set(io.FAULT_KINDS) == {"unreadable", "not_3d", "bad_spacing", "non_finite", "not_integer", "shape",
                                   "affine", "unknown_label", "negative_label", "empty"}
    assert io.Fault("x.nii.gz", "something").kind == "error"  # old two-argument calls still work
    with pytest.raises(ValueError, match="unknown fault kind"):
        io.Fault("x.nii.gz", "m", "bogus")


def test_truncated_gzip_is_unreadable(tmp_path):
    good = _mask(tmp_path, "full_seg.nii.gz")
    bad = tmp_path / "cut_seg.nii.gz"
    bad.write_bytes(good.read_bytes()[:60])
    f = _only(io.check_mask(bad), "unreadable", "cut_seg.nii.gz")
    assert "truncated" in f.message
    _only(io.check_image(tmp_path / "absent.nii.gz"), "unreadable", "absent.nii.gz")
    not_nifti = tmp_path / "text.nii"
    not_nifti.write_text("hello")
    _only(io.check_image(not_nifti), "unreadable", "text.nii")


def test_4d_file_is_not_3d(tmp_path):
    p = _write(tmp_path / "dwi.nii.gz", np.zeros((4, 4, 4, 3), np.int16), np.eye(4))
    f = _only(io.check_image(p), "not_3d", "dwi.nii.gz")
    assert "(4, 4, 4, 3)" in f.message


def test_zero_pixdim_is_bad_spacing(tmp_path):
    img = nib.Nifti1Image(np.zeros(SHAPE, np.int16), None)
    img.header.set_zooms((1.0, 0.0, 1.0))
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    p = tmp_path / "flat.nii.gz"
    nib.save(img, str(p))
    _only(io.check_image(p), "bad_spacing", "flat.nii.gz")


def test_nan_slab_is_non_finite_with_the_count(tmp_path):
    arr = np.zeros(SHAPE, np.float32)
    arr[:, :, 4] = np.nan
    p = _write(tmp_path / "nanslab.nii.gz", arr, np.eye(4))
    f = _only(io.check_image(p), "non_finite", "nanslab.nii.gz")
    assert f"{SHAPE[0] * SHAPE[1]} NaN/inf" in f.message
    with pytest.raises(io.IntegrityError) as err:
        io.verify_case(p)
    assert err.value.kinds == ["non_finite"]
    assert "nanslab.nii.gz" in str(err.value)


def test_float_mask_with_a_fraction_is_not_integer(tmp_path):
    img = _image(tmp_path)
    m = np.zeros(SHAPE, np.float64)
    m[1:3, 1:3, 1:3] = 3.5
    p = _write(tmp_path / "frac_seg.nii.gz", m, np.eye(4))
    f = _only(io.check_mask(p, img), "not_integer", "frac_seg.nii.gz")
    assert "3.5" in f.message
    with pytest.raises(io.IntegrityError, match=r"frac_seg\.nii\.gz: .*3\.5") as err:
        io.verify_case(img, p, allowed_labels=range(1, 26))
    assert err.value.kinds == ["not_integer"]


def test_float64_mask_holding_integers_passes(tmp_path):
    img = _image(tmp_path)
    p = _mask(tmp_path, "f64_seg.nii.gz", dtype=np.float64, value=20)
    assert io.check_pair(img, p, allowed_labels=range(1, 26), require_nonempty=True) == []
    io.verify_case(img, p, allowed_labels=range(1, 26), require_nonempty=True)
    assert io.label_counts(io.load_volume(p).array) == {0: int(np.prod(SHAPE)) - 3 * 4 * 4, 20: 3 * 4 * 4}


def test_wrong_shape_is_shape(tmp_path):
    img = _image(tmp_path)
    p = _write(tmp_path / "small_seg.nii.gz", np.zeros((8, 9, 9), np.uint8), np.eye(4))
    f = _only(io.check_pair(img, p), "shape", "small_seg.nii.gz")
    assert "(8, 9, 9)" in f.message
    assert "ct.nii.gz" in f.message  # the reference is named too


def test_mask_shifted_by_1mm_is_affine_with_the_offset(tmp_path):
    img = _image(tmp_path)
    shifted = np.eye(4)
    shifted[2, 3] = 1.0
    p = _mask(tmp_path, "shift_seg.nii.gz", affine=shifted)
    f = _only(io.check_pair(img, p), "affine", "shift_seg.nii.gz")
    assert "1 mm" in f.message
    assert io.check_pair(img, p, affine_atol_mm=1.5) == []  # the tolerance is in mm
    # the same voxels in another axis order: a fault in the files' own order, fine in RAS+
    flipped = np.eye(4)
    flipped[0, 0], flipped[0, 3] = -1.0, SHAPE[0] - 1
    m = io.load_volume(_mask(tmp_path, "ref_seg.nii.gz"), canonical=False).array
    q = _write(tmp_path / "flip_seg.nii.gz", np.ascontiguousarray(m[::-1]), flipped)
    _only(io.check_mask(q, img), "affine", "flip_seg.nii.gz")
    assert io.check_mask(q, img, grid="ras") == []


def test_label_99_is_unknown_label(tmp_path):
    img = _image(tmp_path)
    m = np.zeros(SHAPE, np.uint8)
    m[1, 1, 1], m[3, 3, 3] = 99, 5
    p = _write(tmp_path / "l99_seg.nii.gz", m, np.eye(4))
    f = _only(io.check_pair(img, p, allowed_labels=range(1, 26)), "unknown_label", "l99_seg.nii.gz")
    assert "[99]" in f.message
    assert io.check_pair(img, p) == []  # no label set given: any non-negative integer


def test_negative_label_is_negative_label(tmp_path):
    m = np.zeros(SHAPE, np.int16)
    m[1, 1, 1] = -3
    p = _write(tmp_path / "neg_seg.nii.gz", m, np.eye(4))
    f = _only(io.check_mask(p), "negative_label", "neg_seg.nii.gz")
    assert "-3" in f.message


def test_empty_mask_is_empty_only_when_required(tmp_path):
    img = _image(tmp_path)
    p = _write(tmp_path / "blank_seg.nii.gz", np.zeros(SHAPE, np.uint8), np.eye(4))
    assert io.check_pair(img, p, allowed_labels=range(1, 26)) == []
    _only(io.check_pair(img, p, allowed_labels=range(1, 26), require_nonempty=True), "empty", "blank_seg.nii.gz")
    with pytest.raises(io.IntegrityError) as err:
        io.verify_case(img, p, require_nonempty=True)
    assert err.value.kinds == ["empty"]
    assert err.value.paths == [str(p)]


def test_several_faults_are_all_listed(tmp_path):
    arr = np.zeros(SHAPE, np.float32)
    arr[0, 0, 0] = np.inf
    img = _write(tmp_path / "inf.nii.gz", arr, np.eye(4))
    m = np.zeros((8, 9, 9), np.uint8)
    m[0, 0, 0] = 77
    p = _write(tmp_path / "two_seg.nii.gz", m, np.eye(4))
    with pytest.raises(io.IntegrityError) as err:
        io.require_pair(img, p, allowed_labels=range(1, 26))
    assert err.value.kinds == ["non_finite", "unknown_label", "shape"]
    assert "inf.nii.gz" in str(err.value)
    assert "two_seg.nii.gz" in str(err.value)
