"""lib.imaging.landmarks: rib-bearing levels and the skull base."""

from __future__ import annotations

import numpy as np

from lib.imaging import instances, landmarks


def test_rib_detection_marks_thoracic_instances_only(l6_case):
    insts = instances.vertebra_instances(l6_case.mask, l6_case.affine)
    ribs = landmarks.detect_ribs(l6_case.ct, l6_case.mask, l6_case.affine, insts)
    by_label = {i.label: r for i, r in zip(insts, ribs, strict=True)}
    assert by_label[19]
    assert by_label[18]
    assert not any(by_label[v] for v in (20, 21, 22, 23))  # L1..L4


def test_skull_needs_a_large_bone_mass_in_view_above_the_top_vertebra():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    pred = np.zeros((40, 40, 60), np.uint8)
    pred[15:25, 15:25, 20:30] = 1  # the top vertebra
    top = instances.vertebra_instances(pred, aff)[0]
    ct = np.zeros(pred.shape, np.float32)
    ct[5:35, 5:35, 31:45] = 800.0  # skull base: 30 x 30 x 14 voxels of bone = 100 ml
    assert landmarks.detect_skull(ct, pred, aff, top)
    small = np.zeros_like(ct)
    small[18:22, 18:22, 31:35] = 800.0  # 64 voxels = 0.5 ml: a cut vertebra or a rib, not a skull
    assert not landmarks.detect_skull(small, pred, aff, top)
    # the image ends 6 mm above the vertebra: 14 ml of bone in view, but no skull can be claimed
    cut = np.ascontiguousarray(pred[:, :, :33])
    assert (ct[:, :, 30:33] > 250).sum() * 8 / 1000 > 10
    assert not landmarks.detect_skull(ct[:, :, :33], cut, aff, instances.vertebra_instances(cut, aff)[0])
