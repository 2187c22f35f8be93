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
    return _label_centroids(mask, affine, labels, spacing_mm, lambda v, sub, origin, shape, voxel_mm: sub)


def _label_centroids(mask: np.ndarray, affine: np.ndarray | None, labels: Iterable[int] | None,
                     spacing_mm: Sequence[float] | None, part) -> dict[int, tuple[float, ...]]:
    """``{label: centroid in world mm}`` of ``part(label, box mask, box origin, mask shape,
    voxel size in mm)`` -- the voxels of each label's bounding box to average -- over the
    labels present (restricted to ``labels``)."""
    m = as_label_map(mask, "mask")
    sp = check_spacing(spacing_mm if spacing_mm is not None else [1.0] * m.ndim, m.ndim)
    aff = affine_for(sp, affine)
    voxel_mm = np.sqrt((aff[:-1, :-1] ** 2).sum(axis=0))
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
        origin = [fg[k][0] + sl[k].start for k in range(m.ndim)]
        voxels = part(v, sub, origin, m.shape, voxel_mm)
        out[v] = to_world(centroid_sums(voxels, origin) / np.count_nonzero(voxels), aff)
    return out


CENTROID_METHODS = ("body", "mass")
"""How centroids are taken from a mask: ``"body"`` = the vertebral-body centroid (VerSe's
convention, :func:`body_centroids_mm`), ``"mass"`` = the centre of mass of the whole label
(:func:`centroids_mm`)."""

BODY_OPENING_FRACTION = 0.6
"""Radius of the opening that separates the vertebral body, as a share of the vertebra's largest
inscribed sphere radius (:func:`body_centroids_mm`)."""

BODY_GRID_MM = 1.6
"""The opening of :func:`body_region` runs on blocks of ``floor(BODY_GRID_MM / spacing)`` voxels
per axis (majority vote), then the body found is intersected with the full-resolution mask: at
0.75 mm voxels this is 4x faster and as accurate (measured on the phantom)."""

_NO_BODY_LABELS = frozenset({1})
"""C1 (the atlas) has no vertebral body: its centroid is the centre of mass of its mask."""


def body_region(vert: np.ndarray, spacing: Sequence[float],
                fraction: float = BODY_OPENING_FRACTION) -> np.ndarray | None:
    """The vertebral body of one vertebra's binary mask (a boolean array like ``vert``), or None.

    Method: the body is the thickest part of a vertebra. With ``r_max`` the radius of the
    largest sphere inside the mask (the maximum of its Euclidean distance transform, in mm),
    a morphological opening with a ball of radius ``fraction * r_max`` removes the thin
    posterior elements (laminae, pedicles, processes: 3-10 mm thick against a 15-50 mm body)
    and keeps the body; the body is the connected component of the opening that holds the
    centre of that largest sphere. None when the opening is empty (a sliver of a vertebra at
    the border of the field of view).
    """
    sp = np.asarray(spacing, dtype=np.float64)
    pad = np.pad(vert, 1)
    inside = ndimage.distance_transform_edt(pad, sampling=sp)
    r = fraction * float(inside.max())
    core = inside > r  # erosion by a ball of radius r
    if not core.any():
        return None
    opened = (ndimage.distance_transform_edt(~core, sampling=sp) <= r) & pad
    comps, _ = ndimage.label(opened)
    seed = comps[np.unravel_index(int(np.argmax(inside)), inside.shape)]
    if seed == 0:
        return None
    body = comps == seed
    return body[tuple(slice(1, -1) for _ in range(vert.ndim))]


def body_region_coarse(vert: np.ndarray, spacing: Sequence[float], fraction: float = BODY_OPENING_FRACTION,
                       grid_mm: float = BODY_GRID_MM) -> np.ndarray | None:
    """:func:`body_region` on blocks of voxels up to ``grid_mm`` (majority vote per block),
    intersected with the full-resolution ``vert``; plain :func:`body_region` when the voxels are
    already that coarse."""
    sp = np.asarray(spacing, dtype=np.float64)
    f = np.maximum(1, np.floor(grid_mm / sp)).astype(int)
    if (f == 1).all():
        return body_region(vert, sp, fraction)
    padded = [int(np.ceil(n / k)) * k for n, k in zip(vert.shape, f, strict=True)]
    inner = tuple(slice(0, n) for n in vert.shape)
    blocks = np.zeros(padded, np.float32)
    blocks[inner] = vert
    shape6 = [x for n, k in zip(padded, f, strict=True) for x in (n // k, k)]
    coarse = blocks.reshape(shape6).mean(axis=tuple(range(1, 2 * vert.ndim, 2))) >= 0.5
    body = body_region(coarse, sp * f, fraction)
    if body is None:
        return None
    for axis, k in enumerate(f):
        body = body.repeat(int(k), axis=axis)
    return body[inner] & vert


BORDER_EXTENSION_MM = 15.0
"""A vertebra cut by the field of view is extended this far beyond the cut (its border slices
repeated) before the body is separated, so that a cut body still reads as the thickest part."""


def _body_in_view(sub: np.ndarray, origin: Sequence[int], shape: Sequence[int], spacing: np.ndarray,
                  fraction: float) -> np.ndarray | None:
    """:func:`body_region_coarse` of one label's box ``sub`` (at ``origin`` in a volume of
    ``shape``); faces on the volume border are extended by :data:`BORDER_EXTENSION_MM`."""
    ext = [int(np.ceil(BORDER_EXTENSION_MM / spacing[k])) for k in range(sub.ndim)]
    pad = [(ext[k] if origin[k] == 0 else 0, ext[k] if origin[k] + sub.shape[k] == shape[k] else 0)
           for k in range(sub.ndim)]
    if not any(lo or hi for lo, hi in pad):
        return body_region_coarse(sub, spacing, fraction)
    body = body_region_coarse(np.pad(sub, pad, mode="edge"), spacing, fraction)
    if body is None:
        return None
    return body[tuple(slice(lo, lo + n) for (lo, _), n in zip(pad, sub.shape, strict=True))] & sub


def body_centroids_mm(mask: np.ndarray, affine: np.ndarray | None = None,
                      labels: Iterable[int] | None = None,
                      spacing_mm: Sequence[float] | None = None,
                      fraction: float = BODY_OPENING_FRACTION) -> dict[int, tuple[float, ...]]:
    """VerSe-style centroids: the vertebral-body centroid of every label, in world mm.

    VerSe's ``_ctd.json`` centroids mark the centre of each vertebral body, not the centre of
    mass of the whole vertebra (which lies 9-15 mm further posterior, in the canal). This
    estimates them from a label map: per label, the body is separated from the posterior
    elements by :func:`body_region` (on voxels of up to :data:`BODY_GRID_MM`,
    :func:`body_region_coarse`; a vertebra cut by the field of view is first extended beyond
    the cut, :data:`BORDER_EXTENSION_MM`) and the centre of mass of its body voxels in view is
    mapped through the affine. C1,
    which has no body, and a label whose body cannot be separated (a sliver at the border of
    the field of view) keep the centre of mass of the whole label. Measured on the synthetic
    phantom against its true body centroids: see ``tests/metrics/test_body_centroids.py``.

    Args:
        mask: label map (integer or bool), axes ``(x, y, z)``.
        affine: 4x4 voxel -> world (mm) matrix of ``mask``; if None, ``diag(spacing_mm)``.
        labels: restrict to these values (default: all present, > 0).
        spacing_mm: used only when ``affine`` is None (default 1 mm).
        fraction: opening radius as a share of the largest inscribed sphere radius.

    Returns:
        ``{label: (x, y, z)}`` in mm for each present label.
    """
    def part(v, sub, origin, shape, voxel_mm):
        body = None if v in _NO_BODY_LABELS else _body_in_view(sub, origin, shape, voxel_mm, fraction)
        return sub if body is None or not body.any() else body

    return _label_centroids(mask, affine, labels, spacing_mm, part)
