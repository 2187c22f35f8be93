"""Preprocessing shared by training and inference: CT normalisation, mask -> class targets.

CT is clipped to the plan's foreground 0.5/99.5 percentiles and z-scored with the foreground mean/std
(nnU-Net's CT scheme); masks map to class indices of a stage's task (``labels``, ``levels`` with the
ordinal encoding of :func:`encode_levels`, ``foreground``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from lib.ml.plans import Plan


class NonFiniteImageError(ValueError):
    """A CT holds NaN or infinite voxels (which clipping would pass on or turn into numbers)."""


def require_finite(image: np.ndarray, path: str | Path = "<CT>") -> None:
    """Raise :class:`NonFiniteImageError` naming ``path`` and the count if ``image`` has NaN/inf voxels."""
    a = np.asarray(image)
    if not np.issubdtype(a.dtype, np.floating):
        return
    finite = np.isfinite(a)
    if not finite.all():
        n_nan = int(np.isnan(a).sum())
        n_bad = int(finite.size - np.count_nonzero(finite))
        raise NonFiniteImageError(f"{path}: {n_bad} of {a.size} voxels are not finite ({n_nan} NaN, "
                                  f"{n_bad - n_nan} inf)")


def normalize_ct(hu: np.ndarray, normalization: dict[str, Any], path: str | Path = "<CT>") -> np.ndarray:
    """Clip HU to ``clip_hu`` and z-score with the plan's foreground ``mean``/``std`` (float32).

    Raises:
        NonFiniteImageError: NaN/inf voxels (named with ``path`` and counted): clipping would
            keep NaN and turn inf into the clip bounds, so they are refused, never repaired.
    """
    require_finite(hu, path)
    lo, hi = normalization["clip_hu"]
    out = np.array(hu, dtype=np.float32)  # the one float32 copy; clipped and scaled in place
    np.clip(out, lo, hi, out=out)
    out -= np.float32(normalization["mean"])
    out /= np.float32(normalization["std"])
    return out


def pad_value(normalization: dict[str, Any]) -> float:
    """Normalised value of the lowest clipped HU: what lies outside the scanned volume."""
    return float((normalization["clip_hu"][0] - normalization["mean"]) / normalization["std"])


def label_lookup(plan: Plan, task: str) -> np.ndarray:
    """uint8 lookup (256 entries) from mask values to class indices; 255 marks unknown values.
    ``levels``: rungs of :meth:`lib.ml.plans.Plan.level_ladder` (0 for labels off the ladder)."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    ladder = plan.level_ladder() if task == "levels" else None
    for src in range(1, 256):
        v = plan.label_map.get(src, src)
        if v == 0:
            lut[src] = 0
        elif v in plan.labels:
            if task == "foreground":
                lut[src] = 1
            elif ladder is not None:  # off the ladder (T13): filled from its neighbours by encode_levels
                lut[src] = ladder.index(v) + 1 if v in ladder else 0
            else:
                lut[src] = plan.labels.index(v) + 1
    return lut


def mask_to_classes(mask: np.ndarray, plan: Plan, task: str, path: str | Path = "<mask>") -> np.ndarray:
    """Map mask label values to class indices of a stage's task.

    Raises:
        ValueError: values that are neither in the plan's labels nor mapped away, naming the file.
    """
    m = np.asarray(mask)
    if m.min() < 0 or m.max() > 255:
        raise ValueError(f"{path}: mask values {int(m.min())}..{int(m.max())} outside 0..255")
    lut = label_lookup(plan, task)
    out = lut[m] if m.dtype in (np.uint8, np.uint16) else lut[m.astype(np.intp)]  # a uint8 mask: no index copy
    if (out == 255).any():
        bad = sorted(int(v) for v in np.unique(m[out == 255]))
        raise ValueError(f"{path}: label values {bad} are not in the plan's labels {plan.labels} "
                         f"(map them with label_map)")
    return out


SOFT_MAX = 255
"""``foreground`` targets are stored as the spine fraction of each voxel x 255 (uint8): with a
majority (hard) target at 3 mm the spine Dice on a 2 mm grid cannot exceed ~0.90; with the
fraction it can reach ~0.97 (the network learns partial volume; its probability, interpolated
to the image grid and thresholded at 0.5, follows the surface)."""


LEVEL_NEAR_MM = 15.0
"""``levels`` targets: the ordinal outputs are trained within this distance of the spine (mm)."""


LEVEL_FG = 128
"""``levels`` targets: bit 7 set = spine voxel; the low 7 bits = level (class index) of the
nearest labelled voxel, 0 = outside the region (ignored by the ordinal loss)."""


def encode_levels(classes: np.ndarray, max_dist_vox: float | None = None) -> np.ndarray:
    """Encode class indices (0 = background) as ``levels`` targets (uint8, see :data:`LEVEL_FG`).

    Voxels within ``max_dist_vox`` of the spine (all voxels when None) get the level of the
    nearest labelled voxel, so the ordinal outputs are trained around the spine too, where a
    fine-grid spine voxel may fall; farther voxels get 0 (ignored).
    """
    cls = np.asarray(classes, dtype=np.uint8)
    if cls.max() >= LEVEL_FG:
        raise ValueError(f"levels targets hold at most {LEVEL_FG - 1} labels, got class {int(cls.max())}")
    if not cls.any():
        return np.zeros_like(cls)
    dist, ind = ndimage.distance_transform_edt(cls == 0, return_indices=True)
    near = cls[tuple(ind)]
    if max_dist_vox is not None:
        near = np.where(dist <= max_dist_vox, near, 0).astype(np.uint8)
    return (near | np.where(cls > 0, LEVEL_FG, 0)).astype(np.uint8)


def decode_levels(target: np.ndarray) -> np.ndarray:
    """Class indices (0 = background) of encoded ``levels`` targets."""
    t = np.asarray(target)
    return np.where(t >= LEVEL_FG, t - LEVEL_FG, 0).astype(np.uint8)
