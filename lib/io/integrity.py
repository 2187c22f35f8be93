"""Integrity checks of image / mask pairs before anything uses them (file and fault named)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.io.nifti import NiftiReadError, load_volume


@dataclass(frozen=True)
class Fault:
    """One integrity problem: the file and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class IntegrityError(ValueError):
    """Raised with one or more :class:`Fault` s."""

    def __init__(self, faults: Iterable[Fault]):
        self.faults = list(faults)
        super().__init__("; ".join(str(f) for f in self.faults))


def check_pair(image_path: str | Path, mask_path: str | Path | None = None,
               allowed_labels: Iterable[int] | None = None, affine_atol_mm: float = 1e-3,
               ) -> list[Fault]:
    """Check an image (and its mask) before anything uses them.

    Checks: both readable (gzip intact), 3D, finite spacing; image without NaN/inf; mask of
    an integer dtype (or float holding integers), same shape as the image, affine equal
    within ``affine_atol_mm``, label values within ``allowed_labels`` (0 always allowed).

    Returns:
        A list of faults, empty when the pair is usable. Each names its file.
    """
    faults: list[Fault] = []
    try:
        img = load_volume(image_path, canonical=False)
    except NiftiReadError as exc:
        return [Fault(str(image_path), str(exc).split(": ", 1)[-1])]
    if np.issubdtype(img.array.dtype, np.floating) and not np.isfinite(img.array).all():
        n = int((~np.isfinite(img.array)).sum())
        faults.append(Fault(str(image_path), f"{n} NaN/inf voxels"))
    if mask_path is None:
        return faults
    try:
        msk = load_volume(mask_path, canonical=False)
    except NiftiReadError as exc:
        return faults + [Fault(str(mask_path), str(exc).split(": ", 1)[-1])]
    m = msk.array
    if np.issubdtype(m.dtype, np.floating):
        if not np.isfinite(m).all():
            faults.append(Fault(str(mask_path), "mask contains NaN/inf"))
            return faults
        if not np.all(m == np.round(m)):
            faults.append(Fault(str(mask_path), f"mask has non-integer values (dtype {m.dtype})"))
            return faults
    elif not np.issubdtype(m.dtype, np.integer):
        faults.append(Fault(str(mask_path), f"mask dtype {m.dtype} is not integer"))
    if m.shape != img.array.shape:
        faults.append(Fault(str(mask_path), f"mask shape {m.shape} differs from image shape {img.array.shape} ({image_path})"))
    elif not np.allclose(msk.original_affine, img.original_affine, atol=affine_atol_mm):
        diff = float(np.abs(msk.original_affine - img.original_affine).max())
        faults.append(Fault(str(mask_path), f"mask affine differs from image affine by up to {diff:.4g} mm ({image_path})"))
    if allowed_labels is not None:
        present = np.unique(m).astype(np.int64)
        bad = sorted(set(present.tolist()) - set(int(v) for v in allowed_labels) - {0})
        if bad:
            faults.append(Fault(str(mask_path), f"unexpected label values {bad}"))
    return faults


def require_pair(image_path, mask_path=None, allowed_labels=None, affine_atol_mm: float = 1e-3) -> None:
    """Like :func:`check_pair` but raise :class:`IntegrityError` on any fault."""
    faults = check_pair(image_path, mask_path, allowed_labels, affine_atol_mm)
    if faults:
        raise IntegrityError(faults)

