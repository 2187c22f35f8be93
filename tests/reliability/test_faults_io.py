"""Fault corpus, io layer: the one integrity check every stage calls names the file and the fault."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from lib.core import labels as L
from lib.io import IntegrityError, check_pair
from lib.io.integrity import verify_case
from tests.reliability import data
from tests.reliability.corpus import Fault, faults


def _one(tmp_path, mutate, *, labels=L.CTSPINE1K_LABELS, nonempty=True, on="mask"):
    img, msk = data.pair(tmp_path)
    mutate(img if on == "image" else msk)
    return check_pair(img, msk, allowed_labels=labels, require_nonempty=nonempty), img, msk


def _expect(kind, mutate, on="mask", **kw):
    def check(run):
        tmp_path, told = run.tmp, run.told
        found, img, msk = _one(tmp_path, mutate, on=on, **kw)
        target = img if on == "image" else msk
        assert [f.kind for f in found][:1] == [kind], found
        assert target.name in str(found[0])
        with pytest.raises(IntegrityError, match=target.name):
            verify_case(img, msk, allowed_labels=kw.get("labels", L.CTSPINE1K_LABELS),
                        require_nonempty=kw.get("nonempty", True))
        told(f"{kind}: {str(found[0]).replace(str(tmp_path) + '/', '')[:90]}")
    return check


def _not_nifti(p):
    p.write_bytes(gzip.compress(b"not a nifti file at all" * 20))


def _missing(p):
    p.unlink()


def _four_d(p):
    a = np.asarray(nib.load(str(p)).dataobj)
    data.write(p, np.stack([a, a], axis=-1))


def _zero_pixdim(p):
    """pixdim z = 0 and no sform/qform (old exports): the voxel size of the file is zero."""
    out = nib.Nifti1Image(np.asarray(nib.load(str(p)).dataobj), None)
    out.header.set_zooms((2.0, 2.0, 0.0))
    nib.save(out, str(p))


def _inf_voxel(p):
    a = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
    a[3, 3, 3] = np.inf
    data.write(p, a, dtype=np.float32)


def _other_shape(p):
    a = np.asarray(nib.load(str(p)).dataobj)
    data.write(p, a[:, :, :-2])


def _negative(p):
    data.set_label(p, 22, -1, dtype=np.int16)


def _empty(p):
    data.write(p, np.zeros(nib.load(str(p)).shape, np.uint8))


def _nan_mask(p):
    data.set_label(p, 22, np.nan)


FAULTS = faults(
    Fault("io-01", "io", "image: truncated gzip", _expect("unreadable", data.truncate, on="image")),
    Fault("io-02", "io", "image: not a NIfTI (gzip of text)", _expect("unreadable", _not_nifti, on="image")),
    Fault("io-03", "io", "mask: file missing", _expect("unreadable", _missing)),
    Fault("io-04", "io", "image: 4D", _expect("not_3d", _four_d, on="image")),
    Fault("io-05", "io", "image: zero voxel size (singular affine)", _expect("bad_spacing", _zero_pixdim, on="image")),
    Fault("io-06", "io", "image: a NaN slab", _expect("non_finite", data.nan_slab, on="image")),
    Fault("io-07", "io", "image: an inf voxel", _expect("non_finite", _inf_voxel, on="image")),
    Fault("io-08", "io", "mask: affine shifted by 1 mm", _expect("affine", data.shifted_affine)),
    Fault("io-09", "io", "mask: other shape", _expect("shape", _other_shape)),
    Fault("io-10", "io", "mask: float label 3.5", _expect("not_integer", lambda p: data.set_label(p, 22, 3.5))),
    Fault("io-11", "io", "mask: label 99 (not in the label table)", _expect("unknown_label", lambda p: data.set_label(p, 22, 99))),
    Fault("io-12", "io", "mask: negative label", _expect("negative_label", _negative)),
    Fault("io-13", "io", "truth mask: empty", _expect("empty", _empty)),
    Fault("io-14", "io", "mask: NaN in a float mask", _expect("non_finite", _nan_mask)),
)


@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_fault(fault, run):
    fault.check(run)


def test_real_download_quirks_are_not_faults(tmp_path):
    """float64 masks holding integers (VerSe, TCIA NIfTI exports) and T13 where allowed pass."""
    img, msk = data.pair(tmp_path)
    data.set_label(msk, 22, 28)  # float64 file, T13
    assert check_pair(img, msk, allowed_labels=L.VERSE_LABELS, require_nonempty=True) == []
    assert [f.kind for f in check_pair(img, msk, allowed_labels=L.CTSPINE1K_LABELS)] == ["unknown_label"]
