"""Helpers shared by the tests split from tests/test_metrics.py."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SPACING = (0.7, 1.3, 2.1)  # anisotropic on purpose, mm


def _cube(shape, lo, n):
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:lo[0] + n, lo[1]:lo[1] + n, lo[2]:lo[2] + n] = True
    return m


def _random_labels(shape, n_labels, seed):
    r = np.random.default_rng(seed)
    out = np.zeros(shape, dtype=np.uint8)
    for v in range(1, n_labels + 1):
        m = ndimage.gaussian_filter(r.random(shape), 1.5) > 0.53
        out[m & (out == 0)] = v
    return out


def _row(rows, label):
    hits = [r for r in rows if r["label"] == label]
    assert len(hits) == 1, f"expected one row for label {label}, got {len(hits)}"
    return hits[0]


