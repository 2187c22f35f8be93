"""Centroids of labels in world mm (the mean voxel index of each label mapped through the affine)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from lib.metrics.arrays import as_label_map, check_spacing, foreground_box


def centroid_sums(m_inner: np.ndarray, origin: Sequence[int]) -> np.ndarray:
    """Sum of global voxel indices of the set voxels of ``m_inner`` (one value per axis)."""
    sums = np.zeros(m_inner.ndim, dtype=np.float64)
    for k in range(m_inner.ndim):
        prof = np.count_nonzero(m_inner, axis=tuple(i for i in range(m_inner.ndim) if i != k))
        sums[k] = float(np.dot(prof, np.arange(origin[k], origin[k] + prof.size, dtype=np.float64)))
    return sums


def affine_for(spacing: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    if affine is None:
        a = np.eye(spacing.size + 1)
        a[:-1, :-1] = np.diag(spacing)
        return a
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (spacing.size + 1, spacing.size + 1):
        raise ValueError(f"affine of shape {a.shape} does not fit a {spacing.size}D array")
    return a


def to_world(index: np.ndarray, affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in affine[:-1, :-1] @ index + affine[:-1, -1])


def centroids_mm(mask: np.ndarray, affine: np.ndarray | None = None,
                 labels: Iterable[int] | None = None,
                 spacing_mm: Sequence[float] | None = None) -> dict[int, tuple[float, ...]]:
    """Centroid of every label of a label map, in world mm.

    Args:
        mask: label map (integer or bool), axes ``(x, y, z)``.
        affine: 4x4 voxel -> world (mm) matrix of ``mask``; if None, ``diag(spacing_mm)``.
        labels: restrict to these values (default: all present, > 0).
        spacing_mm: used only when ``affine`` is None (default 1 mm).

    Returns:
        ``{label: (x, y, z)}`` in mm for each present label, mean voxel index mapped through
        the affine.
    """
    m = as_label_map(mask, "mask")
    sp = check_spacing(spacing_mm if spacing_mm is not None else [1.0] * m.ndim, m.ndim)
    aff = affine_for(sp, affine)
    fg = foreground_box(m)
    if fg is None:
        return {}
    view = m[tuple(slice(lo, hi) for lo, hi in fg)]
    top = int(view.max())
    objs = ndimage.find_objects(view, max_label=top)
    want = None if labels is None else {int(v) for v in labels}
    out: dict[int, tuple[float, ...]] = {}
    for v in range(1, top + 1):
        sl = objs[v - 1]
        if sl is None or (want is not None and v not in want):
            continue
        sub = view[sl] == v
        n = np.count_nonzero(sub)
        origin = [fg[k][0] + sl[k].start for k in range(m.ndim)]
        out[v] = to_world(centroid_sums(sub, origin) / n, aff)
    return out
