"""Thick slices: the two operations, named apart.

* :func:`thick_slice_volume` - what a thick-slice reconstruction gives: a **new, coarser z grid**
  whose slices are exact slab means of the thin-slice signal (the low-z sweep of 06).
* :func:`thick_slice_augment` - a training augmentation on the **same grid**: slabs averaged,
  one slice kept per slab, linearly interpolated back to the original slices (labels stay fine).

Arrays are ``(x, y, z)`` with z = axis 2 (craniocaudal); spacings in mm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lib.imaging.resampling import interp_axis


def thick_slice_volume(ct: np.ndarray, affine: np.ndarray, target_z_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample a CT along z (array axis 2) to ``target_z_mm`` by slab averaging.

    Each new slice is the exact mean of the original signal over a slab ``target_z_mm`` thick
    (partial slices weighted by their overlap), as a thick-slice reconstruction would be.
    A target finer than the native spacing cannot be made by averaging: the volume is then
    linearly interpolated (it gains no detail).

    Args:
        ct: (x, y, z) HU, RAS+ canonical order; z = axis 2.
        affine: its voxel -> world matrix.
        target_z_mm: new slice spacing = slab thickness (mm).

    Returns:
        (new CT as float32 rounded to int16, new affine). The slabs tile the original extent
        from its first slice's lower edge.
    """
    sz = float(np.linalg.norm(affine[:3, 2]))
    n = ct.shape[2]
    ratio = target_z_mm / sz
    n_new = max(1, int(np.floor(n / ratio + 1e-6)))
    if ratio <= 1.0 + 1e-6:
        pos = (np.arange(n_new) + 0.5) * ratio - 0.5
        out = ndimage.map_coordinates(ct.astype(np.float32), np.meshgrid(
            np.arange(ct.shape[0]), np.arange(ct.shape[1]), pos, indexing="ij"), order=1, mode="nearest")
    else:
        # cumulative integral of the piecewise-constant signal along z, in units of slices
        csum = np.concatenate([np.zeros(ct.shape[:2] + (1,), np.float64), np.cumsum(ct, axis=2, dtype=np.float64)], axis=2)

        def integral(t):  # integral from edge 0 to continuous position t (in slices)
            k = np.clip(np.floor(t).astype(int), 0, n - 1)
            frac = np.clip(t - k, 0.0, 1.0)
            return csum[..., k] + frac * (csum[..., k + 1] - csum[..., k])

        edges = np.arange(n_new + 1) * ratio
        out = np.stack([(integral(edges[i + 1]) - integral(edges[i])) / ratio for i in range(n_new)], axis=2)
    new_aff = affine.copy()
    new_aff[:3, 2] = affine[:3, 2] * ratio
    # centre of new slice 0 sits at continuous old index (ratio - 1) / 2
    new_aff[:3, 3] = affine[:3, 3] + affine[:3, 2] * (ratio - 1.0) / 2.0
    return np.rint(out).astype(np.int16), new_aff


def thick_slice_augment(img: np.ndarray, spacing_z: float, thickness_mm: float, phase: float) -> np.ndarray:
    """Thick-slice acquisition along z: average slabs of ``thickness_mm``, sample one slice per
    slab, interpolate back linearly to the original z grid (labels stay fine).

    Args:
        img: (x, y, z) float32 patch.
        spacing_z: z voxel size of ``img`` (mm).
        thickness_mm: simulated slice thickness = slice spacing (mm).
        phase: position of the first thick slice, in fine slices (0 <= phase < step).
    """
    step = thickness_mm / spacing_z
    if step < 1.5:
        return img
    box = max(int(round(step)), 1)
    smooth = ndimage.uniform_filter1d(img, size=box, axis=2, mode="nearest")
    n = img.shape[2]
    thick_pos = np.arange(phase, n, step)
    if thick_pos.size < 2:
        return smooth
    thick = interp_axis(smooth, 2, thick_pos)
    back = (np.arange(n, dtype=np.float64) - phase) / step
    return interp_axis(thick, 2, back)
