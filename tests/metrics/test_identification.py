"""lib.metrics.identification: nearest centroid with the label, within the distance limit, by rule."""

from __future__ import annotations

import math

import pytest

from lib import metrics


def test_identification_closest_and_within_limit():
    gt = {1: (0.0, 0.0, 0.0), 2: (0.0, 0.0, 30.0), 3: (0.0, 0.0, 60.0), 4: (0.0, 0.0, 90.0),
          5: (0.0, 0.0, 120.0)}
    pred = {1: (0.0, 3.0, 0.0),        # 3 mm, closest: identified
            2: (0.0, 0.0, 44.0),       # 14 mm; nearest true centroid to it is true 2 (get_hits: identified),
                                       # but predicted 3 is 8 mm from true 2 (nearest_prediction: not)
            3: (0.0, 0.0, 38.0),       # 22 mm from true 3: not identified
            4: (0.0, 20.0, 90.0),      # exactly 20 mm, closest: identified (limit inclusive)
            5: (0.0, 20.5, 120.0)}     # closest but 20.5 mm: not identified
    res = metrics.identification(gt, pred, max_dist_mm=20.0)
    assert [res[v]["identified"] for v in (1, 2, 3, 4, 5)] == [True, True, False, True, False]
    old = metrics.identification(gt, pred, max_dist_mm=20.0, rule="nearest_prediction")
    assert [old[v]["identified"] for v in (1, 2, 3, 4, 5)] == [True, False, False, True, False]
    assert res[2]["localisation_mm"] == pytest.approx(14.0)
    empty = metrics.identification({1: (0.0, 0.0, 0.0)}, {})[1]
    assert empty["identified"] is False
    assert math.isnan(empty["localisation_mm"])
