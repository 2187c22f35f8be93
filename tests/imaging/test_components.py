"""lib.imaging.components: post-processing of predicted label maps."""

from __future__ import annotations

import numpy as np

from lib.imaging import components


def test_postprocess_keeps_largest_component_per_label_and_drops_specks():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = 5      # 216 voxels
    lab[12:14, 12:14, 12:14] = 5  # second, smaller component of label 5
    lab[2:8, 2:8, 10:16] = 6
    lab[17, 17, 17] = 7        # a one-voxel speck
    out = components.postprocess_labels(lab, (1, 1, 1), largest_component=True, min_component_mm3=5)
    assert (out == 5).sum() == 216
    assert (out[12:14, 12:14, 12:14] == 0).all()
    assert (out == 6).sum() == 216
    assert (out == 7).sum() == 0
    assert (components.postprocess_labels(lab, (1, 1, 1), False, 0) == lab).all()
    # a stray piece of label 6 stuck to vertebra 5 is relabelled 5, not deleted
    lab2 = lab.copy()
    lab2[8, 3:6, 3:6] = 6
    out2 = components.postprocess_labels(lab2, (1, 1, 1), largest_component=True, min_component_mm3=5)
    assert (out2[8, 3:6, 3:6] == 5).all()
    assert (out2 == 6).sum() == 216
