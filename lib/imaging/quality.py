"""Image-quality measures for curation's exclusion criteria (HU volumes, axes (x, y, z), z = slices)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def measure_noise_hu(ct: np.ndarray, window: int = 5, max_slices: int = 12,
                     soft_tissue_hu: tuple[float, float] = (-50.0, 150.0)) -> float:
    """Image noise: the median local standard deviation (HU) in soft tissue.

    On up to ``max_slices`` evenly spaced axial slices, the SD in a ``window`` x ``window``
    neighbourhood is computed where the local mean lies in ``soft_tissue_hu`` (muscle, organs,
    fluid); the median over those voxels is robust to edges. NaN when no soft tissue is found.

    Args:
        ct: HU volume, axes (x, y, z) with z the slice axis.
    """
    nz = ct.shape[2]
    vals = []
    for k in np.unique(np.linspace(0, nz - 1, min(max_slices, nz)).astype(int)):
        s = np.asarray(ct[:, :, k], dtype=np.float32)
        m = ndimage.uniform_filter(s, window)
        m2 = ndimage.uniform_filter(s * s, window)
        sd = np.sqrt(np.maximum(m2 - m * m, 0.0))
        sel = (m > soft_tissue_hu[0]) & (m < soft_tissue_hu[1])
        if sel.any():
            vals.append(sd[sel])
    if not vals:
        return float("nan")
    return float(np.median(np.concatenate(vals)))


def measure_border_fraction(ct: np.ndarray, body_hu: float = -500.0) -> float:
    """Share of the in-plane image border (first/last row and column of every slice) inside the
    body (> ``body_hu``). Near 0 for a body inside the field of view; large when the FOV cuts
    the body (truncated reconstruction). Axes (x, y, z)."""
    b = np.concatenate([ct[0].ravel(), ct[-1].ravel(), ct[:, 0].ravel(), ct[:, -1].ravel()])
    return float((b > body_hu).mean()) if b.size else 0.0
