"""lib.io.dicom_write: series geometry and tags read back by SimpleITK and pydicom; atomic writes."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from lib.io import dicom_write
from tests.helpers.synthetic_sources import _sitk_read


def _oblique_affine() -> np.ndarray:
    th = 0.3
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([0.7, 0.8, 1.5])
    a[:3, 3] = (10.0, -20.0, 30.0)
    return a


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("kind", ["axial", "oblique", "prone"])
def test_dicom_series_geometry_round_trips_through_simpleitk(tmp_path, order, kind):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 2500, (20, 16, 9)).astype(np.int16)
    if kind == "axial":
        aff = np.diag([0.75, 0.75, 0.8, 1.0])
        aff[:3, 3] = (-190.0, -170.0, -400.0)
    elif kind == "oblique":
        aff = _oblique_affine()
    else:  # prone: rows run R->L reversed (IOP -1,0,0,0,-1,0 in LPS) = RAS-increasing axes
        aff = np.diag([-0.8, -0.8, 2.0, 1.0]) @ np.diag([-1.0, -1.0, 1.0, 1.0])
    files = dicom_write.write_dicom_series(ct, aff, tmp_path / "s", {"PatientName": "A^B", "PatientID": "P1"},
                                       slice_order=order)
    assert len(files) == 9
    arr, got = _sitk_read(tmp_path / "s")
    np.testing.assert_array_equal(arr, ct)
    np.testing.assert_allclose(got, aff, atol=1e-3)


def test_dicom_tags_and_positions_read_back_with_pydicom(tmp_path):
    ct = np.full((12, 10, 5), 40, np.int16)
    ct[0, 0, :] = -1024
    aff = np.diag([-0.75, -0.75, 2.0, 1.0])  # what a supine HFS scanner writes: IOP 1,0,0,0,1,0
    aff[:3, 3] = (200.0, 180.0, -300.0)
    tags = {"PatientName": "DOE^JANE", "PatientID": "X7", "PatientBirthDate": "19500101", "InstitutionName": "H",
            "AccessionNumber": "A1", "StudyDate": "20070101", "KVP": "120", "SliceThickness": "2.5"}
    files = dicom_write.write_dicom_series(ct, aff, tmp_path / "s", tags, slice_order="descending", drop_slices=(2,))
    assert len(files) == 4
    dss = [pydicom.dcmread(f) for f in files]
    ds = dss[0]
    assert ds.SOPClassUID == dicom_write.CT_IMAGE_STORAGE
    assert ds.Modality == "CT"
    assert str(ds.PatientName) == "DOE^JANE"
    assert ds.PatientBirthDate == "19500101"
    assert ds.KVP == "120"
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.75, 0.75])
    assert float(ds.SliceThickness) == 2.5  # tags may state a thickness other than the spacing
    # descending: instance 1 is the most superior slice; the dropped slice leaves a 4 mm gap
    by_inst = sorted(dss, key=lambda d: int(d.InstanceNumber))
    z = [float(d.ImagePositionPatient[2]) for d in by_inst]
    assert z == sorted(z, reverse=True)
    assert sorted(np.round(np.diff(sorted(z)), 3).tolist()) == [2.0, 2.0, 4.0]
    # HU through RescaleSlope/Intercept; LPS position of voxel (0, 0, 0)
    hu = by_inst[-1].pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu[0, 0] == -1024
    assert hu[5, 5] == 40
    np.testing.assert_allclose([float(v) for v in by_inst[-1].ImagePositionPatient], [-200.0, -180.0, -300.0])
    # geometry keywords come from the affine only
    with pytest.raises(ValueError, match="PixelSpacing"):
        dicom_write.write_dicom_series(ct, aff, tmp_path / "t", {"PixelSpacing": [1, 1]})


def test_dicom_series_write_is_atomic_and_cleans_up_after_a_killed_run(tmp_path):
    ct = np.zeros((6, 5, 4), np.int16)
    stale = tmp_path / ".s.abc123"
    stale.mkdir()
    (stale / "1-001.dcm").write_bytes(b"half")
    first = dicom_write.write_dicom_series(ct, np.eye(4), tmp_path / "s", {"PatientName": "X"})
    again = dicom_write.write_dicom_series(ct[:, :, :2], np.eye(4), tmp_path / "s", {"PatientName": "X"})
    assert len(first) == 4
    assert len(again) == 2
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [p.name for p in again]  # replaced, no leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # stale and temporary folders gone


def test_dicom_files_are_what_pydicom_itself_writes(tmp_path):
    ct = np.arange(6 * 5 * 3, dtype=np.int16).reshape(6, 5, 3)
    files = dicom_write.write_dicom_series(ct, np.eye(4), tmp_path / "s", {"PatientName": "X"})
    ds = pydicom.dcmread(files[1])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert buf.getvalue() == files[1].read_bytes()
