"""Helpers shared by the tests split from tests/test_evaluate.py."""

from __future__ import annotations

import numpy as np

SPACING = (0.9, 1.1, 1.6)


AFFINE = np.diag([*SPACING, 1.0])


def _truth(seed: int, shape=(20, 18, 64), n_labels=5) -> np.ndarray:
    """Stacked box 'vertebrae' 1..n with random extents, a disc gap between them."""
    r = np.random.default_rng(seed)
    m = np.zeros(shape, np.uint8)
    z = 2
    for v in range(1, n_labels + 1):
        h = int(r.integers(7, 11))
        x0, y0 = int(r.integers(3, 6)), int(r.integers(3, 6))
        m[x0:x0 + 10, y0:y0 + 9, z:z + h] = v
        z += h + 2
    return m


def _prediction(gt: np.ndarray, seed: int) -> np.ndarray:
    p = np.roll(gt, 1, axis=seed % 3)
    p[p == 5] = 0  # the last vertebra is always missed
    return p


