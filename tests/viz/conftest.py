"""Fixtures shared by the tests of this folder."""

from __future__ import annotations

import numpy as np
import pytest

from lib.core.cases import Case
from lib.io import save_volume
from tests.helpers.spines import AFFINE, spine_mask


@pytest.fixture
def case(tmp_path):
    truth = spine_mask([24, 23, 22, 21, 20, 19])
    pred = truth.copy()
    pred[pred == 19] = 0  # T12 missed
    ct = np.where(truth > 0, 700, 40).astype(np.int16)
    paths = {}
    for name, arr in (("img", ct), ("gt", truth), ("pred", pred)):
        paths[name] = save_volume(arr, AFFINE, tmp_path / f"{name}.nii.gz")
    return Case("liver_001", paths["img"], paths["gt"], prediction=paths["pred"])

