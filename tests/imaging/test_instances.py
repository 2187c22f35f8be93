"""lib.imaging.instances: neck watershed and the merged-vertebra split."""

from __future__ import annotations

import numpy as np

from lib.imaging import instances


def test_split_at_necks_moves_a_misplaced_boundary_to_the_thin_joint():
    # two "vertebrae" (16-voxel cubes) joined by a 2 x 2 voxel "facet joint"; the coarse stage
    # put the boundary 2 voxels inside the lower one
    lab = np.zeros((20, 20, 40), np.uint8)
    lab[2:18, 2:18, 2:18] = 1
    lab[9:11, 9:11, 18:21] = 1  # the neck
    lab[2:18, 2:18, 21:37] = 2
    lab[2:18, 2:18, 21:23] = 1  # misplaced boundary
    out = instances.split_at_necks(lab, (1.0, 1.0, 1.0), core_fraction=0.3)
    assert np.array_equal(out > 0, lab > 0)  # the spine mask is untouched
    assert (out[2:18, 2:18, 2:18] == 1).all()
    assert (out[2:18, 2:18, 21:37] == 2).all()
    assert set(np.unique(out)) == {0, 1, 2}
    # anisotropic spacing is honoured and an empty map passes through
    assert not instances.split_at_necks(np.zeros((4, 4, 4), np.uint8), (1, 1, 3)).any()


def test_split_ignores_an_instance_too_thin_to_hold_a_disc():
    aff = np.diag([2.0, 2.0, 4.5, 1.0])  # thick slices: vertebrae one or two slices tall
    pred = np.zeros((30, 30, 12), np.uint8)
    pred[10:20, 10:20, 1] = 20
    pred[10:20, 10:20, 3] = 21
    pred[5:25, 5:25, 5:7] = 22  # 8x the volume, two slices: no room for a valley
    pred[10:20, 10:20, 8] = 23
    pred[10:20, 10:20, 10] = 24
    insts = instances.vertebra_instances(pred, aff)
    parts, notes = instances.split_merged_instances(pred, aff, insts)
    assert notes == []
    assert len(parts) == len(insts) == 5
