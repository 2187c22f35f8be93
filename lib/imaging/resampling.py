"""Resampling of arrays between grids: the one nearest-neighbour label resampler and friends.

Label maps are never interpolated by value: they go through :func:`resample_nearest` (by world
coordinates) or :func:`resample_labels_to` (exact copy when the grids coincide up to an axis
permutation). Arrays are ``(x, y, z)``; affines are 4x4 voxel -> world (mm).
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations

def resample_nearest(array: np.ndarray, src_affine: np.ndarray, dst_shape: tuple[int, int, int],
                     dst_affine: np.ndarray, fill: int | float = 0, chunk_slices: int = 16) -> np.ndarray:
    """Nearest-neighbour resampling by world coordinates (for label maps: never interpolates).

    Every voxel of the destination grid takes the value of the source voxel whose centre is
    nearest to it; destination voxels outside the source get ``fill``. Processed in slabs of
    ``chunk_slices`` along the destination's last axis so memory stays bounded.

    Args:
        array: source data (x, y, z) with voxel->world matrix ``src_affine``.
        dst_shape, dst_affine: the destination grid.
    """
    src_affine = np.asarray(src_affine, dtype=np.float64)
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    vox = np.linalg.solve(src_affine, dst_affine)  # dst voxel -> src voxel
    if np.allclose(vox, np.eye(4), atol=1e-6) and tuple(dst_shape) == array.shape:
        return array.copy()
    out = np.full(dst_shape, fill, dtype=array.dtype)
    ii, jj = np.meshgrid(np.arange(dst_shape[0]), np.arange(dst_shape[1]), indexing="ij")
    for k0 in range(0, dst_shape[2], chunk_slices):
        k1 = min(dst_shape[2], k0 + chunk_slices)
        kk = np.arange(k0, k1)
        src = [np.rint(vox[a, 0] * ii[..., None] + vox[a, 1] * jj[..., None] + vox[a, 2] * kk[None, None, :]
                       + vox[a, 3]).astype(np.int64) for a in range(3)]
        ok = np.ones(src[0].shape, bool)
        for a in range(3):
            ok &= (src[a] >= 0) & (src[a] < array.shape[a])
        slab = out[:, :, k0:k1]
        slab[ok] = array[src[0][ok], src[1][ok], src[2][ok]]
    return out


def resample_labels_to(labels: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
                       target_affine: np.ndarray, atol_mm: float = 1e-3) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto another grid by world coordinates.

    Exact copy (with axis permutation/flip) when the grids coincide within ``atol_mm``.
    """
    labels = np.asarray(labels)
    A, B = np.asarray(affine, float), np.asarray(target_affine, float)
    # same grid up to permutation/flip?
    ornt_a = orientations.io_orientation(A)
    ornt_b = orientations.io_orientation(B)
    tr = orientations.ornt_transform(ornt_a, ornt_b)
    moved = orientations.apply_orientation(labels, tr)
    moved_aff = A @ orientations.inv_ornt_aff(tr, labels.shape)
    if moved.shape == tuple(shape) and np.allclose(moved_aff, B, atol=atol_mm):
        return np.ascontiguousarray(moved, dtype=np.uint8)
    # general case: nearest truth voxel of each target voxel centre
    return resample_nearest(labels.astype(np.uint8, copy=False), A, tuple(shape), B)
