"""lib.metrics.case: per-label rows, the spine row, the conventions for missed and false-positive labels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib import metrics
from tests.helpers.label_maps import SPACING, _cube, _row


def test_spine_row_equals_binary_comparison(random_pair):
    gt, pred = random_pair
    rows = metrics.evaluate_case(gt, pred, SPACING, labels=range(1, 10), hd95="max", nsd_tolerance_mm=1.5)
    spine = _row(rows, metrics.SPINE_LABEL)
    assert spine["name"] == "spine"
    ref = metrics.compare_masks(gt > 0, pred > 0, SPACING, hd95="max", nsd_tolerance_mm=1.5)
    for k in ("dice", "hd95", "assd", "nsd"):
        assert spine[k] == pytest.approx(ref[k], abs=1e-9)


def test_conventions_missed_false_positive_and_absent(random_pair):
    gt, pred = random_pair
    rows = metrics.evaluate_case(gt, pred, SPACING, labels=range(1, 12))
    labels = [r["label"] for r in rows]
    assert 7 not in labels
    assert 11 not in labels
    missed = _row(rows, 6)
    assert missed["status"] == metrics.MISSED
    assert missed["dice"] == 0.0
    assert missed["nsd"] == 0.0
    assert math.isnan(missed["hd95"])
    assert math.isnan(missed["assd"])
    assert missed["identified"] == 0.0
    assert math.isnan(missed["localisation_mm"])
    fp = _row(rows, 9)
    assert fp["status"] == metrics.FALSE_POSITIVE
    assert fp["gt_voxels"] == 0
    assert fp["pred_voxels"] == 3 * 3 * 4
    assert all(math.isnan(fp[k]) for k in ("dice", "hd95", "assd", "identified"))
    assert labels[-1] == metrics.SPINE_LABEL


def test_empty_truth_and_prediction_give_no_rows():
    z = np.zeros((8, 8, 8), np.uint8)
    assert metrics.evaluate_case(z, z, SPACING) == []


def test_bool_masks_and_validation_errors():
    gt = _cube((12, 12, 12), (2, 2, 2), 6)
    rows = metrics.evaluate_case(gt, gt, SPACING, labels=[1])
    assert _row(rows, 1)["dice"] == 1.0
    assert _row(rows, 1)["hd95"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        metrics.evaluate_case(gt, gt[:-1], SPACING)
    with pytest.raises(TypeError, match="float"):
        metrics.evaluate_case(gt.astype(np.float32), gt, SPACING)
    with pytest.raises(ValueError, match="HD95 definition"):
        metrics.evaluate_case(gt, gt, SPACING, hd95="mean")
    with pytest.raises(ValueError, match="spacing"):
        metrics.evaluate_case(gt, gt, (1.0, 0.0, 1.0))


def test_evaluate_case_identification_on_swapped_labels():
    m = np.zeros((10, 10, 60), np.uint8)
    for v in range(1, 5):
        m[3:7, 3:7, 3 + 14 * (v - 1): 13 + 14 * (v - 1)] = v
    p = m.copy()
    p[m == 2], p[m == 3] = 3, 2
    rows = metrics.evaluate_case(m, p, (1.0, 1.0, 1.5), labels=range(1, 5))
    assert [_row(rows, v)["identified"] for v in range(1, 5)] == [1.0, 0.0, 0.0, 1.0]
    assert _row(rows, 2)["localisation_mm"] == pytest.approx(14 * 1.5)
    assert _row(rows, 2)["dice"] == 0.0
    assert _row(rows, 2)["status"] == metrics.DETECTED
