"""Intensity augmentation of normalised patches (nnU-Net's probabilities; thick slices optional)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from lib.imaging.thick_slices import thick_slice_augment


def augment_intensity(img: np.ndarray, aug: dict[str, Any], rng: np.random.Generator,
                      spacing: Sequence[float]) -> np.ndarray:
    """nnU-Net-style intensity augmentation on a normalised patch (float32, same shape)."""
    if rng.random() < aug.get("thick_slice_prob", 0.0):
        t = float(rng.uniform(*aug.get("thick_slice_mm", (3.0, 6.0))))
        img = thick_slice_augment(img, float(spacing[2]), t, float(rng.uniform(0, max(t / spacing[2], 1.0))))
    if rng.random() < aug.get("p_noise", 0.0):
        img = img + rng.normal(0, float(rng.uniform(0, aug.get("noise_std", 0.1))), img.shape).astype(np.float32)
    if rng.random() < aug.get("p_blur", 0.0):
        img = ndimage.gaussian_filter(img, float(rng.uniform(*aug.get("blur_sigma", (0.5, 1.0)))))
    if rng.random() < aug.get("p_brightness", 0.0):
        img = img * np.float32(rng.uniform(*aug.get("brightness", (0.75, 1.25))))
    if rng.random() < aug.get("p_contrast", 0.0):
        mean, lo, hi = img.mean(), img.min(), img.max()
        img = np.clip((img - mean) * np.float32(rng.uniform(*aug.get("contrast", (0.75, 1.25)))) + mean, lo, hi)
    if rng.random() < aug.get("p_gamma", 0.0):
        lo, hi = float(img.min()), float(img.max())
        rngw = max(hi - lo, 1e-6)
        img = ((img - lo) / rngw) ** np.float32(rng.uniform(*aug.get("gamma", (0.7, 1.5)))) * rngw + lo
    return img.astype(np.float32, copy=False)
