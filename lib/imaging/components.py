"""Connected components of label maps: the post-processing of predictions and the spine's bounding box.

Arrays are ``(x, y, z)`` uint8 label maps; spacing in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def postprocess_labels(labels: np.ndarray, spacing: Sequence[float], largest_component: bool = True,
                       min_component_mm3: float = 0.0, relabel_fragments: bool = True) -> np.ndarray:
    """Clean a label map (uint8, (x, y, z)).

    Args:
        labels: label values.
        spacing: voxel size (mm) for the volume threshold.
        largest_component: keep only the largest 26-connected component of each label.
        min_component_mm3: remove connected components of the spine (label > 0) smaller than this.
        relabel_fragments: a fragment cut off its label by ``largest_component`` but touching the
            spine takes the label of the nearest kept voxel (a piece of L3 called L4 becomes L3)
            instead of becoming background; the spine mask is then unchanged by this step.

    Returns:
        A cleaned copy (removed voxels become 0).
    """
    out = np.asarray(labels, dtype=np.uint8).copy()
    if not out.any():
        return out
    struct = np.ones((3, 3, 3), dtype=bool)
    if largest_component:
        dropped = np.zeros(out.shape, dtype=bool)
        objs = ndimage.find_objects(out)
        for v, sl in enumerate(objs, start=1):
            if sl is None:
                continue
            sub = out[sl]
            comp, n = ndimage.label(sub == v, structure=struct)
            if n > 1:
                sizes = np.bincount(comp.ravel())
                sizes[0] = 0
                keep = int(np.argmax(sizes))
                drop = (comp > 0) & (comp != keep)
                sub[drop] = 0
                dropped[sl] |= drop
        if relabel_fragments and dropped.any() and out.any():
            first, last = nonzero_extent(dropped | (out > 0))  # from projections: no coordinate arrays
            box = tuple(slice(max(int(a) - 1, 0), int(b) + 2) for a, b in zip(first, last, strict=True))
            sub, dsub = out[box], dropped[box]
            frag, nf = ndimage.label(dsub, structure=struct)
            touching = np.unique(frag[ndimage.binary_dilation(sub > 0, structure=struct) & (frag > 0)])
            dsub = np.isin(frag, touching[touching > 0])  # fragments attached to the kept spine
            if dsub.any():
                ind = ndimage.distance_transform_edt(sub == 0, return_distances=False, return_indices=True)
                sub[dsub] = sub[tuple(i[dsub] for i in ind)]
    if min_component_mm3 > 0:
        vox = float(np.prod(spacing))
        comp, n = ndimage.label(out > 0, structure=struct)
        if n > 0:
            sizes = np.bincount(comp.ravel()) * vox
            small = np.nonzero(sizes < min_component_mm3)[0]
            small = small[small > 0]
            if small.size:
                out[np.isin(comp, small)] = 0
    return out


def nonzero_extent(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last index (inclusive) of the non-zero voxels along each axis, from the axis
    projections (no coordinate arrays); None when every voxel is 0."""
    first, last = [], []
    for a in range(arr.ndim):
        hit = np.flatnonzero(np.any(arr != 0, axis=tuple(b for b in range(arr.ndim) if b != a)))
        if hit.size == 0:
            return None
        first.append(int(hit[0]))
        last.append(int(hit[-1]))
    return np.array(first), np.array(last)


def spine_bbox(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box ``(lo, hi)`` of the largest 26-connected component of ``fg`` and of every
    other component at least a tenth of its size (a spine split by a gap stays whole)."""
    comp, n = ndimage.label(fg, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return None
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    keep = np.nonzero(sizes >= 0.1 * sizes.max())[0]
    idx = np.nonzero(np.isin(comp, keep))
    return np.array([int(i.min()) for i in idx]), np.array([int(i.max()) + 1 for i in idx])
