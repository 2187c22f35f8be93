"""lib.io.dicom_read: series geometry from the DICOM tags in any slice order; every fault named.

Series are written by lib.io.dicom_write.write_dicom_series from arrays whose RAS affine is known.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from lib import io
from lib.io import dicom_read as dicom
from lib.io.dicom_write import write_dicom_series

TAGS = {"PatientID": "TEST0001", "Modality": "CT", "Manufacturer": "SYNTH"}


@pytest.fixture
def ct(rng):
    """A small CT-like volume (x, y, z) int16 HU: body ellipse with noise, a bone column."""
    nx, ny, nz = 36, 30, 14
    x, y = np.mgrid[:nx, :ny]
    body = (((x - nx / 2) / (nx * 0.4)) ** 2 + ((y - ny / 2) / (ny * 0.4)) ** 2) < 1
    vol = np.where(body[..., None], 40, -1000) + rng.normal(0, 15, (nx, ny, nz))
    vol[nx // 2 - 2: nx // 2 + 2, ny // 2 + 3: ny // 2 + 7, :] = 900
    return np.rint(vol).astype(np.int16)


def _oblique(deg: float, spacing=(0.8, 0.7, 1.25), origin=(12.0, -30.0, 55.0)) -> np.ndarray:
    t = np.deg2rad(deg)
    rot_x = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    rot_z = np.array([[np.cos(t / 2), -np.sin(t / 2), 0], [np.sin(t / 2), np.cos(t / 2), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot_z @ rot_x @ np.diag(spacing)
    a[:3, 3] = origin
    return a


AXIAL = np.array([[0.78, 0, 0, -150.0], [0, 0.78, 0, -120.0], [0, 0, 1.25, -300.0], [0, 0, 0, 1]])


SAGITTAL = np.array([[0, 0, 1.5, -60.0], [0.9, 0, 0, -100.0], [0, 0.9, 0, -120.0], [0, 0, 0, 1]])


def _check_against_tags(vol: dicom.DicomVolume, atol: float = 1e-3) -> None:
    """Every slice file's ImagePositionPatient / ImageOrientationPatient / PixelSpacing, turned
    into RAS, must equal what the converted affine says about that slice."""
    for k, f in enumerate(vol.files):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient]) * [-1, -1, 1]
        np.testing.assert_allclose((vol.affine @ [0, 0, k, 1])[:3], ipp, atol=atol)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ps = [float(v) for v in ds.PixelSpacing]
        np.testing.assert_allclose(vol.affine[:3, 0], iop[:3] * [-1, -1, 1] * ps[1], atol=atol)
        np.testing.assert_allclose(vol.affine[:3, 1], iop[3:] * [-1, -1, 1] * ps[0], atol=atol)


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_axial_affine_matches_dicom_geometry_in_every_slice_order(tmp_path, ct, order):
    files = write_dicom_series(ct, AXIAL, tmp_path / order, TAGS, slice_order=order)
    out = dicom.convert_series(files, tmp_path / f"{order}.nii.gz")
    vol = dicom.read_series(files)
    _check_against_tags(vol)
    assert np.abs(out.affine - AXIAL).max() < 1e-3
    back = io.load_volume(out.path, canonical=False)
    np.testing.assert_array_equal(back.array, ct)          # same voxels in the same order
    assert np.abs(back.affine - AXIAL).max() < 1e-3
    assert back.array.dtype == np.int16
    assert vol.geometry.z_source == "positions"


@pytest.mark.parametrize(("name", "affine"), [("oblique30", _oblique(30.0)), ("sagittal", SAGITTAL)])
def test_non_axial_affine_matches_dicom_geometry(tmp_path, ct, name, affine):
    files = write_dicom_series(ct, affine, tmp_path / name, TAGS, slice_order="shuffled")
    vol = dicom.read_series(files)
    _check_against_tags(vol)
    assert np.abs(vol.affine - affine).max() < 1e-3
    np.testing.assert_array_equal(vol.array, ct)


def test_slice_spacing_comes_from_positions_not_slice_thickness(tmp_path, ct):
    tags = dict(TAGS, SliceThickness="5")  # thick reconstruction on a 1.25 mm spacing
    files = write_dicom_series(ct, AXIAL, tmp_path / "s", tags)
    vol = dicom.read_series(files)
    assert vol.geometry.spacing[2] == pytest.approx(1.25, abs=1e-6)


def test_real_dicom_from_pydicom_test_data_converts(tmp_path):
    path = get_testdata_file("CT_small.dcm")
    out = dicom.convert_series([path], tmp_path / "ct_small.nii.gz")
    ds = pydicom.dcmread(path)
    img = sitk.ReadImage(path)  # an independent reader of the same file
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    np.testing.assert_allclose(out.affine, dicom.LPS_TO_RAS @ lps, atol=1e-3)
    back = io.load_volume(out.path, canonical=False)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(back.array[:, :, 0], np.rint(hu).astype(np.int16).T)
    assert back.shape == (int(ds.Columns), int(ds.Rows), 1)


def _faults(files) -> dict[str, dicom.SeriesFault]:
    with pytest.raises(dicom.SeriesError) as info:
        dicom.read_series(files, where="series-under-test")
    assert "series-under-test" in str(info.value)
    return {f.check: f for f in info.value.faults}


def test_missing_slice_is_a_fault_with_count_and_gap(tmp_path, ct):
    files = write_dicom_series(ct, AXIAL, tmp_path / "m", TAGS, drop_slices=[6], slice_order="shuffled")
    f = _faults(files)["missing_slices"]
    assert f.measured == 1
    assert "2.50 mm for a 1.250 mm spacing" in f.message


def test_mixed_series_uids_are_a_fault(tmp_path, ct):
    files = write_dicom_series(ct, AXIAL, tmp_path / "x", TAGS, series_uid="1.2.826.0.1.3680043.10.1.1")
    for p in files[::2]:
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1.2"
        ds.save_as(p)
    f = _faults(files)
    assert f["mixed_series"].measured == 2
    assert "1.2.826.0.1.3680043.10.1.2" in f["mixed_series"].message


def test_missing_pixel_spacing_is_a_fault(tmp_path, ct):
    files = write_dicom_series(ct, AXIAL, tmp_path / "p", TAGS)
    for p in files:
        ds = pydicom.dcmread(p)
        del ds.PixelSpacing
        ds.save_as(p)
    f = _faults(files)["missing_pixel_spacing"]
    assert f.measured == len(files)


def test_inconsistent_spacing_duplicates_tilt_and_modality(tmp_path, ct):
    files = write_dicom_series(ct, AXIAL, tmp_path / "j", TAGS)
    ds = pydicom.dcmread(files[5])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.4]  # 32 % jitter of a 1.25 mm step
    ds.save_as(files[5])
    assert "inconsistent_spacing" in _faults(files)

    files = write_dicom_series(ct, AXIAL, tmp_path / "d", TAGS)
    ds0 = pydicom.dcmread(files[0])
    ds = pydicom.dcmread(files[1])
    ds.ImagePositionPatient = ds0.ImagePositionPatient
    ds.save_as(files[1])
    assert "duplicate_positions" in _faults(files)

    tilted = AXIAL.copy()
    tilted[1, 2] = 1.25 * np.tan(np.deg2rad(12))  # slices step forward as they go up: gantry tilt
    files = write_dicom_series(ct, tilted, tmp_path / "t", TAGS)
    f = _faults(files)["gantry_tilt"]
    assert f.measured == pytest.approx(12.0, abs=0.05)
    ok = dicom.read_series(files, max_tilt_deg=15.0)   # allowed: the sheared affine is exact
    assert np.abs(ok.affine - tilted).max() < 1e-3

    files = write_dicom_series(ct, AXIAL, tmp_path / "mr", dict(TAGS, Modality="MR"))
    assert "modality" in _faults(files)


def test_hand_built_dataset_without_sources_module(tmp_path):
    """A minimal series built with pydicom alone (independent of lib.io.dicom_write)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    paths = []
    series = generate_uid()
    for k, z in enumerate([10.0, 7.5, 5.0]):  # descending positions, file order = instance order
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(str(tmp_path / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Modality, ds.SeriesInstanceUID = "CT", series
        ds.Rows, ds.Columns = 2, 3
        ds.PixelSpacing = [0.5, 0.6]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, 20.0, z]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
        pix = (np.arange(6, dtype=np.uint16).reshape(2, 3) + 100 * k) | 0xF000  # junk above BitsStored
        ds.PixelData = pix.tobytes()
        ds.save_as(tmp_path / f"{k}.dcm", enforce_file_format=True)
        paths.append(tmp_path / f"{k}.dcm")
    vol = dicom.read_series(paths)
    # ascending along the normal (+z LPS = +z RAS): slice 0 is the file at z = 5.0
    np.testing.assert_allclose(vol.affine[:3, 3], [10.0, -20.0, 5.0])
    np.testing.assert_allclose(np.diag(vol.affine)[:3], [-0.6, -0.5, 2.5])
    stored = np.arange(6).reshape(2, 3).T + 200  # file k=2 (z=5.0), high bits masked off
    np.testing.assert_array_equal(vol.array[:, :, 0], np.rint(stored * 0.5 - 1024).astype(np.int16))


def test_discover_series_groups_by_folder(tmp_path, ct):
    write_dicom_series(ct, AXIAL, tmp_path / "P1" / "study" / "s1", TAGS)
    write_dicom_series(ct[:, :, :5], AXIAL, tmp_path / "P1" / "study" / "s2", dict(TAGS, SeriesNumber=2))
    (tmp_path / "P1" / "notes.txt").write_text("not dicom")
    refs = dicom.discover_series(tmp_path)
    assert [len(r.files) for r in refs] == [ct.shape[2], 5]
    assert refs[0].summary["PatientID"] == "TEST0001"
    assert refs[0].series_uid
