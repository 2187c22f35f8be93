"""Resampling of arrays between grids: the one nearest-neighbour label resampler and friends.

Label maps are never interpolated by value: they go through :func:`resample_nearest` (by world
coordinates) or :func:`resample_labels_to` (exact copy when the grids coincide up to an axis
permutation). Arrays are ``(x, y, z)``; affines are 4x4 voxel -> world (mm).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel import orientations


def reorient_array(array: np.ndarray, affine: np.ndarray, axcodes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip an array (and its affine) so its voxel axes point along ``axcodes``."""
    ornt_from = orientations.io_orientation(affine)
    ornt_to = orientations.axcodes2ornt(tuple(axcodes))
    tr = orientations.ornt_transform(ornt_from, ornt_to)
    out = orientations.apply_orientation(array, tr)
    return np.ascontiguousarray(out), np.asarray(affine, float) @ orientations.inv_ornt_aff(tr, array.shape)


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
    src_aff, dst_aff = np.asarray(affine, float), np.asarray(target_affine, float)
    # same grid up to permutation/flip?
    ornt_a = orientations.io_orientation(src_aff)
    ornt_b = orientations.io_orientation(dst_aff)
    tr = orientations.ornt_transform(ornt_a, ornt_b)
    moved = orientations.apply_orientation(labels, tr)
    moved_aff = src_aff @ orientations.inv_ornt_aff(tr, labels.shape)
    if moved.shape == tuple(shape) and np.allclose(moved_aff, dst_aff, atol=atol_mm):
        return np.ascontiguousarray(moved, dtype=np.uint8)
    # general case: nearest truth voxel of each target voxel centre
    return resample_nearest(labels.astype(np.uint8, copy=False), src_aff, tuple(shape), dst_aff)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Voxel counts after resampling a grid to ``new_spacing`` with the same physical extent."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing, strict=True))


def source_coords(n_old: int, n_new: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Source voxel coordinates of new-grid voxels ``start..stop`` (voxel edges aligned).

    The two grids cover the same extent: voxel ``j`` of the new grid is centred at
    ``(j + 0.5) * n_old / n_new - 0.5`` of the old one (``align_corners=False``).
    """
    stop = n_new if stop is None else stop
    return (np.arange(start, stop, dtype=np.float64) + 0.5) * (n_old / n_new) - 0.5


def interp_axis(arr: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at fractional ``coords`` (edge clamped)."""
    n = arr.shape[axis]
    c = np.clip(coords, 0, n - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = (c - lo).astype(np.float32)
    shape = [1] * arr.ndim
    shape[axis] = len(c)
    w = w.reshape(shape)
    a = np.take(arr, lo, axis=axis).astype(np.float32, copy=False)
    b = np.take(arr, hi, axis=axis).astype(np.float32, copy=False)
    return a * (1 - w) + b * w


RESAMPLE_SLAB_VOXELS = 1 << 23
"""Output voxels per slab of :func:`resample_image` (bounds its temporaries)."""


def resample_image(arr: np.ndarray, new_shape: Sequence[int], slab_voxels: int = RESAMPLE_SLAB_VOXELS,
                   transform=None) -> np.ndarray:
    """Trilinear resampling of a 3D image to ``new_shape`` (same extent), float32.

    Computed in slabs along the last axis (x, then y, then z interpolation of the source slices
    each output slab needs), so besides the result only about ``slab_voxels`` voxels of
    temporaries exist: the same values as interpolating the whole volume axis by axis.
    ``transform`` (elementwise, e.g. a CT normalisation) is applied to each source block first:
    the result equals ``resample_image(transform(arr), new_shape)`` without the whole transformed copy.
    """
    arr = np.asarray(arr)
    new_shape = tuple(int(n) for n in new_shape)
    tf = transform if transform is not None else (lambda a: a)
    if arr.shape == new_shape:
        return np.ascontiguousarray(tf(arr), dtype=np.float32)
    out = np.empty(new_shape, dtype=np.float32)
    nz = arr.shape[2]
    cz = np.clip(source_coords(nz, new_shape[2]), 0, nz - 1) if new_shape[2] != nz else None
    step = max(1, int(slab_voxels) // max(1, new_shape[0] * new_shape[1]))
    for j0 in range(0, new_shape[2], step):
        j1 = min(new_shape[2], j0 + step)
        if cz is None:
            block, zc = np.asarray(tf(arr[:, :, j0:j1]), dtype=np.float32), None
        else:
            lo = int(np.floor(cz[j0:j1].min()))
            hi = min(int(np.floor(cz[j0:j1].max())) + 1, nz - 1)
            block, zc = np.asarray(tf(arr[:, :, lo:hi + 1]), dtype=np.float32), cz[j0:j1] - lo  # exact shifts
        for axis in (0, 1):
            if block.shape[axis] != new_shape[axis]:
                block = interp_axis(block, axis, source_coords(arr.shape[axis], new_shape[axis]))
        if zc is not None:
            block = interp_axis(block, 2, zc)
        out[:, :, j0:j1] = block
    return out


def resample_labels(seg: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Resample a label map: each label linearly (within its bounding box), then argmax.

    Smoother than nearest neighbour when the grid changes a lot (nnU-Net does the same), and
    memory-bounded: one float32 volume of ``new_shape`` plus the running argmax.
    """
    seg = np.asarray(seg)
    new_shape = tuple(int(s) for s in new_shape)
    if seg.shape == new_shape:
        return seg.astype(np.uint8, copy=True)
    best = np.full(new_shape, 0.5, dtype=np.float32)  # a label needs > 0.5 to win over background
    out = np.zeros(new_shape, dtype=np.uint8)
    for v in np.unique(seg):
        if v == 0:
            continue
        idx = np.nonzero(seg == v)
        lo_src = [max(int(i.min()) - 1, 0) for i in idx]
        hi_src = [min(int(i.max()) + 2, n) for i, n in zip(idx, seg.shape, strict=True)]
        sl_new = []
        coords = []
        for a in range(3):
            c_all = source_coords(seg.shape[a], new_shape[a])
            inside = np.nonzero((c_all > lo_src[a] - 1) & (c_all < hi_src[a]))[0]
            if inside.size == 0:
                inside = np.array([int(np.clip(np.argmin(np.abs(c_all - idx[a].mean())), 0, new_shape[a] - 1))])
            sl_new.append(slice(int(inside[0]), int(inside[-1]) + 1))
            coords.append(c_all[inside[0]:inside[-1] + 1] - lo_src[a])
        block = (seg[lo_src[0]:hi_src[0], lo_src[1]:hi_src[1], lo_src[2]:hi_src[2]] == v).astype(np.float32)
        for a in range(3):
            block = interp_axis(block, a, coords[a])
        region = tuple(sl_new)
        win = block > best[region]
        best[region] = np.where(win, block, best[region])
        out[region] = np.where(win, np.uint8(v), out[region])
    return out
