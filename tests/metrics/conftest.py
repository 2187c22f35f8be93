"""Fixtures shared by the tests of this folder."""

from __future__ import annotations

import pytest

from tests.helpers.label_maps import _random_labels


@pytest.fixture(scope="module")
def random_pair():
    shape = (34, 30, 26)
    gt = _random_labels(shape, 6, seed=11)
    pred = _random_labels(shape, 6, seed=12)
    pred[:3, :, :4] = 2  # a label on the array border
    pred[pred == 6] = 0  # label 6 missed
    pred[30:33, 2:5, 20:24] = 9  # a false-positive vertebra (9 not in truth)
    return gt, pred

