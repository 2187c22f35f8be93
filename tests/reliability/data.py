"""Tiny ci-sized files for the fault corpus: a CT and its mask on one 2 mm grid, then a fault."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from tests.helpers.spines import AFFINE, spine_mask

LABELS = [24, 23, 22]


def ct_of(mask: np.ndarray) -> np.ndarray:
    return np.where(mask > 0, 500, -50).astype(np.int16)


def write(path: Path, data: np.ndarray, affine=AFFINE, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data) if dtype is None else np.asarray(data, dtype=dtype), affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def pair(folder: Path, cid: str = "liver_1", labels=LABELS) -> tuple[Path, Path]:
    """``folder/<cid>.nii.gz`` (int16 CT) and ``folder/<cid>_seg.nii.gz`` (uint8 mask)."""
    m = spine_mask(list(labels))
    return write(folder / f"{cid}.nii.gz", ct_of(m)), write(folder / f"{cid}_seg.nii.gz", m)


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(40, len(data) // 3)])
    return path


def nan_slab(path: Path) -> Path:
    """Rewrite an image as float32 with one NaN slice."""
    a = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    a[:, :, a.shape[2] // 2] = np.nan
    return write(path, a, nib.load(str(path)).affine, dtype=np.float32)


def shifted_affine(path: Path, mm: float = 1.0) -> Path:
    img = nib.load(str(path))
    aff = img.affine.copy()
    aff[0, 3] += mm
    return write(path, np.asarray(img.dataobj), aff, dtype=img.get_data_dtype())


def set_label(path: Path, old: int, new: float, dtype=None) -> Path:
    img = nib.load(str(path))
    a = np.asarray(img.dataobj).astype(np.float64 if dtype is None else dtype)
    a[a == old] = new
    return write(path, a, img.affine, dtype=dtype or np.float64)


def perfect_prediction(mask: Path, out: Path) -> Path:
    img = nib.load(str(mask))
    return write(out, np.asarray(img.dataobj), img.affine, dtype=np.uint8)
