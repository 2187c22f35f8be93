"""lib.io.integrity: image / mask pair checks name the file and the fault."""

from __future__ import annotations

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
