"""Acquisition: field of view, grid planning, rendering in blocks, thick slices, noise.

:func:`generate_case` / :func:`generate_scans` plan the grid of a spec (the field of view in z
by ``fov`` and the anatomy's landmarks, the in-plane FOV by body size), render the anatomy
block by block on thin slices, and acquire each scan: fluid levels that follow gravity, the
table, metal streaks, slice thickness simulated by averaging thin slices along z (not by
dropping slices), in-plane correlated noise, rounding to int16 HU clipped to
[:data:`HU_MIN`, :data:`HU_MAX`].
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from scipy import ndimage

from lib.synthetic.phantom.anatomy import Anatomy, body_profile, build_anatomy
from lib.synthetic.phantom.bone import body_points_local, composite_bone, render_skeleton
from lib.synthetic.phantom.canvas import Canvas
from lib.synthetic.phantom.soft_tissue import (
    COLON_RADIUS_MM,
    FLUID_HU,
    add_streaks,
    render_metal,
    render_soft,
    render_table_into,
    table_y,
)
from lib.synthetic.phantom.spec import (
    HU_MAX,
    HU_MIN,
    T_FLUID,
    T_GAS,
    T_METAL,
    CaseSpec,
    PhantomCase,
)

# ----------------------------------------------------------------------------- grid and FOV


def _fov_z(anat: Anatomy, spec: CaseSpec) -> tuple[float, float]:
    """World z range (inferior, superior) of the scan for the spec's field of view."""
    if spec.z_range_mm is not None:
        return float(min(spec.z_range_mm)), float(max(spec.z_range_mm))
    rng = np.random.default_rng([spec.seed, 2, spec.scan_seed])
    lm = anat.landmarks
    by = {sg.name: sg for sg in anat.segments}
    th = [sg for sg in anat.segments if sg.region == "thoracic"]
    if spec.fov == "neck":
        return th[int(rng.integers(1, 4))].center[2], lm["z_c1"] + rng.uniform(40, 80)
    if spec.fov == "chest":
        return by["L1"].center[2] - rng.uniform(0, 35), lm["z_t1"] + rng.uniform(25, 50)
    if spec.fov == "abdomen":
        top = th[-3].center[2] + rng.uniform(-10, 40)
        return lm["z_hip"] - rng.uniform(35, 70), top
    if spec.fov == "whole":
        return lm["z_hip"] - rng.uniform(20, 50), lm["z_c1"] + rng.uniform(35, 60)
    # verse_crop: a run of levels
    labs = [sg for sg in anat.segments if sg.label]
    if spec.crop_levels is not None:
        first, last = spec.crop_levels
        names = [sg.label for sg in labs]
        if first not in names or last not in names:
            raise ValueError(f"crop_levels {spec.crop_levels}: labels not in this anatomy ({names})")
        i0, i1 = names.index(first), names.index(last)
    else:
        kind = rng.choice(["cervical", "thoracolumbar", "lumbar", "cervicothoracic"], p=[0.2, 0.35, 0.3, 0.15])
        names = [sg.name for sg in labs]
        if kind == "cervical":
            i0, i1 = 0, names.index("T2")
        elif kind == "cervicothoracic":
            i0, i1 = int(rng.integers(2, 5)), names.index(f"T{int(rng.integers(6, 10))}")
        elif kind == "thoracolumbar":
            i0, i1 = names.index(f"T{int(rng.integers(5, 9))}"), len(names) - 1
        else:
            i0, i1 = names.index(f"T{spec.n_thoracic - 1}"), len(names) - 1
    a, b = labs[min(i0, i1)], labs[max(i0, i1)]
    top = a.center[2] + a.d["h"] / 2 + 8
    bot = b.center[2] - b.d["h"] / 2 - (40 if b.region == "lumbar" and b is labs[-1] else 8)
    return bot, top


def _fov_xy(anat: Anatomy, spec: CaseSpec, z0: float, z1: float) -> tuple[float, float, float]:
    """(centre x, centre y, size) of the square in-plane field of view, mm."""
    zs = np.linspace(z0, z1, 24)
    prof = body_profile(anat, spec, zs)
    ox, oy = spec.fov_center_offset_mm
    if spec.fov == "verse_crop":
        size = spec.fov_xy_mm or 150.0 + 20.0 * float(np.random.default_rng([spec.seed, 3, spec.scan_seed]).uniform())
        return float(np.mean(prof["spine_x"])) + ox, float(np.mean(prof["spine_y"])) - 15.0 + oy, size
    half = float(np.max(np.maximum(prof["W"] + prof["fat"], prof["D"] + prof["fat"] + 15)))
    size = spec.fov_xy_mm or 2 * half + 30.0
    if spec.center_on_spine:
        return float(np.mean(prof["spine_x"])) + ox, float(np.mean(prof["spine_y"])) - 15.0 + oy, size
    return 0.0 + ox, float(np.mean(prof["yc"])) - 8.0 + oy, size


def plan_grid(spec: CaseSpec) -> tuple[tuple[int, int, int], np.ndarray]:
    """Output shape (x, y, z) and RAS affine for a spec, without rendering."""
    anat = build_anatomy(spec)
    return _plan(anat, spec)[:2]


def _plan(anat: Anatomy, spec: CaseSpec):
    sx, sy, sz = (float(v) for v in spec.spacing_mm)
    z0, z1 = _fov_z(anat, spec)
    cx, cy, size = _fov_xy(anat, spec, z0, z1)
    nx, ny = max(8, int(round(size / sx))), max(8, int(round(size / sy)))
    nz = max(2, int(math.floor((z1 - z0) / sz)) + 1)
    x0 = cx - (nx - 1) / 2 * sx
    y0 = cy - (ny - 1) / 2 * sy
    aff = np.diag([sx, sy, sz, 1.0])
    aff[:3, 3] = (x0, y0, z0)
    return (nx, ny, nz), aff, (x0, y0, z0)


def _subsampling(spec: CaseSpec) -> tuple[int, int]:
    """(m, n_w): thin slices per output spacing (odd) and the averaging window (odd)."""
    sx, sy, sz = spec.spacing_mm
    thick = spec.slice_thickness_mm or sz
    fine_max = max(min(sx, sy), 1.0)
    m = 1
    while sz / m > fine_max * 1.05 or (thick / (sz / m) < 1.5 and thick > fine_max * 1.5 and m < 15):
        m += 2
        if m > 15:
            break
    dz = sz / m
    n_w = max(1, int(round(thick / dz)))
    if n_w % 2 == 0:
        n_w += 1
    return m, n_w


def generate_case(spec: CaseSpec, block_slices: int | None = None) -> PhantomCase:
    """Render a synthetic CT case.

    Args:
        spec: the case definition.
        block_slices: output slices rendered at once (memory bound); None = automatic
            (whole volume at coarse grids, blocks of ~25 M thin-slice voxels at paper scale).

    Returns:
        :class:`PhantomCase` with CT (int16 HU), mask (uint8), affine (RAS), centroids (world
        mm), tissue classes and anatomy facts.
    """
    return generate_scans([spec], block_slices=block_slices)[0]


_HEAP_DEPTH = 0


@contextlib.contextmanager
def retain_heap():
    """Keep large numpy temporaries on the heap while rendering (glibc only).

    Rendering allocates and frees many volume-sized arrays; by default glibc maps each one
    afresh (``mmap``), so every allocation page-faults again. Raising the mmap and trim
    thresholds for the duration reuses the memory (about a third less system time), and the
    defaults are restored and the heap trimmed afterwards. A no-op where glibc is absent.
    """
    global _HEAP_DEPTH
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        yield
        return
    _HEAP_DEPTH += 1
    if _HEAP_DEPTH > 1:  # nested: the outermost scope owns the settings
        try:
            yield
        finally:
            _HEAP_DEPTH -= 1
        return
    m_trim, m_top_pad, m_mmap = -1, -2, -3
    libc.mallopt(m_mmap, 1 << 30)
    libc.mallopt(m_trim, (1 << 31) - 1)
    libc.mallopt(m_top_pad, 64 << 20)
    try:
        yield
    finally:
        _HEAP_DEPTH -= 1
        libc.mallopt(m_mmap, 128 * 1024)
        libc.mallopt(m_trim, 128 * 1024)
        libc.mallopt(m_top_pad, 0)
        libc.malloc_trim(0)


def generate_scans(specs: Sequence[CaseSpec], block_slices: int | None = None) -> list[PhantomCase]:
    """Several scans of one patient on one grid (e.g. supine and prone), anatomy rendered once.

    The specs may differ only in ``position``, ``scan_seed`` and ``noise_hu`` and must give the
    same grid (fix ``z_range_mm``). Each returned case is byte-identical to
    ``generate_case(case.spec)``; this only saves the shared rendering.

    Raises:
        ValueError: specs that differ in anything else, or whose grids differ.
    """
    with retain_heap():
        return _generate_scans(list(specs), block_slices)


def _generate_scans(specs: list[CaseSpec], block_slices: int | None) -> list[PhantomCase]:
    base = _check_one_patient(specs)
    anat = build_anatomy(base)
    plans = [_plan(anat, s) for s in specs]
    (nx, ny, nz), aff, (x0, y0, z0) = plans[0]
    for pl in plans[1:]:
        if pl[0] != plans[0][0] or not np.allclose(pl[1], aff):
            raise ValueError("generate_scans: the scans' grids differ; set z_range_mm (and fov_xy_mm) explicitly")
    sx, sy, sz = (float(v) for v in base.spacing_mm)
    m, n_w = _subsampling(base)
    dzf = sz / m
    half = n_w // 2
    xs = x0 + sx * np.arange(nx)
    ys = y0 + sy * np.arange(ny)
    if block_slices is None:
        block_slices = max(4, int(2.5e7 // max(nx * ny * m, 1)))
    cts = [np.empty((nx, ny, nz), np.int16) for _ in specs]
    tissues = [np.zeros((nx, ny, nz), np.uint8) for _ in specs]
    mask = np.zeros((nx, ny, nz), np.uint8)
    ribs = np.zeros((nx, ny, nz), np.uint8)
    info: dict = {"levels": {sg.name: (sg.label, tuple(float(c) for c in sg.center)) for sg in anat.segments},
                  "labels_expected": [sg.label for sg in anat.segments if sg.label],
                  "subsampling": (m, n_w), "landmarks": dict(anat.landmarks)}
    infos = [dict(info, table_y=table_y(anat, s, z0, z0 + (nz - 1) * sz)) for s in specs]
    vox = min(sx, sy)
    for k0 in range(0, nz, block_slices):
        k1 = min(nz, k0 + block_slices)
        nf = (k1 - k0 - 1) * m + n_w
        zf = z0 + k0 * sz + (np.arange(nf) - half) * dzf
        cv, lab, rib = _render_block(anat, base, xs, ys, zf, vox, infos[0])
        centre = half + m * np.arange(k1 - k0)
        mask[:, :, k0:k1] = lab[:, :, centre]
        ribs[:, :, k0:k1] = rib[:, :, centre]
        for i, s in enumerate(specs):
            hu, tis = _finish_scan(cv, s, infos[i], k0, copy=i < len(specs) - 1)
            cts[i][:, :, k0:k1] = _acquire(hu, s, centre, n_w, k0, (sx, sy))
            tissues[i][:, :, k0:k1] = tis[:, :, centre]
    centroids = compute_centroids(mask, aff)
    bodies = body_centroids(anat, centroids, aff, mask.shape)
    out_cases = []
    for i, s in enumerate(specs):
        infos[i]["labels_present"] = sorted(centroids)
        infos[i].update({k: v for k, v in infos[0].items() if k not in infos[i]})
        out_cases.append(PhantomCase(ct=cts[i], mask=mask if i == 0 else mask.copy(), affine=aff.copy(),
                                     centroids=dict(centroids), spec=s, tissue=tissues[i],
                                     ribs=ribs if i == 0 else ribs.copy(), info=infos[i],
                                     body_centroids=dict(bodies)))
    return out_cases



def _check_one_patient(specs: list[CaseSpec]) -> CaseSpec:
    """The group's base spec; raises ValueError when the specs differ in more than the scan."""
    base = specs[0]
    for s in specs[1:]:
        if replace(s, position=base.position, scan_seed=base.scan_seed, noise_hu=base.noise_hu) != base:
            raise ValueError("generate_scans: specs may differ only in position, scan_seed and noise_hu")
    return base


def _acquire(hu: np.ndarray, spec: CaseSpec, centre: np.ndarray, n_w: int, k0: int, spacing_xy) -> np.ndarray:
    """The output slices of one block (float32 HU, rounded and clipped to [HU_MIN, HU_MAX]):
    thick-slice average of the thin slices ``hu`` around the ``centre`` indices, then noise."""
    out = _thick_slices(hu, centre, n_w)
    out = _add_noise(np.array(out, np.float32, copy=True), spec, k0, spacing_xy)
    np.rint(out, out=out)
    np.clip(out, HU_MIN, HU_MAX, out=out)
    return out


def _thick_slices(hu: np.ndarray, centre: np.ndarray, n_w: int) -> np.ndarray:
    """Slice thickness as a box profile along z: each output slice is the mean of the ``n_w``
    (odd) thin slices around its centre index, from float64 cumulative sums; ``n_w = 1`` takes
    the centre slices."""
    if n_w > 1:
        nx, ny = hu.shape[:2]
        half = n_w // 2
        cs = np.cumsum(np.concatenate([np.zeros((nx, ny, 1), np.float64), hu.astype(np.float64)], axis=2), axis=2)
        out = ((cs[:, :, centre + half + 1] - cs[:, :, centre - half]) / n_w).astype(np.float32)
    else:
        out = hu[:, :, centre]
    return out


def _render_block(anat: Anatomy, spec: CaseSpec, xs, ys, zf, vox: float, info: dict):
    """Render everything a scan's position and acquisition do not change; returns the canvas,
    the labels and the rib levels of the thin slices."""
    cv = Canvas(xs, ys, zf, vox)
    render_soft(cv, anat, spec, info)
    bt = render_skeleton(cv, anat, spec, info)
    lab, ribs = composite_bone(cv, bt, anat.params["tex_seed"], xs, ys, zf, vox)
    if spec.metal:
        cv.metal = render_metal(cv, anat, spec, info)
        cv.hu[cv.metal] = 3071.0
        cv.tissue[cv.metal] = T_METAL
    return cv, lab, ribs


def _finish_scan(cv: Canvas, spec: CaseSpec, info: dict, k0: int, copy: bool):
    """Add what depends on the scan: fluid levels (gravity), the table, metal streaks."""
    hu = cv.hu.copy() if copy else cv.hu
    tis = cv.tissue.copy() if copy else cv.tissue
    if cv.colon_ymid is not None:
        # dependent side: posterior when supine, anterior when prone
        g = -1.0 if spec.position == "supine" else 1.0
        level = cv.colon_ymid + np.float32(g * 0.55 * COLON_RADIUS_MM)
        fluid = (tis == T_GAS) & ((cv.Y - level) * g > 0)
        np.copyto(hu, np.float32(FLUID_HU), where=fluid)
        np.copyto(tis, np.uint8(T_FLUID), where=fluid)
    render_table_into(hu, tis, cv, spec, info["table_y"])
    if cv.metal is not None:
        rng = np.random.default_rng([spec.seed, 6, spec.scan_seed, k0])
        for k in np.nonzero(cv.metal.any(axis=(0, 1)))[0]:
            add_streaks(hu[:, :, k], cv.metal[:, :, k], cv.voxel, rng)
    return hu, tis


def _add_noise(img: np.ndarray, spec: CaseSpec, k0: int, spacing_xy) -> np.ndarray:
    """Add CT-like noise: white noise blurred in-plane (~0.6 mm grain), SD ``spec.noise_hu``.

    The SD is normalised exactly from the blur kernel, so it does not depend on the block.
    """
    if spec.noise_hu <= 0:
        return img
    rng = np.random.default_rng([spec.seed, 4, spec.scan_seed, k0])
    sig = np.maximum(0.6 / np.asarray(spacing_xy, float), 0.5)
    n = rng.standard_normal(img.shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, sigma=(sig[0], sig[1], 0.0), mode="wrap")
    # variance of blurred white noise = var * sum of squared kernel weights (per axis)
    w2 = 1.0
    for sgm in sig:
        delta = np.zeros(int(8 * sgm) * 2 + 1)
        delta[len(delta) // 2] = 1.0
        w2 *= float((ndimage.gaussian_filter1d(delta, sgm, mode="constant") ** 2).sum())
    n *= np.float32(spec.noise_hu / np.sqrt(w2))
    img += n
    return img


def compute_centroids(mask: np.ndarray, affine: np.ndarray) -> dict[int, tuple[float, float, float]]:
    """Centre of mass (world mm, RAS) of each non-zero label of ``mask`` (x, y, z array)."""
    out: dict[int, tuple[float, float, float]] = {}
    boxes = ndimage.find_objects(mask)
    A = np.asarray(affine, float)
    for i, sl in enumerate(boxes):
        if sl is None:
            continue
        lab = i + 1
        sub = mask[sl] == lab
        idx = np.nonzero(sub)
        c = [float(np.mean(ix)) + s.start for ix, s in zip(idx, sl, strict=True)]
        w = A @ np.array([*c, 1.0])
        out[lab] = (float(w[0]), float(w[1]), float(w[2]))
    return out


def body_centroids(anat: Anatomy, centroids: dict[int, tuple[float, float, float]], affine: np.ndarray,
                   shape: Sequence[int], step_mm: float = 0.5) -> dict[int, tuple[float, float, float]]:
    """The true vertebral-body centroid (world mm, RAS) of every label in ``centroids``.

    The body solid of each vertebra (:func:`lib.synthetic.phantom.bone.body_points_local`,
    sampled every ``step_mm``) is placed in the world by its segment's centre and frame and
    clipped to the field of view (voxel centres ± half a voxel); its centre of mass is the
    centroid. C1 has no body, and a vertebra whose body lies wholly outside the field of view
    has none in view: both keep their mask centre of mass (``centroids``).
    """
    inv = np.linalg.inv(np.asarray(affine, float))
    hi = np.asarray(shape, float) - 0.5
    by_label = {sg.label: sg for sg in anat.segments if sg.label}
    out: dict[int, tuple[float, float, float]] = {}
    for lab, com in centroids.items():
        sg = by_label.get(lab)
        if sg is None or sg.name == "C1":
            out[lab] = com
            continue
        world = np.asarray(sg.center, float) + body_points_local(sg, step_mm) @ np.asarray(sg.frame, float).T
        vox = world @ inv[:3, :3].T + inv[:3, 3]
        keep = np.all((vox >= -0.5) & (vox <= hi), axis=1)
        out[lab] = tuple(float(c) for c in world[keep].mean(axis=0)) if keep.any() else com
    return out
