"""lib.ml.losses: the ordinal levels targets and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.ml import losses, preprocessing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_levels_targets_and_loss_prefer_the_right_count():
    cls = np.zeros((1, 1, 12), np.uint8)
    cls[0, 0, 1:3], cls[0, 0, 6:9] = 1, 2
    enc = preprocessing.encode_levels(cls)
    assert preprocessing.decode_levels(enc).tolist() == cls.tolist()
    # background voxels carry the nearest vertebra's level: 1 above the gap's middle, 2 below
    assert (enc[0, 0] % preprocessing.LEVEL_FG).tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2] or \
        (enc[0, 0] % preprocessing.LEVEL_FG).tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]
    target = torch.as_tensor(enc[None, None].astype(np.int64))  # (1, 1, 1, 1, 12)
    loss = losses.LevelsLoss()
    good = torch.full((1, 1, 1, 1, 12), -8.0)  # the one threshold: "level > 1"
    good[0, 0, ..., 5:] = 8.0
    bad = -good
    assert float(loss(good, target)) < 0.01 < 1.0 < float(loss(bad, target))
    pred = losses.predicted_classes(good.numpy(), "levels", enc[None])
    assert pred[0, 0, 0].tolist() == cls[0, 0].tolist()
    # P(level > 1..4): the level is 1 + the expected number of thresholds passed
    probs = np.array([[0.95, 0.9, 0.1, 0.05], [0.01] * 4, [0.99] * 4]).T
    assert losses.level_from_ordinal(probs).tolist() == [3, 1, 5]
