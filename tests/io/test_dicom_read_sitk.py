"""lib.io.dicom_read's SimpleITK cross-check reader: source volumes come back canonical."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.io import dicom_read, load_volume
from lib.synthetic import oracle


def test_load_source_volume_is_canonical(generated):
    p, _ = generated
    idx = oracle.read_index(p)
    for src in ("COLONOG", "MSD_T10", "VerSe"):
        r = idx[idx["source"] == src].iloc[0]
        vol = dicom_read.read_source_volume(Path(p.sources), r["image_path"])
        assert np.all(np.diag(vol.affine)[:3] > 0)  # RAS+
        truth = oracle.load_truth(p, src, r["source_key"], vol)
        assert truth.shape == vol.shape
        assert truth.any()
        if src != "COLONOG":
            ref = load_volume(Path(p.sources) / r["image_path"])
            np.testing.assert_array_equal(ref.array, vol.array)
