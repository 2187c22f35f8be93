"""The patient's anatomy in world mm, before any voxel: the spine as segments, the body profile.

:func:`build_anatomy` lays out every vertebra (C1..C7, T1..T11/12/13, L1..L4/5/6), the sacral
and coccygeal segments along a sagittal centre line (cervical and lumbar lordosis, thoracic
kyphosis, optional scoliosis with axial rotation), and draws the body, bone and organ
parameters; vertebra size grows craniocaudally. :func:`body_profile` gives the body outline per
slice. All draws depend only on ``spec.seed`` (and the counts and curvature), so the same seed
on another grid or field of view is the same patient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lib.synthetic.phantom.sdf import box_around
from lib.synthetic.phantom.spec import CaseSpec


@dataclass
class Segment:
    """One vertebra, sacral or coccygeal segment in world space."""

    name: str
    label: int  # 0 for unlabelled (sacrum, coccyx)
    region: str  # cervical | thoracic | lumbar | sacral | coccygeal
    center: np.ndarray  # body centre (world mm)
    frame: np.ndarray  # 3x3, columns u (right), v (anterior), w (cranial), world unit vectors
    d: dict  # dimensions (mm)


@dataclass
class Anatomy:
    """The laid-out patient: segments from C1 down to Co3, body and organ parameters
    (:func:`build_anatomy`), landmark heights (world z, mm)."""

    segments: list[Segment]
    params: dict
    landmarks: dict


def _lerp(a, b, f):
    return a + (b - a) * f


def _dims_for(region: str, f: float, rng, s: float) -> dict:
    """Vertebra dimensions (mm) for relative position f in 0..1 within the region."""
    j = lambda: 1.0 + rng.normal(0, 0.03)  # noqa: E731 - per-level jitter
    if region == "cervical":
        d = dict(a=_lerp(8.0, 11.5, f), b=_lerp(7.5, 8.5, f), h=_lerp(12.5, 14.0, f), disc=5.0,
                 cw=_lerp(12.0, 12.5, f), cd=_lerp(7.0, 6.5, f), t=3.8, ha=0.8,
                 ls=_lerp(16.0, 36.0, f ** 2.5), sa=math.radians(_lerp(25, 20, f)), rs=3.2,
                 lt=_lerp(13.0, 15.0, f), tb=math.radians(15), tu=0.0, rt=2.8, rf=3.6, shear=0.15)
    elif region == "thoracic":
        d = dict(a=_lerp(13.0, 21.0, f), b=_lerp(9.0, 15.0, f), h=_lerp(15.0, 23.0, f),
                 disc=_lerp(4.0, 6.5, f), cw=_lerp(9.0, 8.5, f), cd=_lerp(7.5, 8.0, f), t=5.0, ha=0.72,
                 ls=_lerp(36.0, 30.0, f), sa=math.radians(45 + 20 * math.sin(math.pi * f) - 20 * f), rs=3.8,
                 lt=_lerp(26.0, 17.0, f), tb=math.radians(_lerp(20, 40, f)), tu=math.radians(10),
                 rt=_lerp(5.5, 4.5, f), rf=3.8, shear=_lerp(0.35, 0.2, f))
    elif region == "lumbar":
        tp = [26.0, 33.0, 40.0, 35.0, 30.0]
        fi = f * 4
        lo = int(min(math.floor(fi), 3))
        d = dict(a=_lerp(21.5, 26.0, f), b=_lerp(16.0, 17.5, f), h=_lerp(25.0, 26.5, f),
                 disc=_lerp(9.0, 11.0, f), cw=_lerp(11.0, 13.0, f), cd=_lerp(8.0, 7.5, f), t=7.0, ha=0.62,
                 ls=30.0, sa=math.radians(8), rs=4.0, hs=9.0, lt=_lerp(tp[lo], tp[lo + 1], fi - lo),
                 tb=math.radians(8), tu=math.radians(5), rt=_lerp(4.5, 6.5, f), rf=5.0, shear=0.1)
    else:
        raise ValueError(region)
    for k in ("a", "b", "h", "cw", "cd", "ls", "lt"):
        d[k] *= s * j()
    d["disc"] *= s
    return d


def build_anatomy(spec: CaseSpec) -> Anatomy:
    """Lay out the spine, pelvis, skull and body parameters in world mm (no voxels yet)."""
    rng = np.random.default_rng([spec.seed, 1])
    s = float(np.clip(rng.normal(1.0, 0.045), 0.9, 1.1))  # skeletal size
    names, n_sacral = _segment_names(spec)
    dims = _segment_dims(spec, names, n_sacral, rng, s)
    s_pos, total = _arc_positions(dims)
    knots = _sagittal_knots(spec, names, s_pos, rng)
    path, dirs, lat = _centre_line(spec, names, s_pos, total, knots)
    path = _place_in_world(spec, names, s_pos, path, rng)
    segments = _make_segments(spec, names, s_pos, dims, path, dirs, lat)
    p = _body_params(spec, rng, s)
    return Anatomy(segments, p, _landmarks(spec, names, segments, s))


def _segment_names(spec: CaseSpec) -> tuple[list[tuple[str, int, str]], int]:
    """``(name, label, region)`` of every segment from C1 down to Co3, and the number of
    sacral segments (6 when L5 is fused in, 4 when S1 is lumbarized)."""
    names: list[tuple[str, int, str]] = [(f"C{i}", i, "cervical") for i in range(1, 8)]
    for i in range(1, spec.n_thoracic + 1):
        names.append((f"T{i}", 28 if i == 13 else 7 + i, "thoracic"))
    for i in range(1, spec.n_lumbar + 1):
        names.append((f"L{i}", 19 + i, "lumbar"))
    n_sacral = 5 + (5 - spec.n_lumbar)  # 6 when L5 is fused in, 4 when S1 is lumbarized
    for i in range(n_sacral):
        q = i - (n_sacral - 5)  # 0 = S1; -1 = the fused L5 segment; S1 absent when lumbarized
        names.append(("S0" if q < 0 else f"S{q + 1}", 0, "sacral"))
    for i in range(1, 4):
        names.append((f"Co{i}", 0, "coccygeal"))
    return names, n_sacral


def _segment_dims(spec: CaseSpec, names: list[tuple[str, int, str]], n_sacral: int, rng, s: float) -> list[dict]:
    """Dimensions (mm) of every segment, top to bottom; draws the per-level jitter from ``rng``."""
    dims: list[dict] = []
    idx_in = {"cervical": 0, "thoracic": 0, "lumbar": 0, "sacral": 0, "coccygeal": 0}
    for _nm, _lab, reg in names:
        k = idx_in[reg]
        idx_in[reg] += 1
        if reg == "cervical":
            d = _cervical_dims(k, rng, s)
        elif reg == "thoracic":
            d = _thoracic_dims(k, spec.n_thoracic, rng, s)
        elif reg == "lumbar":
            d = _lumbar_dims(k, spec, rng, s)
        elif reg == "sacral":
            d = _sacral_dims(k, n_sacral, s)
        else:
            d = _coccygeal_dims(k, s)
        d["s"] = s
        dims.append(d)
    return dims


def _cervical_dims(k: int, rng, s: float) -> dict:
    """C1 (k = 0: a ring, no body), C2 (k = 1: with the dens) .. C7."""
    f = max(0, k - 2) / 4.0
    d = _dims_for("cervical", f, rng, s)
    if k == 0:  # C1: ring, no body
        d.update(h=10.0 * s, disc=3.0 * s)
    elif k == 1:  # C2 with dens
        d.update(h=19.0 * s, a=9.0 * s, b=8.0 * s, ls=26.0 * s, rs=4.5)
    return d


def _thoracic_dims(k: int, n: int, rng, s: float) -> dict:
    """T(k + 1) of ``n`` thoracic vertebrae; T13 continues the T12 trend a little."""
    f = k / 11.0 if n <= 12 else min(k / 11.0, 1.0 + (k - 11) * 0.05)
    if n == 11:
        f = k / 10.0
    return _dims_for("thoracic", min(f, 1.05), rng, s)


def _lumbar_dims(k: int, spec: CaseSpec, rng, s: float) -> dict:
    """L(k + 1); L6 is L5-like; a transitional last lumbar gets wing-like transverse processes."""
    n = spec.n_lumbar
    f = min(k, 4) / 4.0
    d = _dims_for("lumbar", f, rng, s)
    if k == 5:  # L6: L5-like, a bit lower, broad processes
        d.update(h=d["h"] * 0.95, lt=31.0 * s, rt=7.0)
    if spec.sacralization and k == n - 1:
        d.update(lt=42.0 * s, rt=9.0, tu=math.radians(-12), tb=math.radians(-5))
    return d


def _sacral_dims(k: int, n_sacral: int, s: float) -> dict:
    """Sacral segment k of ``n_sacral`` (the fused L5 segment first when there are 6)."""
    q = k - (n_sacral - 5)  # 0 = S1
    fused_l5 = q < 0
    widths = [24.0, 18.0, 14.0, 11.0, 8.0]
    depths = [16.0, 12.5, 10.0, 7.5, 6.0]
    heights = [22.0, 19.0, 16.0, 13.0, 11.0]
    qi = max(q, 0)
    d = dict(a=widths[qi] * s, b=depths[qi] * s, h=heights[qi] * s, disc=1.2 * s)
    if fused_l5:
        d = dict(a=25.0 * s, b=17.0 * s, h=24.0 * s, disc=1.5 * s)
    d["fused_l5"] = fused_l5
    d["q"] = q
    d["first"] = k == 0
    d["last"] = k == n_sacral - 1
    return d


def _coccygeal_dims(k: int, s: float) -> dict:
    c = [6.0, 4.5, 3.5][k]
    return dict(a=c * s, b=c * 0.8 * s, h=c * 1.3 * s, disc=2.0 * s)


def _arc_positions(dims: list[dict]) -> tuple[np.ndarray, float]:
    """Arc length (mm) of the body centres from the top of C1, and the total length."""
    s_pos = []
    cur = 0.0
    for d in dims:
        cur += d["h"] / 2
        s_pos.append(cur)
        cur += d["h"] / 2 + d["disc"]
    return np.array(s_pos), cur


def _arc_of(names: list[tuple[str, int, str]], s_pos: np.ndarray, name: str):
    """Arc position (mm) of the named segment's body centre."""
    return s_pos[[n for n, _, _ in names].index(name)]


def _sagittal_knots(spec: CaseSpec, names: list[tuple[str, int, str]], s_pos: np.ndarray, rng) -> list[tuple]:
    """Sagittal angle knots ``(arc position mm, angle deg)``; + = going caudally towards anterior."""

    def pos_of(name):
        return _arc_of(names, s_pos, name)

    lor, kyph = spec.lordosis, spec.kyphosis
    jit = lambda sd: rng.normal(0, sd)  # noqa: E731
    last_l = f"L{spec.n_lumbar}"
    last_t = f"T{spec.n_thoracic}"
    sac = [n for n, _, r in names if r == "sacral"]
    knots = [
        (pos_of("C1"), 12 * lor + jit(3)),
        (pos_of("C4"), 0.0),
        (pos_of("C7"), -16 * lor + jit(3)),
        (pos_of("T1"), -15 * kyph),
        (pos_of(f"T{max(6, spec.n_thoracic // 2)}"), 2 * kyph + jit(3)),
        (pos_of(last_t), 18 * kyph + jit(3)),
        (pos_of("L1"), 16 * lor),
        (pos_of("L3"), 0.0 + jit(3)),
        (pos_of(last_l), -24 * lor + jit(3)),
        (pos_of(sac[0]), -42 * lor + jit(4)),
        (pos_of(sac[-2]), -15.0),
        (pos_of(sac[-1]), 0.0),
        (pos_of("Co3"), 35.0),
    ]
    return knots


def _centre_line(spec: CaseSpec, names: list[tuple[str, int, str]], s_pos: np.ndarray, total: float,
                 knots: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The body centre line sampled every mm of arc from C1: ``(path, dirs, lat)``, the points
    (mm, C1 at the origin), the unit caudal directions and the scoliotic lateral deviation."""
    ks, ka = zip(*knots, strict=True)
    grid = np.arange(0.0, total + 1.0, 1.0)
    theta = np.radians(np.interp(grid, ks, ka))
    # scoliosis: lateral sine between T2 and L4-ish, with axial rotation at the apex
    sa_, sb_ = _arc_of(names, s_pos, "T3"), _arc_of(names, s_pos, f"L{min(4, spec.n_lumbar)}")
    lat = np.zeros_like(grid)
    inside = (grid > sa_) & (grid < sb_)
    lat[inside] = spec.scoliosis_mm * np.sin(np.pi * (grid[inside] - sa_) / (sb_ - sa_))
    dlat = np.gradient(lat, grid)
    dirs = np.stack([dlat, np.sin(theta), -np.cos(theta)], axis=1)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    path = np.cumsum(dirs, axis=0) * 1.0
    path -= path[0]
    return path, dirs, lat


def _place_in_world(spec: CaseSpec, names: list[tuple[str, int, str]], s_pos: np.ndarray, path: np.ndarray,
                    rng) -> np.ndarray:
    """World placement: L3 body centre at (0, -y_off, z_l3); random couch position in z."""
    i_l3 = int(round(_arc_of(names, s_pos, "L3")))
    origin = path[i_l3].copy()
    return path - origin + np.array([0.0, -28.0 * spec.body_scale ** 0.3, float(rng.uniform(-260, -140))])


def _make_segments(spec: CaseSpec, names: list[tuple[str, int, str]], s_pos: np.ndarray, dims: list[dict],
                   path: np.ndarray, dirs: np.ndarray, lat: np.ndarray) -> list[Segment]:
    """One :class:`Segment` per name: centre on the path, frame from the centre-line direction
    (v kept anterior), rotated axially with the scoliosis."""
    segments = []
    for (nm, lab, reg), sp, d in zip(names, s_pos, dims, strict=True):
        gi = int(round(sp))
        c = path[gi].copy()
        w = -dirs[gi]
        v = np.array([0.0, 1.0, 0.0]) - w[1] * w
        v /= np.linalg.norm(v)
        u = np.cross(v, w)
        rot = 0.0
        if spec.scoliosis_mm:
            rot = math.radians(8.0) * (lat[gi] / spec.scoliosis_mm)
        cr, sr = math.cos(rot), math.sin(rot)
        u, v = cr * u + sr * v, -sr * u + cr * v
        segments.append(Segment(nm, lab, reg, c, np.stack([u, v, w], axis=1), d))
    return segments


def _body_params(spec: CaseSpec, rng, s: float) -> dict:
    """Body, bone and organ parameters drawn for the patient (fat mm, HU, scales, texture seed)."""
    bs = spec.body_scale
    p = dict(
        s=s,
        fat=float(np.clip(rng.normal(14.0, 3.0) * bs ** 2.2, 4.0, 60.0)),
        visceral_fat=float(np.clip(0.25 * bs ** 2, 0.08, 0.7)),
        cort_hu=float(rng.uniform(850, 1150)),
        canc_hu=float(np.clip(rng.uniform(190, 270) * spec.bone_density, 120, 330)),
        cort_t=float(rng.uniform(1.0, 1.4)),
        lean_w=float(rng.normal(1.0, 0.05)),
        liver_hu=float(rng.uniform(52, 66)),
        head_scale=float(rng.normal(1.0, 0.04)),
        rib_drop=float(rng.uniform(0.8, 1.2)),
        tex_seed=int(rng.integers(0, 2 ** 31 - 1)),
    )
    return p


def _landmarks(spec: CaseSpec, names: list[tuple[str, int, str]], segments: list[Segment], s: float) -> dict:
    """World z (mm) of the landmarks the body profile and the fields of view use."""
    last_l = f"L{spec.n_lumbar}"
    last_t = f"T{spec.n_thoracic}"
    sac = [n for n, _, r in names if r == "sacral"]
    byname = {sg.name: sg for sg in segments}
    lm = dict(
        z_c1=byname["C1"].center[2],
        z_t1=byname["T1"].center[2],
        z_tlast=byname[last_t].center[2],
        z_l1=byname["L1"].center[2],
        z_llast=byname[last_l].center[2],
        z_sac_top=byname[sac[0]].center[2] + byname[sac[0]].d["h"] / 2,
        z_s1=byname[sac[0]].center[2],
        z_coccyx=byname["Co3"].center[2],
    )
    lm["z_diaphragm"] = byname[f"T{spec.n_thoracic - 2}"].center[2]
    lm["z_hip"] = lm["z_coccyx"] - 5.0 * s
    lm["z_skull_top"] = lm["z_c1"] + 150.0 * s
    return lm


def to_world(sg: Segment, p) -> np.ndarray:
    return sg.center + sg.frame @ np.asarray(p, float)


def local_box(sg: Segment, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box of a box given in a segment's local (u, v, w) frame."""
    corners = [(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    return box_around([to_world(sg, c) for c in corners], 1.0)


def body_profile(anat: Anatomy, spec: CaseSpec, z: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice body outline parameters (mm) at world z positions.

    Returns arrays over ``z``: ``W``/``D`` lean (muscle-bounded) half-width/half-depth, ``fat``
    subcutaneous fat thickness, ``yc``/``xc`` the centre of the outline, ``back`` the
    posterior lean surface, ``spine_x``/``spine_y`` the vertebral body centre line.
    """
    lm = anat.landmarks
    seg = anat.segments
    zc = np.array([sg.center[2] for sg in seg])[::-1]
    yc = np.array([sg.center[1] for sg in seg])[::-1]
    xc = np.array([sg.center[0] for sg in seg])[::-1]
    spine_y = np.interp(z, zc, yc)
    spine_x = np.interp(z, zc, xc)
    fat = anat.params["fat"]
    lw = anat.params["lean_w"]
    # knots: z, lean half-width, lean half-depth, lean depth behind the vertebral body centre
    knots = [
        (lm["z_hip"] - 150, 150, 85, 70), (lm["z_hip"] - 40, 165, 95, 75), (lm["z_hip"], 165, 100, 65),
        (lm["z_s1"], 160, 100, 60), (lm["z_llast"], 138, 95, 78), (lm["z_l1"], 133, 95, 74),
        (lm["z_diaphragm"], 140, 105, 68), (0.5 * (lm["z_t1"] + lm["z_diaphragm"]), 142, 108, 62),
        (lm["z_t1"] - 5, 150, 95, 60), (lm["z_t1"] + 14, 138, 80, 60), (lm["z_t1"] + 32, 68, 58, 62),
        (lm["z_c1"] - 50, 56, 58, 62),
        (lm["z_c1"] - 30, 64, 84, 62), (lm["z_c1"] + 10, 68, 92, 60), (lm["z_c1"] + 70, 72, 95, 58),
        (lm["z_skull_top"], 45, 55, 45),
    ]
    knots.sort(key=lambda k: k[0])
    kz, kw, kd, kb = (np.asarray(c, float) for c in zip(*knots, strict=True))
    W = np.interp(z, kz, kw) * lw
    D = np.interp(z, kz, kd) * lw
    back = spine_y - np.interp(z, kz, kb) * lw
    # subcutaneous fat thinner on the neck and head
    fat_z = fat * np.interp(z, [lm["z_t1"], lm["z_t1"] + 40], [1.0, 0.3])
    # the back is flattened at 0.93 of the depth: place the centre so the back sits at ``back``
    yc_out = back + 0.93 * D
    return dict(W=W, D=D, yc=yc_out, xc=spine_x * 0.3, spine_y=spine_y, spine_x=spine_x, fat=fat_z,
                back=back, top=np.full_like(z, lm["z_skull_top"]))
