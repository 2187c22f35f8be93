"""lib.synthetic.oracle: the truth on any target grid; errors name what is missing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lib.imaging import resampling
from lib.io import load_volume, save_volume
from lib.io import write_text as io_write_text
from lib.synthetic import oracle
from tests.helpers.grids import _affine, _labels


def _oracle_tree(tmp_path) -> SimpleNamespace:
    p = SimpleNamespace(profile="ci", sources=tmp_path / "sources", oracle=tmp_path / "oracle")
    lab, aff = _labels(), _affine()
    stored, st_aff = resampling.reorient_array(lab, aff, ("L", "P", "S"))
    mpath, cpath = oracle.write_truth(p.oracle, "MSD_T10", "liver_3", stored, st_aff, {20: (1.0, 2.0, 3.0)})
    row = {c: "" for c in oracle.INDEX_COLUMNS}
    row.update(source="MSD_T10", patient_id="liver_3", source_key="liver_3",
               mask_path=str(mpath.relative_to(p.oracle)), centroids_path=str(cpath.relative_to(p.oracle)))
    io_write_text(p.oracle / "index.csv", pd.DataFrame([row]).to_csv(index=False))
    return p


def test_load_truth_on_a_reoriented_or_resampled_image(tmp_path):
    p = _oracle_tree(tmp_path)
    lab, aff = _labels(), _affine()
    # the curated image: same grid stored RAS -> exact copy
    save_volume(np.zeros(lab.shape, np.int16), aff, tmp_path / "img.nii.gz")
    vol = load_volume(tmp_path / "img.nii.gz")
    np.testing.assert_array_equal(oracle.load_truth(p, "MSD_T10", "liver_3", vol), lab)
    # a cropped image: nearest neighbour by world coordinates
    crop_aff = aff.copy()
    crop_aff[:3, 3] = aff[:3, :3] @ np.array([2, 3, 1]) + aff[:3, 3]
    save_volume(np.zeros((5, 4, 3), np.int16), crop_aff, tmp_path / "crop.nii.gz")
    vol = load_volume(tmp_path / "crop.nii.gz")
    np.testing.assert_array_equal(oracle.load_truth(p, "MSD_T10", "liver_3", vol), lab[2:7, 3:7, 1:4])
    assert oracle.load_centroids(p, "MSD_T10", "liver_3") == {20: (1.0, 2.0, 3.0)}


def test_truth_files_are_deterministic(tmp_path):
    a = oracle.write_truth(tmp_path / "a", "X", "k", _labels(), _affine(), {1: (0.0, 0.0, 0.0)})
    b = oracle.write_truth(tmp_path / "b", "X", "k", _labels(), _affine(), {1: (0.0, 0.0, 0.0)})
    assert a[0].read_bytes() == b[0].read_bytes()
    assert a[1].read_bytes() == b[1].read_bytes()


def test_errors_name_what_is_missing(tmp_path):
    p = SimpleNamespace(profile="ci", sources=tmp_path / "s", oracle=tmp_path / "o")
    with pytest.raises(oracle.OracleError, match="index.csv: no oracle index"):
        oracle.read_index(p)
    p = _oracle_tree(tmp_path)
    with pytest.raises(oracle.OracleError, match="source_key='liver_9'"):
        oracle.load_centroids(p, "MSD_T10", "liver_9")
    with pytest.raises(oracle.OracleError, match="phi_planted.json"):
        oracle.read_phi_planted(p)
    df = oracle.read_index(p)
    assert list(df.columns) == list(oracle.INDEX_COLUMNS)
    assert df.loc[0, "source_key"] == "liver_3"


def test_variant_coverage_counts_patients_per_split():
    idx = pd.DataFrame([
        dict(source="COLONOG", patient_id="p1", source_key="a", quality="ok", variant="L6"),
        dict(source="COLONOG", patient_id="p1", source_key="b", quality="ok", variant="L6"),
        dict(source="MSD_T10", patient_id="liver_1", source_key="liver_1", quality="ok", variant="L5_missing"),
        dict(source="VerSe", patient_id="s1", source_key="s1_ct", quality="ok", variant="L4+T13"),
        dict(source="COLONOG", patient_id="p9", source_key="z", quality="low", variant="L6"),
    ])
    split_of = {("COLONOG", "p1"): "test_public", "liver_1": "test_public", "s1_ct": "trainset",
                ("COLONOG", "p9"): "test_public"}
    cov = oracle.variant_coverage(idx, split_of).set_index("split")
    assert cov.loc["test_public", "L6"] == 1
    assert cov.loc["test_public", "L5_missing"] == 1
    assert cov.loc["test_public", "patients"] == 2  # two series of one patient count once; low quality excluded
    assert cov.loc["trainset", "L5_missing"] == 1
