"""Tiny toy spine cases on disk (NIfTI image + mask) for the model tests."""

from __future__ import annotations

import numpy as np

from lib.io import save_volume


def make_toy_case(img_path, msk_path, seed: int, shape=(24, 24, 48), spacing=(2.0, 2.0, 2.0),
                  labels=(20, 21, 22, 23), affine=None):
    """A seeded toy 'spine': boxes stacked along z (RAS array), one label each, bright HU.

    Written with ``affine`` (default: diagonal RAS ``spacing``); the arrays are RAS, so a
    non-RAS affine must come with arrays already in that file order (see test_infer).
    """
    rng = np.random.default_rng(seed)
    ct = rng.normal(0, 20, shape).astype(np.float32)
    m = np.zeros(shape, np.uint8)
    z = 3 + int(rng.integers(0, 3))
    cx = shape[0] // 2 + int(rng.integers(-2, 3))
    cy = shape[1] // 2 + int(rng.integers(-2, 3))
    h = (shape[2] - 8) // len(labels) - 2
    for i, lab in enumerate(labels):
        sl = (slice(cx - 4, cx + 4), slice(cy - 4, cy + 4), slice(z, z + h))
        m[sl] = lab
        ct[sl] += 400 + 60 * i
        z += h + 2
    aff = np.diag([*spacing, 1.0]) if affine is None else affine
    save_volume(ct.astype(np.int16), aff, img_path)
    save_volume(m, aff, msk_path)
    return img_path, msk_path


def toy_cases(folder, n: int, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        make_toy_case(folder / f"t{i}.nii.gz", folder / f"t{i}_seg.nii.gz", i, **kw)
        out.append((f"t{i}", str(folder / f"t{i}.nii.gz"), str(folder / f"t{i}_seg.nii.gz")))
    return out
