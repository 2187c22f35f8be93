"""Signed-distance primitives, frames and world-fixed noise fields of the phantom.

All distances are in mm, negative inside; inputs are float32 arrays (world or segment-local
coordinates, mm) that broadcast. The noise fields are hashed from the world lattice, so any
block, grid or resolution samples the same field.
"""

from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------- SDF helpers


def length(*c):
    s = c[0] * c[0]
    for x in c[1:]:
        s = s + x * x
    return np.sqrt(s)


def sd_ellipse(u, v, a, b):
    """Approximate signed distance to an axis-aligned ellipse with semi-axes a, b (IQ bound)."""
    k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    k1 = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def sd_ellipsoid(u, v, w, a, b, c):
    k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
    k1 = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2 + (w / (c * c)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def extrude(d2, dz):
    """Combine an in-plane distance and an axial distance into a solid (exact for extrusions)."""
    return np.minimum(np.maximum(d2, dz), 0.0) + np.sqrt(np.maximum(d2, 0.0) ** 2 + np.maximum(dz, 0.0) ** 2)


def sd_segment(px, py, pz, a, b):
    """Distance from points to the segment a-b (world mm)."""
    ba = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    bb = float(ba @ ba) or 1e-9
    ax, ay, az = (px - a[0]), (py - a[1]), (pz - a[2])
    h = np.clip((ax * ba[0] + ay * ba[1] + az * ba[2]) / bb, 0.0, 1.0)
    return length(ax - ba[0] * h, ay - ba[1] * h, az - ba[2] * h)


def local(X, Y, Z, c, F):
    """World -> segment-local (u, v, w) coordinates."""
    dx, dy, dz = X - np.float32(c[0]), Y - np.float32(c[1]), Z - np.float32(c[2])
    u = dx * np.float32(F[0, 0]) + dy * np.float32(F[1, 0]) + dz * np.float32(F[2, 0])
    v = dx * np.float32(F[0, 1]) + dy * np.float32(F[1, 1]) + dz * np.float32(F[2, 1])
    w = dx * np.float32(F[0, 2]) + dy * np.float32(F[1, 2]) + dz * np.float32(F[2, 2])
    return u, v, w


def box_around(points, r):
    pts = np.asarray(points, float).reshape(-1, 3)
    return pts.min(0) - r, pts.max(0) + r


# ----------------------------------------------------------------------------- noise fields


def _hash_uniform(seed: int, ix, iy, iz) -> np.ndarray:
    """Deterministic pseudo-random values in [-1, 1] for integer lattice coordinates."""
    h = (np.asarray(ix, np.int64) * 73856093) ^ (np.asarray(iy, np.int64) * 19349663) \
        ^ (np.asarray(iz, np.int64) * 83492791) ^ np.int64(seed * 2654435761 % (2 ** 31))
    h = h.astype(np.uint64)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return ((h >> np.uint64(11)).astype(np.float64) / float(2 ** 53) * 2.0 - 1.0).astype(np.float32)


def _smooth(f):
    return f * f * (3.0 - 2.0 * f)


def noise_grid(seed: int, cell: float, xs, ys, zs) -> np.ndarray:
    """Smooth value noise (about unit std) on the grid xs x ys x zs (world mm), world-fixed.

    Lattice values come from a hash of the world lattice index, so any block, grid or
    resolution samples the same field. Interpolation is separable with smoothstep weights.
    """
    out = None
    axes = [np.asarray(a, np.float64) / cell for a in (xs, ys, zs)]
    lo = [int(math.floor(a.min())) for a in axes]
    hi = [int(math.floor(a.max())) + 2 for a in axes]
    L = _hash_uniform(seed, *np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]),
                                         np.arange(lo[2], hi[2]), indexing="ij"))
    out = L
    for ax in (2, 1, 0):
        t = axes[ax] - lo[ax]
        i = np.floor(t).astype(np.int64)
        f = _smooth(t - i).astype(np.float32)
        shp = [1, 1, 1]
        shp[ax] = -1
        f = f.reshape(shp)
        out = np.take(out, i, axis=ax) * (1 - f) + np.take(out, i + 1, axis=ax) * f
    return out * np.float32(1.0 / 0.42)


def noise_points(seed: int, cell: float, x, y, z) -> np.ndarray:
    """:func:`noise_grid` evaluated at scattered points (same field)."""
    t = [np.asarray(a, np.float64) / cell for a in (x, y, z)]
    i = [np.floor(a).astype(np.int64) for a in t]
    f = [_smooth(a - b).astype(np.float32) for a, b in zip(t, i, strict=True)]
    out = np.zeros(np.shape(x), np.float32)
    for dx in (0, 1):
        wx = f[0] if dx else 1 - f[0]
        for dy in (0, 1):
            wy = f[1] if dy else 1 - f[1]
            for dz in (0, 1):
                wz = f[2] if dz else 1 - f[2]
                out += wx * wy * wz * _hash_uniform(seed, i[0] + dx, i[1] + dy, i[2] + dz)
    return out * np.float32(1.0 / 0.42)
