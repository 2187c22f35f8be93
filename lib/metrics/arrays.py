"""Label-map validation and the bounding-box kernels shared by the metric families.

Everything works in the joint bounding box of truth and prediction (plus a one-voxel ring of
real neighbours), so no full-volume boolean copy or one-hot of all labels is ever built.
Arrays are label maps of any integer (or bool) dtype, axes ``(x, y, z)``; spacing in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_spacing(spacing_mm: Sequence[float], ndim: int) -> np.ndarray:
    sp = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if sp.size != ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} has {sp.size} values for a {ndim}D array")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing {tuple(spacing_mm)} must be finite and positive (mm)")
    return sp


def as_label_map(arr: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype == bool:
        return a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what}: label map must have an integer or bool dtype, got {a.dtype} "
                        "(cast float masks holding integers first, e.g. with lib.evaluation's loader)")
    if np.issubdtype(a.dtype, np.signedinteger) and a.size and a.min() < 0:
        raise ValueError(f"{what}: negative label values (min {int(a.min())})")
    return a


def foreground_box(a: np.ndarray) -> list[tuple[int, int]] | None:
    """Index ranges ``[(lo, hi), ...]`` of the nonzero voxels; ``None`` when all zero.

    Two cheap reductions (the last axis, then the others), never a boolean copy of ``a``.
    """
    if a.ndim == 1:
        nz = np.flatnonzero(a)
        return None if nz.size == 0 else [(int(nz[0]), int(nz[-1]) + 1)]
    head = a.max(axis=-1)  # projection over the last axis: small
    first = foreground_box(head)
    if first is None:
        return None
    sub = a[tuple(slice(lo, hi) for lo, hi in first)]
    last = np.flatnonzero(sub.max(axis=tuple(range(a.ndim - 1))))
    return first + [(int(last[0]), int(last[-1]) + 1)]


def union_box(*boxes: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return [(min(b[k][0] for b in boxes), max(b[k][1] for b in boxes)) for k in range(len(boxes[0]))]


def slices_to_box(sl: tuple[slice, ...] | None) -> list[tuple[int, int]] | None:
    return None if sl is None else [(s.start, s.stop) for s in sl]


def padded_window(a: np.ndarray, box: list[tuple[int, int]]) -> np.ndarray:
    """``a[box]`` with a one-voxel ring of its real neighbours around it (zeros beyond ``a``)."""
    out = np.zeros(tuple(hi - lo + 2 for lo, hi in box), dtype=a.dtype)
    src, dst = [], []
    for (lo, hi), n in zip(box, a.shape, strict=True):
        s0, s1 = max(lo - 1, 0), min(hi + 1, n)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - (lo - 1), s1 - (lo - 1)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def neighbours(m: np.ndarray):
    """Views of the 2·ndim face neighbours of the interior of a padded array."""
    inner = [slice(1, -1)] * m.ndim
    for k in range(m.ndim):
        for sl in (slice(None, -2), slice(2, None)):
            idx = list(inner)
            idx[k] = sl
            yield m[tuple(idx)]


def interior(m: np.ndarray) -> np.ndarray:
    return m[(slice(1, -1),) * m.ndim]


def surface_of_padded(m: np.ndarray) -> np.ndarray:
    """Surface voxels (interior shape) of a padded bool mask whose ring holds real neighbours."""
    nb = neighbours(m)
    eroded = next(nb) & next(nb)
    for view in nb:
        eroded &= view
    inner = interior(m)
    eroded &= inner
    return inner ^ eroded


def touching(m: np.ndarray) -> np.ndarray:
    """Interior voxels with at least one face neighbour set in the padded bool ``m``."""
    nb = neighbours(m)
    out = next(nb) | next(nb)
    for view in nb:
        out |= view
    return out
