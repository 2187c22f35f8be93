"""The canvas: one block of thin slices being rendered, and how world-space objects land on it.

Soft tissues are painted in order (a later object overwrites an earlier one, no blending);
bones are unioned as signed distances (the nearest object wins the voxel) and composited
afterwards (:func:`lib.synthetic.phantom.bone.composite_bone`). Arrays are ``(x, y, z)``.
"""

from __future__ import annotations

import math

import numpy as np


class Canvas:
    """Arrays for one block of thin slices and helpers to paint world-space objects."""

    def __init__(self, x, y, z, voxel_mm: float):
        self.x = x.astype(np.float32)
        self.y = y.astype(np.float32)
        self.z = z.astype(np.float32)
        self.shape = (len(x), len(y), len(z))
        self.X = self.x[:, None, None]
        self.Y = self.y[None, :, None]
        self.Z = self.z[None, None, :]
        self.hu = np.full(self.shape, -1000.0, np.float32)
        self.tissue = np.zeros(self.shape, np.uint8)
        self.bone_sdf = np.full(self.shape, np.inf, np.float32)
        self.bone_id = np.zeros(self.shape, np.uint8)
        self.colon_ymid: np.ndarray | None = None
        self.metal: np.ndarray | None = None
        self.voxel = voxel_mm
        self.dx = float(x[1] - x[0]) if len(x) > 1 else voxel_mm
        self.dy = float(y[1] - y[0]) if len(y) > 1 else voxel_mm
        self.dz = float(z[1] - z[0]) if len(z) > 1 else voxel_mm

    def box(self, lo, hi):
        """Index slices of the voxels whose centres lie in the world box [lo, hi]; None if empty."""
        out = []
        for ax, (a, b) in enumerate(zip(lo, hi, strict=True)):
            g = (self.x, self.y, self.z)[ax]
            d = (self.dx, self.dy, self.dz)[ax]
            i0 = int(math.floor((a - g[0]) / d))
            i1 = int(math.ceil((b - g[0]) / d)) + 1
            i0, i1 = max(i0, 0), min(i1, len(g))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl):
        return self.X[sl[0], :, :], self.Y[:, sl[1], :], self.Z[:, :, sl[2]]

    def paint(self, lo, hi, sdf_fn, hu, tissue, texture=None, only=None):
        """Set HU/tissue where ``sdf_fn(X, Y, Z) < 0`` inside the box (soft tissues, no blending);
        ``only``: restrict to voxels currently of these tissue classes."""
        sl = self.box(lo, hi)
        if sl is None:
            return
        X, Y, Z = self.coords(sl)
        inside = sdf_fn(X, Y, Z) < 0
        if only is not None:
            inside &= np.isin(self.tissue[sl], only)
        if not inside.any():
            return
        val = hu if texture is None else hu + texture(X, Y, Z)
        sub = self.hu[sl]
        sub[inside] = np.broadcast_to(val, inside.shape)[inside] if np.ndim(val) else val
        self.tissue[sl][inside] = tissue

    def bone(self, lo, hi, sdf_fn, obj_id: int):
        """Union a bone object's SDF into the block (nearest object wins the id)."""
        sl = self.box(lo, hi)
        if sl is None:
            return
        X, Y, Z = self.coords(sl)
        d = np.asarray(sdf_fn(X, Y, Z), np.float32)
        d = np.broadcast_to(d, tuple(s.stop - s.start for s in sl))
        cur = self.bone_sdf[sl]
        better = d < cur
        cur[better] = d[better]
        self.bone_id[sl][better] = obj_id
