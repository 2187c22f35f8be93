"""lib.ml.preprocessing: mask -> class targets (labels, levels), errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from lib.ml import preprocessing
from tests.helpers.plans import tiny_plan
from tests.helpers.toy_cases import toy_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mask_to_classes_names_file_and_values(tmp_path):
    cases = toy_cases(tmp_path, 2)
    plan = tiny_plan(cases)
    m = np.array([0, 20, 23, 99], np.uint8)
    assert preprocessing.mask_to_classes(m[:3], plan, "labels").tolist() == [0, 1, 4]
    assert preprocessing.mask_to_classes(m[:3], plan, "foreground").tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"weird_seg.*\[99\]"):
        preprocessing.mask_to_classes(m, plan, "labels", "weird_seg.nii.gz")


def test_levels_count_whole_levels_so_a_normal_l1_follows_t12(tmp_path):
    from lib.core import labels as L

    cases = toy_cases(tmp_path / "d", 1)
    plan = tiny_plan(cases, labels=L.ordered(list(range(1, 26)) + [L.T13]))
    ladder = plan.level_ladder()
    assert L.T13 not in ladder
    assert ladder == list(range(1, 26))
    assert plan.stage("coarse").n_classes(plan) == 24  # thresholds between the 25 rungs
    mask = np.array([[[19, L.T13, 20, 0, 25]]], dtype=np.uint8)  # T12, T13, L1, background, L6
    lev = preprocessing.mask_to_classes(mask, plan, "levels")
    assert lev.ravel().tolist() == [19, 0, 20, 0, 25]  # T12 and L1 one rung apart; T13 off the ladder
    assert plan.level_to_label()[[19, 20, 25]].tolist() == [19, 20, 25]
    # the softmax task keeps T13 as its own class
    lab = preprocessing.mask_to_classes(mask, plan, "labels").ravel().tolist()
    assert lab[1] == plan.labels.index(L.T13) + 1
    assert lab[2] == lab[1] + 1
    # encoded targets: T13's voxel takes a neighbour's level, never a rung of its own
    enc = preprocessing.encode_levels(lev[..., :3]) & (preprocessing.LEVEL_FG - 1)  # the trained level of every voxel
    assert enc.ravel()[0] == 19
    assert enc.ravel()[2] == 20
    assert enc.ravel()[1] in (19, 20)
