"""lib.metrics.centroids: centroids in world mm through the affine."""

from __future__ import annotations

import numpy as np

from lib import metrics
from tests.helpers.label_maps import _row


def test_centroids_use_the_affine():
    m = np.zeros((10, 12, 14), np.int16)
    m[2:4, 3:6, 4:5] = 3  # mean index (2.5, 4, 4)
    m[7, 9, 10] = 5
    affine = np.array([[0.0, -0.8, 0.0, 10.0], [1.2, 0.0, 0.0, -5.0], [0.0, 0.0, 2.0, 3.0], [0, 0, 0, 1]])
    c = metrics.centroids_mm(m, affine)
    assert set(c) == {3, 5}
    np.testing.assert_allclose(c[3], affine[:3, :3] @ [2.5, 4, 4] + affine[:3, 3])
    np.testing.assert_allclose(c[5], affine[:3, :3] @ [7, 9, 10] + affine[:3, 3])
    rows = metrics.evaluate_case(m, m, (1.2, 0.8, 2.0), labels=[3, 5], affine=affine)
    np.testing.assert_allclose(_row(rows, 3)["gt_centroid_mm"], c[3])
