"""Fixtures shared by the tests of this folder."""

from __future__ import annotations

import nibabel as nib
import pydicom
import pytest

from lib.core import paths
from lib.io.dicom_write import write_dicom_series
from tests.helpers.curation_sources import AFF, _ct, _ident, _series


@pytest.fixture
def sources(tmp_path):
    """A small source tree: COLONOG (two positions for some patients; one series per patient
    for the three faulty ones), HNSCC with three time points, MSD and COVID NIfTI volumes."""
    root = paths.for_profile("ci").sources
    st = "05-17-2003-Abdomen-COLONOGRAPHY-12345"
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0001", st, "2.000000-Supine-111", "TKA1B2", 1, "HFS")
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0001", st, "3.000000-Prone-112", "TKA1B2", 1, "HFP", number=3)
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0002", st, "2.000000-Supine-211", "TKC3D4", 2, "HFS")
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0002", st, "3.000000-Prone-212", "TKC3D4", 2, "HFP", number=3)
    # faulty series, one per patient: missing slice / mixed UIDs / no PixelSpacing
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0003", st, "2.000000-Supine-311", "TKE5F6", 3, drop_slices=[20])
    files = _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0004", st, "2.000000-Supine-411", "TKG7H8", 4,
                    series_uid="1.2.826.0.1.3680043.10.77.1")
    for p in files[::3]:
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.77.2"
        ds.save_as(p)
    files = _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0005", st, "2.000000-Supine-511", "TKJ9K2", 5)
    for p in files:
        ds = pydicom.dcmread(p)
        del ds.PixelSpacing
        ds.save_as(p)
    # a noisy patient: both positions fail the noise criterion
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0006", st, "2.000000-Supine-611", "TKL3M4", 6, noise=200.0)
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0006", st, "3.000000-Prone-612", "TKL3M4", 6, "HFP", noise=200.0,
            number=3)
    for tp, date in enumerate(["20040102", "20040401", "20040702"]):
        tags_i = 7
        token = "TKN5P6"
        tags = dict(_ident(tags_i, token), PatientID="HN_P001", StudyDate=date, PatientPosition="HFS", SeriesNumber=2)
        # time points written out of date order on disk
        folder = root / "HNSCC" / "HN_P001" / f"{date[4:6]}-{date[6:]}-{date[:4]}-NECK-{9 - tp}" / "2.000000-NECK-1"
        write_dicom_series(_ct(10 + tp), AFF, folder, tags, study_uid=f"1.2.826.0.1.3680043.10.88.{tp}")
    for stem, seed, descrip in [("liver_3", 20, "scan TKQ7R8"), ("liver_11", 21, "")]:
        img = nib.Nifti1Image(_ct(seed), AFF)
        img.header["descrip"] = descrip.encode()
        (root / "MSD_T10" / "imagesTr").mkdir(parents=True, exist_ok=True)
        nib.save(img, str(root / "MSD_T10" / "imagesTr" / f"{stem}.nii.gz"))
    (root / "COVID19").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_ct(30), AFF), str(root / "COVID19" / "volume-covid19-A-0014.nii.gz"))
    return root

