"""Helpers shared by the tests split from tests/test_oracle.py."""

from __future__ import annotations

import numpy as np


def _labels(shape=(12, 10, 8), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 26, shape).astype(np.uint8)


def _affine(sp=(1.0, 1.5, 2.0), origin=(-10.0, 5.0, -100.0)) -> np.ndarray:
    a = np.diag([*sp, 1.0])
    a[:3, 3] = origin
    return a
