"""lib.datasets.verse: centroid files, and the pretraining selection of VerSe scans."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lib.core.cases import split_cases
from lib.datasets import verse
from lib.datasets import verse as verse_files
from lib.imaging import resampling


@pytest.mark.parametrize("axcodes", [("P", "I", "R"), ("L", "A", "S"), ("R", "P", "I")])
def test_verse_centroid_json_round_trips(tmp_path, axcodes):
    ras = np.diag([0.8, 0.9, 1.5, 1.0])
    ras[:3, 3] = (-30.0, 12.0, -200.0)
    arr = np.zeros((40, 30, 20), np.int16)
    stored, aff = resampling.reorient_array(arr, ras, axcodes)
    cents = {20: (-10.0, 20.0, -190.0), 28: (-5.5, 22.25, -180.0)}
    path = verse_files.write_verse_centroids(tmp_path / "x_ctd.json", cents, aff, stored.shape)
    body = json.loads(path.read_text())
    assert body[0] == {"direction": ["P", "I", "R"]}
    assert [e["label"] for e in body[1:]] == [28, 20]  # craniocaudal: T13 before L1
    back = verse_files.read_verse_centroids(path, aff, stored.shape)
    for lab, c in cents.items():
        np.testing.assert_allclose(back[lab], c, atol=2e-3)
    # coordinates are voxel indices in P, I, R: X grows posteriorly
    x_of = {e["label"]: e["X"] for e in body[1:]}
    assert x_of[20] > x_of[28]  # label 20 lies at y=20 < 22.25 (more posterior)


def _verse_scan(root, stem, labels, shape=(10, 10, 72), mask_zoom=1.0, pad_top=9):
    """A tiny BIDS VerSe scan: one 2-voxel slab per label from the top (superior) down."""
    from lib.io import save_volume

    sub = stem.split("_")[0]
    ct = np.zeros(shape, np.int16)
    m = np.zeros(shape, np.uint8)
    z = shape[2] - pad_top
    for v in labels:
        m[3:7, 3:7, z - 2:z] = v
        ct[3:7, 3:7, z - 2:z] = 500
        z -= 2
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(ct, aff, root / "rawdata" / sub / f"{stem}_ct.nii.gz")
    if mask_zoom != 1.0:
        m = np.repeat(m, int(1 / mask_zoom), axis=2)
        aff = np.diag([2.0, 2.0, 2.0 * mask_zoom, 1.0])
    save_volume(m, aff, root / "derivatives" / sub / f"{stem}_seg-vert_msk.nii.gz")


def test_verse_selection_keeps_complete_consistent_scans_and_says_why_not(tmp_path):
    from lib.core import labels as L

    full = list(range(1, 25))  # C1..L5
    _verse_scan(tmp_path, "sub-verse001", full)
    _verse_scan(tmp_path, "sub-verse002_dir-ax", [v for v in full if v != L.T12])  # T11 spine: usable
    _verse_scan(tmp_path, "sub-verse003", full[:19] + [L.T13] + full[19:])  # T13: usable
    _verse_scan(tmp_path, "sub-verse004", full[3:])  # starts at C4
    _verse_scan(tmp_path, "sub-verse005", full[:15])  # ends at T8
    _verse_scan(tmp_path, "sub-verse006", full, mask_zoom=0.5)  # mask on a 1 mm z grid
    _verse_scan(tmp_path, "sub-verse007", full, pad_top=0)  # C1 cut by the superior face
    _verse_scan(tmp_path, "sub-verse008", [v for v in full if v != 12])  # T5 missing inside
    usable, table = verse.select_pretraining_cases(tmp_path, progress=False)
    assert [u[0] for u in usable] == ["sub-verse001", "sub-verse002_dir-ax", "sub-verse003"]
    why = dict(zip(table["case_id"], table["reason"], strict=True))
    assert "C1 not in the field of view" in why["sub-verse004"]
    assert "ends at T8" in why["sub-verse005"]
    assert "mask spacing 2 2 1 mm differs" in why["sub-verse006"]
    assert "border" in why["sub-verse007"] or "above C1" in why["sub-verse007"]
    assert "T5" in why["sub-verse008"]
    assert table["usable"].sum() == 3
    assert len(table) == 8
    tr, te = split_cases(usable, 1, seed=0)
    assert len(tr) == 2
    assert len(te) == 1
    assert set(tr + te) == set(usable)
    assert split_cases(usable, 1, seed=0) == (tr, te)
