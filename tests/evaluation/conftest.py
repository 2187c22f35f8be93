"""Fixtures shared by the tests of this folder."""

from __future__ import annotations

import pytest

from lib.io import save_volume
from tests.helpers.label_boxes import AFFINE, _prediction, _truth


@pytest.fixture
def folders(tmp_path):
    """Three CTSpine1K-style truths (ID_seg.nii.gz); predictions for two (ID.nii.gz)."""
    gt_dir, pred_dir = tmp_path / "test_public" / "gt", tmp_path / "pred"
    for i in range(3):
        gt = _truth(i)
        save_volume(gt, AFFINE, gt_dir / f"HN_P00{i}_seg.nii.gz")
        if i < 2:
            save_volume(_prediction(gt, i), AFFINE, pred_dir / f"HN_P00{i}.nii.gz")
    return gt_dir, pred_dir

