"""lib.io.nifti: round trips keep geometry and voxels, errors name the file, deterministic headers without free text."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from lib import io
from tests.helpers.nifti_files import _write


def _lps_affine():
    aff = np.diag([-0.8, -0.8, 2.5, 1.0])  # L, P, S: i increases to the left, j to posterior
    aff[:3, 3] = [100.0, 120.0, -50.0]
    return aff


def _oblique_affine():
    aff = np.eye(4)
    rot = Rotation.from_euler("xyz", [12, -7, 25], degrees=True).as_matrix()
    # oblique and permuted: voxel axis 0 runs mostly along z
    aff[:3, :3] = (rot @ np.diag([0.7, 0.9, 3.0]))[:, [2, 0, 1]]
    aff[:3, 3] = [-30.0, 12.5, 80.0]
    return aff


@pytest.mark.parametrize("affine_fn", [_lps_affine, _oblique_affine])
def test_round_trip_keeps_affine_and_voxels(tmp_path, rng, affine_fn):
    data = rng.integers(-1024, 2000, size=(17, 23, 11)).astype(np.int16)
    aff = affine_fn()
    src = _write(tmp_path / "img.nii.gz", data, aff)
    vol = io.load_volume(src)
    # canonical: axes permuted/flipped to RAS, same voxel values as a multiset
    ornt = nib.orientations.io_orientation(vol.affine)
    assert np.array_equal(ornt, nib.orientations.axcodes2ornt(("R", "A", "S")))
    assert sorted(vol.shape) == sorted(data.shape)
    assert np.array_equal(np.sort(vol.array, axis=None), np.sort(data, axis=None))
    # the canonical array and affine describe the same world points as the file
    i, j, k = 3, 5, 7
    world = aff @ np.array([i, j, k, 1.0])
    vox = np.linalg.solve(vol.affine, world)[:3].round().astype(int)
    assert vol.array[tuple(vox)] == data[i, j, k]
    # processing in canonical space then saving back restores geometry exactly
    processed = vol.array + 1
    out = io.save_like(processed, vol, tmp_path / "out.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert np.array_equal(np.asarray(back.dataobj), data + 1)


def test_spacing_is_per_canonical_axis(tmp_path, rng):
    aff = np.diag([0.8, 0.8, 2.5, 1.0])[:, [2, 0, 1, 3]]  # file axis 0 is S
    data = rng.integers(0, 5, size=(4, 6, 8)).astype(np.uint8)
    vol = io.load_volume(_write(tmp_path / "m.nii.gz", data, aff))
    assert vol.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert vol.shape == (6, 8, 4)


def test_truncated_gzip_is_named(tmp_path, rng):
    data = rng.integers(0, 1000, size=(32, 32, 32)).astype(np.int16)
    good = _write(tmp_path / "good.nii.gz", data, np.eye(4))
    raw = good.read_bytes()
    bad = tmp_path / "case_007.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(io.NiftiReadError, match="case_007.nii.gz: truncated"):
        io.load_volume(bad)
    faults = io.check_pair(bad)
    assert len(faults) == 1
    assert faults[0].path == str(bad)
    assert "truncated" in faults[0].message


def test_missing_spacing_is_reported(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None)
    img.header.set_zooms((1.0, 1.0, 0.0))  # no sform/qform and a zero slice spacing
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    p = tmp_path / "flat.nii.gz"
    nib.save(img, str(p))
    with pytest.raises(io.NiftiReadError, match="flat.nii.gz: missing or invalid voxel spacing"):
        io.load_volume(p)


def test_save_volume_is_byte_deterministic(tmp_path, rng):
    arr = rng.integers(0, 25, size=(9, 8, 7)).astype(np.uint8)
    a = io.save_volume(arr, np.eye(4), tmp_path / "a" / "m.nii.gz")
    b = io.save_volume(arr, np.eye(4), tmp_path / "b" / "m.nii.gz")
    assert a.read_bytes() == b.read_bytes()
    assert np.array_equal(np.asarray(nib.load(str(a)).dataobj), arr)


def test_saved_header_carries_no_free_text(tmp_path):
    hdr = nib.Nifti1Header()
    hdr["descrip"] = b"Patient DOE^JOHN"
    out = io.save_volume(np.zeros((3, 3, 3), np.int16), np.eye(4), tmp_path / "x.nii.gz", header=hdr)
    raw = gzip.decompress(out.read_bytes())
    assert b"DOE^JOHN" not in raw
    assert nib.load(str(out)).header.get_data_dtype() == np.int16


def test_fast_gzip_reads_same_as_stdlib(tmp_path, rng):
    assert io.FAST_GZIP, "python-isal should be registered as nibabel's .gz opener"
    from nibabel.openers import ImageOpener

    assert "isal" in ImageOpener.compress_ext_map[".gz"][0].__code__.co_names or \
        ImageOpener.compress_ext_map[".gz"][0].__name__ == "_isal_open"
    data = rng.integers(-1000, 1000, size=(40, 41, 42)).astype(np.int16)
    plain = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(plain))
    gz = tmp_path / "x.nii.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))  # written by the standard library
    assert np.array_equal(io.load_volume(gz, canonical=False).array, data)


def test_strip_nifti_suffix_keeps_dotted_release_ids():
    assert io.strip_nifti_suffix("1.3.6.1.4.1.9328.50.4.0001.nii.gz") == "1.3.6.1.4.1.9328.50.4.0001"
    assert io.strip_nifti_suffix("1.3.6.1.4.1.9328.50.4.0001") == "1.3.6.1.4.1.9328.50.4.0001"
    assert io.strip_nifti_suffix("dir/HN_P001_seg.nii") == "HN_P001_seg"


@pytest.mark.parametrize(("sform", "qform"), [(2, 0), (1, 1), (0, 1), (4, 2)])
def test_save_like_keeps_the_input_xform_codes(tmp_path, rng, sform, qform):
    """A prediction is written with its input's sform / qform codes (a scanner's sform 2 /
    qform 0 file is not turned into 1 / 1), in the input's orientation and affine."""
    aff = np.array([[0.0, 0.0, -1.5, 90.0], [-0.8, 0.0, 0.0, 120.0], [0.0, -0.8, 0.0, 60.0], [0, 0, 0, 1]])  # PIR
    img = nib.Nifti1Image(rng.integers(-1000, 1000, (6, 5, 4)).astype(np.int16), aff)
    img.set_sform(aff, code=sform)
    img.set_qform(aff, code=qform)
    src = tmp_path / "ct.nii.gz"
    nib.save(img, str(src))
    ref = io.load_volume(src)
    out = io.save_like(np.ones(ref.shape, np.uint8), ref, tmp_path / "pred.nii.gz", dtype=np.uint8)
    back = nib.load(str(out))
    assert (int(back.header["sform_code"]), int(back.header["qform_code"])) == (sform, qform)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert back.shape == (6, 5, 4)
