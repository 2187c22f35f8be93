"""Helpers shared by the tests split from tests/test_io.py."""

from __future__ import annotations

import nibabel as nib


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path
