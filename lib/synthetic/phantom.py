"""Synthetic spine CT: a seeded anatomical phantom in Hounsfield units with vertebra labels.

``generate_case(CaseSpec(...))`` returns a CT volume (int16 HU), its vertebra label map
(:mod:`lib.labels` values), the RAS affine and the label centroids. The anatomy is built from
signed-distance primitives in world millimetres, so the same patient can be sampled on any
grid: a coarse synthetic grid (2 mm) or paper scale (512 x 512, 0.75 mm).

What is modelled (and why it matters downstream):

* Vertebrae C1..C7, T1..T11/12/13 (T13 = label 28), L1..L4/5/6 (L6 = label 25). Size grows
  craniocaudally; C1 is a ring without a body, C2 carries the dens; each vertebra has a body
  with a cortical shell (~700-1200 HU) around textured cancellous bone (~150-300 HU, well
  above soft tissue so bodies read as filled bone), pedicles and laminae around the spinal
  canal, articular processes (facet joints), transverse and spinous processes.
* Intervertebral discs (~80-110 HU) between bodies: the dark gaps a model uses to separate
  levels, and what thick slices blur.
* Ribs on every thoracic vertebra and only there (the counting landmark from above), stump
  ribs as a variant; sternum, clavicles, scapulae.
* Sacrum (plus the fused L5 segment in lumbar sacralization, minus S1 in sacral
  lumbarization), coccyx, iliac wings, acetabula, femora: bone, unlabelled (the landmark
  from below, and the source of false positives).
* Skull base and vault above C1, mandible.
* Body outline with subcutaneous fat, muscle (paraspinal, psoas, abdominal wall), lungs,
  heart, great vessels (contrast phase), liver, spleen, kidneys, bowel, bladder, airway,
  gas-filled colon for colonography (with a fluid level that follows gravity), patient table.
* Acquisition: in-plane and z spacing, slice thickness simulated by averaging thin slices
  along z (not by dropping slices), correlated noise, metal implants with streaks.

Conventions: arrays are ``(x, y, z)`` in RAS+ voxel order (the index grows towards the
patient's Right, Anterior, Superior); world coordinates are millimetres, RAS. CT is int16 HU clipped to
[-1024, 3071]; masks are uint8.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import ndimage

from lib.core import labels as L

# ----------------------------------------------------------------------------- spec

FOVS = ("neck", "chest", "abdomen", "whole", "verse_crop")
CONTRAST_PHASES = ("native", "arterial", "portal")
POSITIONS = ("supine", "prone")

HU_MIN, HU_MAX = -1024, 3071

# tissue classes of :attr:`PhantomCase.tissue`
TISSUES = {
    0: "air", 1: "fat", 2: "muscle", 3: "soft_organ", 4: "lung", 5: "gas", 6: "blood",
    7: "fluid", 8: "disc", 9: "cortical_bone", 10: "cancellous_bone", 11: "metal",
    12: "table", 13: "cartilage", 14: "brain",
}
T_AIR, T_FAT, T_MUSCLE, T_ORGAN, T_LUNG, T_GAS, T_BLOOD, T_FLUID, T_DISC = range(9)
T_CORT, T_CANC, T_METAL, T_TABLE, T_CART, T_BRAIN = range(9, 15)


@dataclass(frozen=True)
class CaseSpec:
    """Everything that defines one synthetic case. Deterministic from ``seed``.

    Attributes:
        seed: patient seed; anatomy draws depend only on it (and the counts/curvature), so
            the same seed on another grid or field of view is the same patient.
        n_thoracic: 11, 12 or 13 thoracic vertebrae (13 -> T13 = label 28).
        n_lumbar: 4, 5 or 6 lumbar vertebrae. 6 = sacral lumbarization (L6 = label 25);
            4 = lumbar sacralization (L5 fused into the sacrum, unlabelled, no label 24).
        sacralization: the last lumbar vertebra is transitional: broad, wing-like transverse
            processes that nearly touch the sacral alae (Castellvi-like), disc kept.
        fov: ``neck`` (skull base to upper chest), ``chest`` (lung apex to L1/L2),
            ``abdomen`` (T10/T11 to below the hips), ``whole`` (skull base to hips),
            ``verse_crop`` (small in-plane FOV centred on the spine, a run of levels).
        spacing_mm: (x, y, z) voxel spacing in mm.
        slice_thickness_mm: reconstructed thickness (box profile along z); None = z spacing.
        noise_hu: standard deviation of the (in-plane correlated) image noise, HU.
        contrast_phase: ``native``, ``arterial`` or ``portal``.
        metal: posterior spinal fusion (pedicle screws and rods) with streak artefacts.
        body_scale: 0.8 (slim) .. 1.4 (obese): subcutaneous and visceral fat, body outline.
        lordosis, kyphosis: multipliers of the normal cervical/lumbar lordosis and thoracic
            kyphosis angles (1 = average adult).
        scoliosis_mm: lateral deviation of the thoracolumbar apex (mm); 0 = straight.
        stump_ribs: the last rib pair is a short stump (3-5 cm).
        colon_gas: insufflated colon (CT colonography).
        position: ``supine`` or ``prone`` (table side, fluid levels; geometry stays in
            patient coordinates).
        fov_xy_mm: square in-plane field of view (mm); None = by ``fov`` and body size.
        fov_center_offset_mm: (x, y) shift of the in-plane FOV centre from its default.
        z_range_mm: explicit (inferior, superior) world z extent; None = by ``fov``.
        crop_levels: for ``verse_crop``: (first, last) label of the run of vertebrae to
            include; None = drawn from the seed.
        bone_density: multiplier of cancellous HU (0.6 osteoporotic .. 1.2 dense).
        scan_seed: acquisition seed: FOV jitter, noise and streaks. Two scans of one patient
            (prone/supine, time points) share ``seed`` and differ in ``scan_seed``.
        lung_opacity: fraction (0..0.5) of lung with ground-glass opacities (COVID-19 scans).
        center_on_spine: centre the in-plane FOV on the spine instead of the body (spine
            reconstructions such as VerSe's complete scans; use with ``fov_xy_mm``).
    """

    seed: int = 0
    n_thoracic: int = 12
    n_lumbar: int = 5
    sacralization: bool = False
    fov: str = "whole"
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    slice_thickness_mm: float | None = None
    noise_hu: float = 12.0
    contrast_phase: str = "native"
    metal: bool = False
    body_scale: float = 1.0
    lordosis: float = 1.0
    kyphosis: float = 1.0
    scoliosis_mm: float = 0.0
    stump_ribs: bool = False
    colon_gas: bool = False
    position: str = "supine"
    fov_xy_mm: float | None = None
    fov_center_offset_mm: tuple[float, float] = (0.0, 0.0)
    z_range_mm: tuple[float, float] | None = None
    crop_levels: tuple[int, int] | None = None
    bone_density: float = 1.0
    scan_seed: int = 0
    lung_opacity: float = 0.0
    center_on_spine: bool = False

    def __post_init__(self):
        errors = []
        if self.n_thoracic not in (11, 12, 13):
            errors.append(f"n_thoracic={self.n_thoracic} (expected 11, 12 or 13)")
        if self.n_lumbar not in (4, 5, 6):
            errors.append(f"n_lumbar={self.n_lumbar} (expected 4, 5 or 6)")
        if self.fov not in FOVS:
            errors.append(f"fov={self.fov!r} (expected one of {FOVS})")
        if self.contrast_phase not in CONTRAST_PHASES:
            errors.append(f"contrast_phase={self.contrast_phase!r} (expected one of {CONTRAST_PHASES})")
        if self.position not in POSITIONS:
            errors.append(f"position={self.position!r} (expected one of {POSITIONS})")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            errors.append(f"spacing_mm={self.spacing_mm} (expected three positive mm values)")
        if self.slice_thickness_mm is not None and self.slice_thickness_mm <= 0:
            errors.append(f"slice_thickness_mm={self.slice_thickness_mm} (expected > 0)")
        if not 0.5 <= self.body_scale <= 2.0:
            errors.append(f"body_scale={self.body_scale} (expected 0.5..2.0)")
        if self.noise_hu < 0:
            errors.append(f"noise_hu={self.noise_hu} (expected >= 0)")
        if errors:
            raise ValueError("invalid CaseSpec: " + "; ".join(errors))

    @property
    def variant(self) -> str:
        """``normal``, ``L6`` (sacral lumbarization), ``L5_missing`` (lumbar sacralization),
        ``T11`` / ``T13`` (thoracic count), joined by ``+`` when several apply."""
        parts = []
        if self.n_lumbar == 6:
            parts.append("L6")
        elif self.n_lumbar == 4:
            parts.append("L5_missing")
        if self.n_thoracic != 12:
            parts.append(f"T{self.n_thoracic}")
        return "+".join(parts) or "normal"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhantomCase:
    """One generated case.

    Attributes:
        ct: int16 HU, shape (x, y, z), RAS+ voxel order.
        mask: uint8 vertebra labels (0 background), same shape.
        affine: 4x4 voxel -> world (RAS, mm).
        centroids: {label: (x, y, z) world mm}, centre of mass of each label in ``mask``.
        spec: the spec it was generated from.
        tissue: uint8 tissue class per voxel (:data:`TISSUES`), at the slice centres.
        ribs: uint8, the label of the vertebra a rib voxel belongs to (0 elsewhere); ribs
            are bone in ``ct`` but unlabelled in ``mask``.
        info: anatomy facts for tests and the oracle: ``rib_levels`` (labels carrying ribs),
            ``levels`` (name -> label, body centre world mm), ``labels_expected`` (labels the
            anatomy has, in or out of the FOV).
    """

    ct: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    centroids: dict[int, tuple[float, float, float]]
    spec: CaseSpec
    tissue: np.ndarray
    ribs: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))


# ----------------------------------------------------------------------------- SDF helpers
# All distances are in mm; negative inside. Inputs are float32 arrays that broadcast.


def _length(*c):
    s = c[0] * c[0]
    for x in c[1:]:
        s = s + x * x
    return np.sqrt(s)


def _sd_ellipse(u, v, a, b):
    """Approximate signed distance to an axis-aligned ellipse with semi-axes a, b (IQ bound)."""
    k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    k1 = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _sd_ellipsoid(u, v, w, a, b, c):
    k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
    k1 = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2 + (w / (c * c)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _extrude(d2, dz):
    """Combine an in-plane distance and an axial distance into a solid (exact for extrusions)."""
    return np.minimum(np.maximum(d2, dz), 0.0) + np.sqrt(np.maximum(d2, 0.0) ** 2 + np.maximum(dz, 0.0) ** 2)


def _sd_segment(px, py, pz, a, b):
    """Distance from points to the segment a-b (world mm)."""
    ba = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    bb = float(ba @ ba) or 1e-9
    ax, ay, az = (px - a[0]), (py - a[1]), (pz - a[2])
    h = np.clip((ax * ba[0] + ay * ba[1] + az * ba[2]) / bb, 0.0, 1.0)
    return _length(ax - ba[0] * h, ay - ba[1] * h, az - ba[2] * h)


# ----------------------------------------------------------------------------- anatomy model


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

    dims: list[dict] = []
    counts = {"cervical": 7, "thoracic": spec.n_thoracic, "lumbar": spec.n_lumbar}
    idx_in = {"cervical": 0, "thoracic": 0, "lumbar": 0, "sacral": 0, "coccygeal": 0}
    for _nm, _lab, reg in names:
        k = idx_in[reg]
        idx_in[reg] += 1
        if reg == "cervical":
            f = max(0, k - 2) / 4.0
            d = _dims_for("cervical", f, rng, s)
            if k == 0:  # C1: ring, no body
                d.update(h=10.0 * s, disc=3.0 * s)
            elif k == 1:  # C2 with dens
                d.update(h=19.0 * s, a=9.0 * s, b=8.0 * s, ls=26.0 * s, rs=4.5)
        elif reg == "thoracic":
            n = counts["thoracic"]
            f = k / 11.0 if n <= 12 else min(k / 11.0, 1.0 + (k - 11) * 0.05)
            if n == 11:
                f = k / 10.0
            d = _dims_for("thoracic", min(f, 1.05), rng, s)
        elif reg == "lumbar":
            n = counts["lumbar"]
            f = min(k, 4) / 4.0
            d = _dims_for("lumbar", f, rng, s)
            if k == 5:  # L6: L5-like, a bit lower, broad processes
                d.update(h=d["h"] * 0.95, lt=31.0 * s, rt=7.0)
            if spec.sacralization and k == n - 1:
                d.update(lt=42.0 * s, rt=9.0, tu=math.radians(-12), tb=math.radians(-5))
        elif reg == "sacral":
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
        else:
            c = [6.0, 4.5, 3.5][k]
            d = dict(a=c * s, b=c * 0.8 * s, h=c * 1.3 * s, disc=2.0 * s)
        d["s"] = s
        dims.append(d)

    # arc length of body centres from the top of C1
    s_pos = []
    cur = 0.0
    for d in dims:
        cur += d["h"] / 2
        s_pos.append(cur)
        cur += d["h"] / 2 + d["disc"]
    s_pos = np.array(s_pos)
    total = cur

    # sagittal angle knots (deg; + = going caudally towards anterior)
    def pos_of(name):
        return s_pos[[n for n, _, _ in names].index(name)]

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
    ks, ka = zip(*knots, strict=True)
    grid = np.arange(0.0, total + 1.0, 1.0)
    theta = np.radians(np.interp(grid, ks, ka))
    # scoliosis: lateral sine between T2 and L4-ish, with axial rotation at the apex
    sa_, sb_ = pos_of("T3"), pos_of(f"L{min(4, spec.n_lumbar)}")
    lat = np.zeros_like(grid)
    inside = (grid > sa_) & (grid < sb_)
    lat[inside] = spec.scoliosis_mm * np.sin(np.pi * (grid[inside] - sa_) / (sb_ - sa_))
    dlat = np.gradient(lat, grid)
    dirs = np.stack([dlat, np.sin(theta), -np.cos(theta)], axis=1)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    path = np.cumsum(dirs, axis=0) * 1.0
    path -= path[0]

    # world placement: L3 body centre at (0, -y_off, z_l3); random couch position in z
    i_l3 = int(round(pos_of("L3")))
    origin = path[i_l3].copy()
    path = path - origin + np.array([0.0, -28.0 * spec.body_scale ** 0.3, float(rng.uniform(-260, -140))])

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

    # body / organ parameters
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
    return Anatomy(segments, p, lm)


# ----------------------------------------------------------------------------- body profile


def _body_profile(anat: Anatomy, spec: CaseSpec, z: np.ndarray) -> dict[str, np.ndarray]:
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


def _noise_grid(seed: int, cell: float, xs, ys, zs) -> np.ndarray:
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


def _noise_points(seed: int, cell: float, x, y, z) -> np.ndarray:
    """:func:`_noise_grid` evaluated at scattered points (same field)."""
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


# ----------------------------------------------------------------------------- rendering


class _Canvas:
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


def _local(X, Y, Z, c, F):
    """World -> segment-local (u, v, w) coordinates."""
    dx, dy, dz = X - np.float32(c[0]), Y - np.float32(c[1]), Z - np.float32(c[2])
    u = dx * np.float32(F[0, 0]) + dy * np.float32(F[1, 0]) + dz * np.float32(F[2, 0])
    v = dx * np.float32(F[0, 1]) + dy * np.float32(F[1, 1]) + dz * np.float32(F[2, 1])
    w = dx * np.float32(F[0, 2]) + dy * np.float32(F[1, 2]) + dz * np.float32(F[2, 2])
    return u, v, w


def _to_world(sg: Segment, p) -> np.ndarray:
    return sg.center + sg.frame @ np.asarray(p, float)


def _local_box(sg: Segment, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box of a box given in a segment's local (u, v, w) frame."""
    corners = [(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    return _box_around([_to_world(sg, c) for c in corners], 1.0)


def _box_around(points, r):
    pts = np.asarray(points, float).reshape(-1, 3)
    return pts.min(0) - r, pts.max(0) + r


class _BoneTable:
    """Per-object bone parameters: label, cortical HU, cancellous HU, cortex thickness."""

    def __init__(self):
        self.rows = [(0, 0.0, 0.0, 1.0, 0)]  # id 0 unused

    def add(self, label, cort, canc, t, rib_level=0):
        self.rows.append((label, cort, canc, t, rib_level))
        if len(self.rows) > 255:
            raise RuntimeError("too many bone objects")
        return len(self.rows) - 1

    def arrays(self):
        a = np.array(self.rows, np.float32)
        return a[:, 0].astype(np.uint8), a[:, 1], a[:, 2], a[:, 3], a[:, 4].astype(np.uint8)


def _vertebra_parts(sg: Segment, disc_above: float, disc_below: float):
    """List of (kind, params) primitives in the segment's local frame for a C2..L6 vertebra."""
    d = sg.d
    a, b, h = d["a"], d["b"], d["h"]
    cw, cd, t = d["cw"], d["cd"], d["t"]
    vc = -0.85 * b - cd  # canal centre
    ha = d["ha"] * h
    wa0 = 0.08 * h
    parts = []
    # spinous process
    v0 = vc - cd - 0.6 * t
    w0 = wa0 - d["shear"] * (cd + 0.6 * t)
    sa = d["sa"]
    tip = (0.0, v0 - d["ls"] * math.cos(sa), w0 - d["ls"] * math.sin(sa))
    if sg.region == "lumbar":
        parts.append(("plate", dict(p0=(v0 + 2, w0), p1=(tip[1], tip[2]), hs=d["hs"] * 0.5 + 2, th=3.0)))
    elif sg.region == "cervical" and sg.name not in ("C7",):
        for sgn in (-1, 1):
            parts.append(("capsule", dict(p0=(0.0, v0 + 2, w0), p1=(sgn * 4.0, tip[1], tip[2]), r=d["rs"])))
    else:
        parts.append(("capsule", dict(p0=(0.0, v0 + 2, w0), p1=tip, r=d["rs"])))
    # transverse processes
    for sgn in (-1, 1):
        root = (sgn * (cw + 0.5 * t), vc + 0.2 * cd, wa0)
        tb, tu, lt = d["tb"], d["tu"], d["lt"]
        end = (root[0] + sgn * lt * math.cos(tb) * math.cos(tu), root[1] - lt * math.sin(tb), root[2] + lt * math.sin(tu))
        if sg.region == "cervical":
            ant = (sgn * (0.85 * a), 0.1 * b, 0.0)
            tipc = (sgn * (a + lt * 0.55), -0.2 * b, 0.0)
            parts.append(("capsule", dict(p0=ant, p1=tipc, r=d["rt"])))
            parts.append(("capsule", dict(p0=root, p1=tipc, r=d["rt"])))
        else:
            parts.append(("capsule", dict(p0=root, p1=end, r=d["rt"])))
        # articular processes: superior lateral-anterior, inferior medial-posterior
        up = h / 2 + 0.8 * disc_above
        dn = -h / 2 - 0.8 * disc_below
        parts.append(("capsule", dict(p0=(sgn * (cw + 0.75 * t), vc - 0.1 * cd, wa0 + 0.2 * ha),
                                      p1=(sgn * (cw + 0.85 * t), vc - 0.25 * cd, up), r=d["rf"])))
        parts.append(("capsule", dict(p0=(sgn * (cw + 0.2 * t), vc - 0.7 * cd - 1.0, wa0 - 0.2 * ha),
                                      p1=(sgn * (cw + 0.1 * t), vc - 0.9 * cd - 2.5, dn), r=d["rf"] * 0.9)))
    return parts, dict(vc=vc, ha=ha, wa0=wa0, tip=tip)


def _sdf_vertebra(sg: Segment, u, v, w, parts, geo):
    """Union SDF of one vertebra (C2..L6) in local coordinates."""
    d = sg.d
    a, b, h = d["a"], d["b"], d["h"]
    cw, cd, t = d["cw"], d["cd"], d["t"]
    vc, ha, wa0 = geo["vc"], geo["ha"], geo["wa0"]
    # body: waisted elliptic cylinder, flattened posterior wall, concave endplates, rounded rims
    rad2 = (u / a) ** 2 + (v / b) ** 2
    waist = 1.0 - 0.07 * (1.0 - np.minimum((2.0 * w / h) ** 2, 1.0))
    d2 = np.maximum(_sd_ellipse(u, v, a * waist, b * waist), -(v + 0.85 * b))
    dz = np.abs(w) - h / 2 + 0.9 * np.maximum(1.0 - rad2, 0.0)
    r = 1.5
    sd = _extrude(d2 + r, dz + r) - r
    # posterior arch ring around the canal, sheared so laminae slope caudally
    wl = w - (wa0 + d["shear"] * np.minimum(v - vc, 0.0))
    ring = np.maximum(_sd_ellipse(u, v - vc, cw + t, cd + t), -_sd_ellipse(u, v - vc, cw, cd))
    ring = np.maximum(ring, v - (vc + cd + t * 0.5 + 2.0))
    arch = _extrude(ring, np.abs(wl) - ha / 2)
    sd = np.minimum(sd, arch)
    for kind, p in parts:
        if kind == "capsule":
            sd = np.minimum(sd, _sd_segment(u, v, w, p["p0"], p["p1"]) - p["r"])
        else:  # plate: 2D capsule in (v, w) extruded in u
            d2p = _sd_segment(np.float32(0), v, w, (0, *p["p0"]), (0, *p["p1"])) - p["hs"]
            sd = np.minimum(sd, _extrude(d2p, np.abs(u) - p["th"]))
    # keep the canal open
    canal = _sd_ellipse(u, v - vc, cw, cd)
    sd = np.maximum(sd, -canal)
    if sg.name == "C2":
        sd = np.minimum(sd, _sd_segment(u, v, w, (0, 0.5, h / 2 - 3), (0, 1.0, h / 2 + 14 * anat_scale(sg))) - 5.0 * anat_scale(sg))
    return sd


def anat_scale(sg: Segment) -> float:
    return sg.d.get("s", 1.0)


def _sdf_atlas(sg: Segment, u, v, w):
    """C1: anterior arch, lateral masses, posterior arch, transverse processes; no body."""
    s = sg.d.get("s", 1.0)
    vr = -5.0 * s
    ring = np.maximum(_sd_ellipse(u, v - vr, 23.0 * s, 19.0 * s), -_sd_ellipse(u, v - vr, 18.5 * s, 14.5 * s))
    hgt = np.where(v > 0, 5.0, 4.0) * s
    sd = _extrude(ring, np.abs(w) - hgt)
    for sgn in (-1, 1):
        sd = np.minimum(sd, _sd_ellipsoid(u - sgn * 18.5 * s, v + 1.5 * s, w, 6.5 * s, 9.0 * s, 8.0 * s))
        sd = np.minimum(sd, _sd_segment(u, v, w, (sgn * 22 * s, -3 * s, 0), (sgn * 36 * s, -5 * s, 1)) - 3.8 * s)
    sd = np.minimum(sd, _sd_ellipsoid(u, v + 25.0 * s, w, 5.0 * s, 4.0 * s, 5.0 * s))  # posterior tubercle
    return sd


def _sdf_sacral(sg: Segment, u, v, w):
    """One sacral segment: body + alae (S1-S3 / fused L5) + posterior plate with sacral canal."""
    d = sg.d
    a, b, h = d["a"], d["b"], d["h"]
    q = d["q"]
    # segments overlap their neighbours so the fused sacrum reads as one bone; only the top
    # of the first segment keeps a flat endplate facing the lumbosacral disc
    up = h / 2 if d.get("first") else h / 2 + d["disc"] + 4.0
    dn = h / 2 + d["disc"] + (4.0 if not d.get("last") else 0.0)
    dz = np.maximum(w - up, -w - dn)
    sd = _extrude(_sd_ellipse(u, v, a, b) + 1.0, dz + 1.0) - 1.0
    # posterior plate (laminae fused) with canal
    vc = -b - 5.0
    plate = _extrude(np.maximum(_sd_ellipse(u, v - vc, a * 0.95, 8.0), -_sd_ellipse(u, v - vc, a * 0.45, 3.5)),
                     np.maximum(w - up + 3.0, -w - dn))
    sd = np.minimum(sd, plate)
    sd = np.minimum(sd, _sd_segment(u, v, w, (0, vc - 6, h / 2), (0, vc - 9, -h / 2)) - 3.0)  # median crest
    if q <= 2 or d.get("fused_l5"):
        wing = 26.0 - 6.0 * max(q, 0)
        if d.get("fused_l5"):
            wing = 30.0
        for sgn in (-1, 1):
            sd = np.minimum(sd, _extrude(_sd_ellipse(u - sgn * (a + wing * 0.55), v + 3.0, wing * 0.75, b * 1.1) + 2,
                                         np.abs(w) - h / 2 - d["disc"] * 0.7 + 2) - 2)
    return sd


def _render_spine(cv: _Canvas, anat: Anatomy, bt: _BoneTable, info: dict):
    p = anat.params
    cort, canc, ct_ = p["cort_hu"], p["canc_hu"], p["cort_t"]
    segs = anat.segments
    for i, sg in enumerate(segs):
        prev_disc = segs[i - 1].d["disc"] if i > 0 else 0.0
        nxt_disc = sg.d["disc"]
        if sg.region in ("cervical", "thoracic", "lumbar"):
            oid = bt.add(sg.label, cort, canc, ct_ if sg.region != "cervical" else ct_ * 0.9)
            if sg.name == "C1":
                R = 42.0 * p["s"]
                lo, hi = sg.center - R, sg.center + R
                cv.bone(lo, hi, lambda X, Y, Z, sg=sg: _sdf_atlas(sg, *_local(X, Y, Z, sg.center, sg.frame)), oid)
                continue
            parts, geo = _vertebra_parts(sg, disc_above=prev_disc, disc_below=nxt_disc)
            pts = [(0, 0, 0), (sg.d["a"], sg.d["b"], sg.d["h"] / 2), (-sg.d["a"], -sg.d["b"], -sg.d["h"] / 2)]
            for _k, pp in parts:
                if "p0" in pp and len(pp["p0"]) == 3:
                    pts += [pp["p0"], pp["p1"]]
                elif "p0" in pp:
                    pts += [(pp["th"], *pp["p0"]), (-pp["th"], *pp["p1"])]
            pts.append((0, geo["vc"] - sg.d["cd"] - sg.d["t"], 0))
            if sg.name == "C2":
                pts.append((0, 1, sg.d["h"] / 2 + 16))
            wpts = np.array([_to_world(sg, q) for q in pts])
            lo, hi = _box_around(wpts, 10.0)
            cv.bone(lo, hi, lambda X, Y, Z, sg=sg, parts=parts, geo=geo:
                    _sdf_vertebra(sg, *_local(X, Y, Z, sg.center, sg.frame), parts, geo), oid)
        elif sg.region == "sacral":
            oid = bt.add(0, cort * 0.9, canc * 0.9, ct_)
            d = sg.d
            ext = d["h"] / 2 + d["disc"] + 6.0
            lat = d["a"] + (45.0 if (d["q"] <= 2 or d.get("fused_l5")) else 4.0)
            lo, hi = _local_box(sg, (-lat, -d["b"] - 28.0, -ext), (lat, d["b"] * 1.3 + 4.0, ext))
            cv.bone(lo, hi, lambda X, Y, Z, sg=sg: _sdf_sacral(sg, *_local(X, Y, Z, sg.center, sg.frame)), oid)
        else:
            oid = bt.add(0, cort * 0.8, canc * 0.9, 0.8)
            R = 12.0
            cv.bone(sg.center - R, sg.center + R, lambda X, Y, Z, sg=sg: _extrude(
                _sd_ellipse(*_local(X, Y, Z, sg.center, sg.frame)[:2], sg.d["a"], sg.d["b"]),
                np.abs(_local(X, Y, Z, sg.center, sg.frame)[2]) - sg.d["h"] / 2), oid)


def _render_discs_canal(cv: _Canvas, anat: Anatomy):
    segs = anat.segments
    for up, lo_ in zip(segs[:-1], segs[1:], strict=True):
        if up.region in ("sacral", "coccygeal") and lo_.region == "sacral":
            continue
        if up.name == "C1":
            continue
        top = up.center - up.frame[:, 2] * up.d["h"] / 2
        bot = lo_.center + lo_.frame[:, 2] * lo_.d["h"] / 2
        c = 0.5 * (top + bot)
        F = up.frame + lo_.frame
        F = np.linalg.qr(F)[0] * np.sign(np.diag(np.linalg.qr(F)[1]))
        a = 0.5 * (up.d["a"] + lo_.d.get("a", 10)) * 0.98
        b = 0.5 * (up.d["b"] + lo_.d.get("b", 10)) * 0.98
        hh = np.linalg.norm(top - bot) / 2 + 2.5
        R = max(a, b, hh) + 2

        def sdf(X, Y, Z, c=c, F=F, a=a, b=b, hh=hh):
            u, v, w = _local(X, Y, Z, c, F)
            return _extrude(np.maximum(_sd_ellipse(u, v, a, b), -(v + 0.85 * b)), np.abs(w) - hh)

        def tex(X, Y, Z, c=c, F=F, a=a, b=b):
            u, v, _ = _local(X, Y, Z, c, F)
            r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            return 35.0 * np.clip(r, 0, 1) - 15.0  # annulus brighter than nucleus

        cv.paint(c - R, c + R, sdf, 85.0, T_DISC, texture=tex)
    # spinal canal: CSF tube through canal centres
    pts = []
    for sg in segs:
        if sg.region in ("cervical", "thoracic", "lumbar"):
            vc = -0.85 * sg.d["b"] - sg.d["cd"] if sg.name != "C1" else -5.0 * sg.d.get("s", 1.0)
            pts.append((_to_world(sg, (0, vc, 0)), sg.d.get("cd", 7.0) * 0.9))
    for (p0, r0), (p1, _r1) in zip(pts[:-1], pts[1:], strict=True):
        lo, hi = _box_around([p0, p1], r0 + 2)
        cv.paint(lo, hi, lambda X, Y, Z, p0=p0, p1=p1, r0=r0: _sd_segment(X, Y, Z, p0, p1) - r0, 12.0, T_FLUID)


def _rib_paths(anat: Anatomy, spec: CaseSpec):
    """Rib centre-lines (world mm) per thoracic vertebra and side, with cartilage start index."""
    segs = [sg for sg in anat.segments if sg.region == "thoracic"]
    n = len(segs)
    out = []
    p = anat.params
    for i, sg in enumerate(segs):
        d = sg.d
        prof = _body_profile(anat, spec, np.array([sg.center[2]]))
        W, D, yc = float(prof["W"][0]), float(prof["D"][0]), float(prof["yc"][0])
        k = i + 1  # rib number
        grow = math.sin(math.pi / 2 * min(1.0, (k + 0.5) / 7.0))
        Wr = (W - 14.0) * (0.42 + 0.58 * grow)
        post = sg.center[1] - 0.85 * d["b"] - 2 * d["cd"] - 20.0
        Dr = (yc + D - 14.0 - post) / 2 * (0.55 + 0.45 * grow)
        cy = post + Dr
        last = k == n
        if k <= 7:
            phi_end, cart = math.pi - 0.22 - 0.02 * k, 0.78
        elif k <= n - 2:
            phi_end, cart = 2.55 - 0.1 * (k - 8), 0.85
        else:
            phi_end, cart = 1.75 - 0.15 * (k - (n - 1)), 1.01
        if spec.stump_ribs and last:
            phi_end, cart = 0.85, 1.01
        drop = (20.0 + 6.0 * min(k, 8)) * p["rib_drop"] * (0.4 if k == 1 else 1.0)
        geo_tp = None
        for sgn in (-1, 1):
            cw, t, vc = d["cw"], d["t"], -0.85 * d["b"] - d["cd"]
            root = np.array((sgn * (cw + 0.5 * t), vc + 0.2 * d["cd"], 0.08 * d["h"]))
            tb, tu, lt = d["tb"], d["tu"], d["lt"]
            tip = root + np.array((sgn * lt * math.cos(tb) * math.cos(tu), -lt * math.sin(tb), lt * math.sin(tu)))
            head = _to_world(sg, (sgn * (d["a"] + 2.5), -0.45 * d["b"], 0.42 * d["h"]))
            tub = _to_world(sg, tip + np.array((sgn * 1.0, -d["rt"] - 3.0, 0.0)))
            geo_tp = tub
            phi0 = math.asin(min(0.95, abs(tub[0] - sg.center[0]) / Wr)) + 0.05
            phis = np.linspace(phi0, phi_end, 14)
            z0 = tub[2]
            pts = [head, tub]
            for ph in phis:
                fr = (ph - phi0) / max(phi_end - phi0, 1e-3)
                pts.append(np.array((sg.center[0] * 0.5 + sgn * Wr * math.sin(ph), cy - Dr * math.cos(ph),
                                     z0 - drop * fr ** 1.3)))
            pts = np.array(pts)
            cart_from = int(2 + cart * (len(phis) - 1)) if cart <= 1 else len(pts)
            out.append(dict(level=sg.label, side=sgn, pts=pts, cart_from=cart_from,
                            r=(3.8 if k <= 2 else 4.6) * p["s"]))
        del geo_tp
    return out


def _render_ribs_sternum(cv: _Canvas, anat: Anatomy, spec: CaseSpec, bt: _BoneTable, info: dict):
    p = anat.params
    ribs = _rib_paths(anat, spec)
    info["rib_levels"] = sorted({r["level"] for r in ribs}, key=lambda v: L.ordered([v])[0])
    info["rib_levels"] = L.ordered(info["rib_levels"])
    front = []
    for rb in ribs:
        oid = bt.add(0, p["cort_hu"] * 0.75, p["canc_hu"] * 0.9, 0.9, rib_level=rb["level"])
        pts = rb["pts"]
        for j in range(len(pts) - 1):
            a, b = pts[j], pts[j + 1]
            r = rb["r"]
            lo, hi = _box_around([a, b], r + 1.5)
            if j + 1 > rb["cart_from"]:
                cv.paint(lo, hi, lambda X, Y, Z, a=a, b=b, r=r: _sd_segment(X, Y, Z, a, b) - r * 0.85, 120.0, T_CART)
            else:
                cv.bone(lo, hi, lambda X, Y, Z, a=a, b=b, r=r: _sd_segment(X, Y, Z, a, b) - r, oid)
        if rb["cart_from"] < len(pts):
            front.append(pts[-1])
    # sternum: from the first to the seventh costal cartilage ends
    th = [sg for sg in anat.segments if sg.region == "thoracic"]
    if len(front) >= 4:
        f = np.array(front)
        ys = f[:, 1].max() + 2.0
        ztop = th[0].center[2] + 5.0
        zbot = th[min(8, len(th) - 1)].center[2] - 10.0
        oid = bt.add(0, p["cort_hu"] * 0.8, p["canc_hu"] * 0.85, 1.0)
        a = np.array((th[0].center[0] * 0.5, ys - 10.0, ztop))
        b = np.array((th[0].center[0] * 0.5, ys, zbot))

        def sdf(X, Y, Z, a=a, b=b):
            fr = np.clip((Z - b[2]) / (a[2] - b[2]), 0, 1)
            yy = b[1] + (a[1] - b[1]) * fr
            wdt = 13.0 + 10.0 * np.clip((fr - 0.75) * 4, 0, 1)
            d2 = _sd_ellipse(X - a[0], Y - yy, wdt, 6.0)
            return _extrude(d2, np.maximum(Z - a[2], b[2] - Z))

        cv.bone(np.array((a[0] - 30, b[1] - 25, zbot - 2)), np.array((a[0] + 30, b[1] + 15, ztop + 2)), sdf, oid)
        info["sternum"] = (a, b)
    # clavicles and scapulae
    t1 = th[0]
    prof = _body_profile(anat, spec, np.array([t1.center[2] + 12]))
    W = float(prof["W"][0])
    for sgn in (-1, 1):
        oid = bt.add(0, p["cort_hu"] * 0.85, p["canc_hu"], 1.2)
        a = np.array((sgn * 18.0, t1.center[1] + 70.0, t1.center[2] + 2.0))
        m = np.array((sgn * 0.55 * W, t1.center[1] + 55.0, t1.center[2] + 8.0))
        b = np.array((sgn * (W - 18.0), t1.center[1] + 5.0, t1.center[2] + 12.0))
        for q0, q1 in ((a, m), (m, b)):
            lo, hi = _box_around([q0, q1], 8)
            cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: _sd_segment(X, Y, Z, q0, q1) - 5.5, oid)
        # scapula: thin curved plate on the posterior chest wall, T2..T7
        oid = bt.add(0, p["cort_hu"] * 0.8, p["canc_hu"] * 0.9, 1.5)
        zt, zb = th[1].center[2] + 10, th[min(6, len(th) - 1)].center[2]
        cx = sgn * (0.52 * W)
        cy = t1.center[1] - 28.0

        def scap(X, Y, Z, cx=cx, cy=cy, zt=zt, zb=zb, sgn=sgn):
            fr = np.clip((zt - Z) / (zt - zb), 0, 1)
            half = 38.0 * (1 - fr) + 8.0
            xx = cx + sgn * 10 * (1 - fr)
            d_in = np.abs(X - xx) - half
            yy = cy - 0.0035 * (X - xx) ** 2 * -1.0
            return _extrude(np.maximum(d_in, np.maximum(Z - zt, zb - Z)), np.abs(Y - yy) - 3.0)

        cv.bone(np.array((cx - 60, cy - 25, zb - 3)), np.array((cx + 60, cy + 25, zt + 3)), scap, oid)


def _render_pelvis(cv: _Canvas, anat: Anatomy, bt: _BoneTable):
    p = anat.params
    s = p["s"]
    segs = anat.segments
    s1 = [sg for sg in segs if sg.region == "sacral"][0]
    lm = anat.landmarks
    ll = [sg for sg in segs if sg.region == "lumbar"][-1]
    sy = s1.center[1]
    z_hip = lm["z_hip"]
    zc = s1.center[2]
    for sgn in (-1, 1):
        oid = bt.add(0, p["cort_hu"] * 0.85, p["canc_hu"] * 0.85, 1.3)
        c = np.array((sgn * 58.0 * s, sy + 30.0 * s, zc - 18 * s))
        rx, ry, rz = 70.0 * s, 62.0 * s, 78.0 * s
        ztop = ll.center[2] + 5.0

        def ilium(X, Y, Z, c=c, rx=rx, ry=ry, rz=rz, sgn=sgn, ztop=ztop):
            e = _sd_ellipsoid(X - c[0], Y - c[1], Z - c[2], rx, ry, rz)
            shell = np.abs(e + 4.0) - 4.0 - 1.5 * np.clip((c[2] - Z) / 40.0, 0, 1)
            keep = np.maximum(-(X - c[0]) * sgn - 8.0, Z - ztop)
            keep = np.maximum(keep, Y - (c[1] + 0.72 * ry))
            keep = np.maximum(keep, (c[2] - 0.6 * rz) - Z)
            return np.maximum(shell, keep)

        cv.bone(c - np.array((rx + 10, ry + 10, rz + 10)), c + np.array((rx + 10, ry + 10, rz + 10)), ilium, oid)
        # acetabulum rim + femoral head/neck/shaft
        fh = np.array((sgn * 92.0 * s, sy + 68.0 * s, z_hip))
        oid2 = bt.add(0, p["cort_hu"] * 0.9, p["canc_hu"] * 0.85, 1.5)
        cv.bone(fh - 38, fh + 38, lambda X, Y, Z, fh=fh, sgn=sgn: np.maximum(
            np.abs(_length(X - fh[0], Y - fh[1], Z - fh[2]) - 29.0 * s) - 3.5,
            -((X - fh[0]) * -sgn + (Z - fh[2]) * 0.7) - 2), oid)
        troch = fh + np.array((sgn * 38.0, -8.0, -18.0)) * s
        shaft = troch + np.array((sgn * -12.0, 6.0, -320.0))
        oid3 = bt.add(0, p["cort_hu"], p["canc_hu"] * 0.9, 2.5)
        cv.bone(fh - 27, fh + 27, lambda X, Y, Z, fh=fh: _length(X - fh[0], Y - fh[1], Z - fh[2]) - 23.5 * s, oid2)
        for q0, q1, r in ((fh, troch, 14.0), (troch, shaft, 13.0)):
            lo, hi = _box_around([q0, q1], r + 3)
            cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r=r: _sd_segment(X, Y, Z, q0, q1) - r * s, oid3)
        # pubic and ischial rami
        sym_top = np.array((sgn * 6.0, sy + 118.0 * s, z_hip - 5.0))
        sym_bot = np.array((sgn * 7.0, sy + 112.0 * s, z_hip - 38.0))
        isch = np.array((sgn * 62.0 * s, sy + 45.0 * s, z_hip - 48.0))
        ant = fh + np.array((-sgn * 18.0, 22.0, 4.0)) * s
        post = fh + np.array((-sgn * 10.0, -24.0, -18.0)) * s
        for q0, q1, r in ((ant, sym_top, 7.5), (sym_top, sym_bot, 7.5), (sym_bot, isch, 6.5), (post, isch, 10.0)):
            lo, hi = _box_around([q0, q1], r + 3)
            cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r=r: _sd_segment(X, Y, Z, q0, q1) - r, oid)


def _render_skull(cv: _Canvas, anat: Anatomy, bt: _BoneTable):
    p = anat.params
    s = p["s"] * p["head_scale"]
    c1 = anat.segments[0]
    base = c1.center
    oid = bt.add(0, p["cort_hu"] * 1.05, p["canc_hu"] * 1.2, 2.0)
    # vault: ellipsoidal shell above the foramen magnum
    cc = base + np.array((0.0, 22.0 * s, 62.0 * s))
    rx, ry, rz = 72.0 * s, 92.0 * s, 80.0 * s

    def vault(X, Y, Z):
        e = _sd_ellipsoid(X - cc[0], Y - cc[1], Z - cc[2], rx, ry, rz)
        shell = np.abs(e + 3.5) - 3.5
        fm = _length(X - base[0], (Y - base[1] - 2.0) * 0.8) - 15.0 * s  # foramen magnum
        shell = np.maximum(shell, -np.maximum(fm, Z - (base[2] + 40.0)))
        face = np.maximum(Y - cc[1] - 20.0, cc[2] - 25.0 * s - Z)  # open to the face below the brow
        return np.maximum(shell, -face)

    R = np.array((rx, ry, rz)) + 8
    cv.bone(cc - R, cc + R, vault, oid)
    # brain inside
    cv.paint(cc - R, cc + R, lambda X, Y, Z: np.maximum(_sd_ellipsoid(X - cc[0], Y - cc[1], Z - cc[2], rx - 8, ry - 8, rz - 8),
                                                       (cc[2] - 0.55 * rz) - Z), 34.0, T_BRAIN)
    # condyles, petrous ridges, mastoids, clivus
    for sgn in (-1, 1):
        for q0, q1, r in (
            (base + np.array((sgn * 18.5, 1.0, 10.0)) * s, base + np.array((sgn * 17.0, 6.0, 15.0)) * s, 5.5),
            (base + np.array((sgn * 22.0, 12.0, 28.0)) * s, base + np.array((sgn * 52.0, -8.0, 30.0)) * s, 8.0),
            (base + np.array((sgn * 48.0, -12.0, 28.0)) * s, base + np.array((sgn * 50.0, -10.0, 8.0)) * s, 7.0),
        ):
            lo, hi = _box_around([q0, q1], r + 3)
            cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r=r: _sd_segment(X, Y, Z, q0, q1) - r, oid)
    q0, q1 = base + np.array((0, 14.0, 18.0)) * s, base + np.array((0, 32.0, 46.0)) * s
    lo, hi = _box_around([q0, q1], 12)
    cv.bone(lo, hi, lambda X, Y, Z: _sd_segment(X, Y, Z, q0, q1) - 8.0, oid)
    # mandible (U shape) with teeth, hard palate
    oid2 = bt.add(0, p["cort_hu"] * 1.1, p["canc_hu"] * 1.3, 2.0)
    chin = base + np.array((0.0, 88.0, -28.0)) * s
    pts = [base + np.array((sgn * 48.0, 28.0, 22.0)) * s for sgn in (-1,)] + [
        base + np.array((-46.0, 30.0, -18.0)) * s, base + np.array((-30.0, 70.0, -26.0)) * s, chin,
        base + np.array((30.0, 70.0, -26.0)) * s, base + np.array((46.0, 30.0, -18.0)) * s,
        base + np.array((48.0, 28.0, 22.0)) * s]
    for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
        lo, hi = _box_around([q0, q1], 10)
        cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: _sd_segment(X, Y, Z, q0, q1) - 6.5, oid2)
    pal = base + np.array((0.0, 58.0, 8.0)) * s
    cv.bone(pal - 40, pal + 40, lambda X, Y, Z: _extrude(_sd_ellipse(X - pal[0], Y - pal[1], 24.0 * s, 28.0 * s),
                                                         np.abs(Z - pal[2]) - 3.0), oid2)


def _zrange(cv: _Canvas, z_lo: float, z_hi: float) -> slice | None:
    """Slice of block slices with z in [z_lo, z_hi]; None when empty."""
    k = np.nonzero((cv.z >= z_lo) & (cv.z <= z_hi))[0]
    return slice(int(k[0]), int(k[-1]) + 1) if len(k) else None


def _render_soft(cv: _Canvas, anat: Anatomy, spec: CaseSpec, info: dict):
    """Body outline, fat, muscle, organs, lungs, vessels, airway, bowel (painter's order)."""
    p = anat.params
    lm = anat.landmarks
    seed = p["tex_seed"]
    prof = _body_profile(anat, spec, cv.z.astype(float))
    X, Y = cv.X, cv.Y
    f32 = lambda a: np.asarray(a, np.float32)[None, None, :]  # noqa: E731
    W, D, yc, xc, fat = f32(prof["W"]), f32(prof["D"]), f32(prof["yc"]), f32(prof["xc"]), f32(prof["fat"])
    back = f32(prof["back"])
    sy, sx = f32(prof["spine_y"]), f32(prof["spine_x"])
    zz = cv.z
    # outer body (skin) with flattened back; thighs split below the hips
    legs = zz < lm["z_hip"] - 45
    inbody = zz < lm["z_skull_top"]
    Wo, Do = W + fat, D + fat
    ey = (Y - yc) / Do
    r_out = ((X - xc) / Wo) ** 2 + ey * ey
    if legs.any():
        k = np.nonzero(legs)[0]
        kk = slice(int(k[0]), int(k[-1]) + 1)
        r_out[:, :, kk] = ((np.abs(X - xc[:, :, kk]) - 0.5 * Wo[:, :, kk]) / (0.55 * Wo[:, :, kk])) ** 2 + ey[:, :, kk] ** 2
    body = (r_out < 1.0) & (Y > back - fat) & f32(inbody).astype(bool)
    np.copyto(cv.hu, np.float32(-100.0), where=body)
    np.copyto(cv.tissue, np.uint8(T_FAT), where=body)
    # lean compartment (muscle by default)
    eyl = (Y - yc) / D
    r_in = ((X - xc) / W) ** 2 + eyl * eyl
    if legs.any():
        r_in[:, :, kk] = ((np.abs(X - xc[:, :, kk]) - 0.5 * W[:, :, kk]) / (0.55 * W[:, :, kk] - 5)) ** 2 + eyl[:, :, kk] ** 2
    lean = (r_in < 1.0) & (Y > back) & body
    np.copyto(cv.hu, np.float32(48.0), where=lean)
    np.copyto(cv.tissue, np.uint8(T_MUSCLE), where=lean)
    # visceral cavity of abdomen and pelvis (inside the muscle wall): bowel + visceral fat
    ks = _zrange(cv, lm["z_hip"] - 20, lm["z_diaphragm"] + 5)
    if ks is not None:
        wall = 12.0
        Wv, Dv, ycv = W[:, :, ks] - wall, D[:, :, ks] - wall, yc[:, :, ks]
        visc = (((X - xc[:, :, ks]) / Wv) ** 2 + ((Y - ycv - 8.0) / Dv) ** 2 < 1.0) & lean[:, :, ks]
        visc &= Y > sy[:, :, ks] + 5.0
        visc &= ~((np.abs(X - sx[:, :, ks]) < 42.0) & (Y < sy[:, :, ks] + 24.0))
        if visc.any():
            zs = cv.z[ks]
            t = _noise_grid(seed + 1, 15.0, cv.x, cv.y, zs)
            fatty = visc & (t > 1.1 - 2.4 * p["visceral_fat"])
            organ = visc & ~fatty
            hu = cv.hu[:, :, ks]
            tis = cv.tissue[:, :, ks]
            np.copyto(hu, -95.0 + 6.0 * t, where=fatty)
            np.copyto(tis, np.uint8(T_FAT), where=fatty)
            np.copyto(hu, 30.0 + 8.0 * t, where=organ)
            np.copyto(tis, np.uint8(T_ORGAN), where=organ)
            g = _noise_grid(seed + 9, 7.0, cv.x, cv.y, zs)
            gas = organ & (g > 1.45)
            np.copyto(hu, np.float32(-920.0), where=gas)
            np.copyto(tis, np.uint8(T_GAS), where=gas)
    # lungs inside the thoracic cavity, above the diaphragm domes
    th = [sg for sg in anat.segments if sg.region == "thoracic"]
    z_apex = th[0].center[2] + 28.0
    z_dia = lm["z_diaphragm"]
    ks = _zrange(cv, z_dia - 40, z_apex)
    if ks is not None:
        Z = cv.Z[:, :, ks]
        grow = np.clip((z_apex - Z) / 90.0, 0.0, 1.0)
        Wc, Dc, ycc = W[:, :, ks], D[:, :, ks], yc[:, :, ks]
        sxc, syc = sx[:, :, ks], sy[:, :, ks]
        lung = np.zeros(Z.shape[:2] + (Z.shape[2],), bool)
        lung = np.broadcast_to(lung, (len(cv.x), len(cv.y), Z.shape[2])).copy()
        for sgn in (-1.0, 1.0):
            # each lung: an ellipse beside the mediastinum that narrows to a rounded apex
            hw = (Wc - 24.0) * 0.5 * np.sqrt(grow) ** 0.8
            cxl = sxc * 0.5 + sgn * (14.0 + hw)
            hd = (Dc - 18.0) * (0.55 + 0.45 * np.sqrt(grow))
            cyl = ycc - 0.15 * Dc
            e = ((X - cxl) / np.maximum(hw, 1.0)) ** 2 + ((Y - cyl) / hd) ** 2 < 1.0
            dome = z_dia + (26.0 if sgn < 0 else 14.0) - 0.005 * ((X - sgn * 60.0) ** 2 + (Y - ycc) ** 2)
            lung |= e & (Z > dome)
        # heart notch (anterior left, low) and paravertebral gutter
        lung &= ~((np.abs(X - sxc) < 26.0) & (Y < syc + 22.0))
        lung &= lean[:, :, ks]
        if lung.any():
            zs = cv.z[ks]
            v = _noise_grid(seed + 3, 6.0, cv.x, cv.y, zs)
            hu = cv.hu[:, :, ks]
            tis = cv.tissue[:, :, ks]
            np.copyto(hu, np.where(v > 1.35, np.float32(-300.0), -865.0 + 15.0 * v), where=lung)
            np.copyto(tis, np.uint8(T_LUNG), where=lung)
            if spec.lung_opacity > 0:  # ground-glass opacities, peripheral and basal
                g = _noise_grid(seed + 5 + spec.scan_seed, 18.0, cv.x, cv.y, zs)
                thr = 1.6 - 4.0 * spec.lung_opacity
                ggo = lung & (g > thr)
                np.copyto(hu, -560.0 + 60.0 * (g - thr), where=ggo)
            info["has_lung"] = True
        hc = np.array((26.0, float(np.mean(prof["yc"])) + 25.0, z_dia + 50.0))
        blood = {"native": 42.0, "arterial": 260.0, "portal": 160.0}[spec.contrast_phase]
        cv.paint(hc - 75, hc + 75, lambda X, Y, Z: _sd_ellipsoid(X - hc[0], Y - hc[1], Z - hc[2], 55.0, 45.0, 55.0),
                 blood, T_BLOOD)
    # liver, spleen, kidneys, bladder (abdomen)
    l1 = [sg for sg in anat.segments if sg.region == "lumbar"][0]
    zl1 = l1.center[2]
    phase = spec.contrast_phase
    liver_hu = p["liver_hu"] + {"native": 0, "arterial": 20, "portal": 50}[phase]
    spleen_hu = 48 + {"native": 0, "arterial": 60, "portal": 70}[phase]
    kid_hu = 33 + {"native": 0, "arterial": 150, "portal": 130}[phase]
    blood = {"native": 42.0, "arterial": 260.0, "portal": 160.0}[phase]
    yb = l1.center[1]
    lc = np.array((-62.0, yb + 45.0, z_dia + 5.0))
    cv.paint(lc - 110, lc + 110, lambda X, Y, Z: np.maximum(
        _sd_ellipsoid(X - lc[0], Y - lc[1], Z - lc[2], 85.0, 80.0, 75.0), Z - (z_dia + 26.0 - 0.004 * (X + 55.0) ** 2)),
        liver_hu, T_ORGAN)
    spc = np.array((78.0, yb - 5.0, z_dia - 5.0))
    cv.paint(spc - 70, spc + 70, lambda X, Y, Z: np.maximum(
        _sd_ellipsoid(X - spc[0], Y - spc[1], Z - spc[2], 38.0, 50.0, 55.0), Z - (z_dia + 12.0)), spleen_hu, T_ORGAN)
    for sgn in (-1, 1):
        kc = np.array((sgn * 68.0, yb - 2.0, zl1 - (8.0 if sgn < 0 else -4.0)))
        cv.paint(kc - 65, kc + 65, lambda X, Y, Z, kc=kc: _sd_ellipsoid(X - kc[0], Y - kc[1], Z - kc[2], 26.0, 24.0, 55.0),
                 kid_hu, T_ORGAN)
    pb = _body_profile(anat, spec, np.array([lm["z_hip"] + 5.0]))
    bc = np.array((0.0, float(pb["yc"][0] + pb["D"][0]) - 50.0, lm["z_hip"] + 5.0))
    cv.paint(bc - 60, bc + 60, lambda X, Y, Z: _sd_ellipsoid(X - bc[0], Y - bc[1], Z - bc[2], 48.0, 35.0, 40.0), 8.0, T_FLUID)
    # paraspinal muscles (erector spinae) and psoas: muscle tubes wrapped in thin fat planes
    segs = [sg for sg in anat.segments if sg.region in ("cervical", "thoracic", "lumbar")]
    _render_muscle_tubes(cv, anat)
    # aorta and IVC (chest and abdomen), iliac vessels
    aorta_pts, ivc_pts = [], []
    for sg in segs:
        if sg.region == "thoracic" and sg.label >= 12 or sg.region == "lumbar" and sg.label <= 23:
            aorta_pts.append(_to_world(sg, (16.0, sg.d["b"] + 14.0, 0.0)))
        if sg.region == "lumbar" or (sg.region == "thoracic" and sg.label >= 17):
            ivc_pts.append(_to_world(sg, (-24.0, sg.d["b"] + 16.0, 0.0)))
    for pts, r in ((aorta_pts, 11.5), (ivc_pts, 10.0)):
        for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
            lo, hi = _box_around([q0, q1], r + 2)
            cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r=r: _sd_segment(X, Y, Z, q0, q1) - r, blood, T_BLOOD)
    # aortic arch and ascending aorta
    if len(th) > 5:
        t4 = th[3]
        a0 = _to_world(t4, (16.0, t4.d["b"] + 14.0, 0.0))
        a1 = a0 + np.array((-14.0, 40.0, 22.0))
        a2 = a0 + np.array((-22.0, 62.0, -40.0))
        for q0, q1 in ((aorta_pts[0] if aorta_pts else a0, a0), (a0, a1), (a1, a2)):
            lo, hi = _box_around([q0, q1], 14)
            cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: _sd_segment(X, Y, Z, q0, q1) - 12.5, blood, T_BLOOD)
    # airway: pharynx -> trachea -> carina, with neck vessels and thyroid
    cerv = [sg for sg in anat.segments if sg.region == "cervical"]
    air_pts = [_to_world(cerv[1], (0.0, cerv[1].d["b"] + 14.0, 12.0))]
    for sg in cerv[2:]:
        air_pts.append(_to_world(sg, (0.0, sg.d["b"] + 12.0 + (6.0 if sg.label >= 5 else 0.0), 0.0)))
    for sg in th[:5]:
        air_pts.append(_to_world(sg, (0.0, sg.d["b"] + 16.0, 0.0)))
    for r_, hu_, t_ in ((10.5, 110.0, T_CART), (8.0, -990.0, T_GAS)):
        for q0, q1 in zip(air_pts[:-1], air_pts[1:], strict=True):
            lo, hi = _box_around([q0, q1], 14)
            cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r_=r_: _sd_segment(X, Y, Z, q0, q1) - r_, hu_, t_)
    neck_blood = {"native": 42.0, "arterial": 300.0, "portal": 170.0}[phase]
    for sgn in (-1, 1):
        pts = [_to_world(sg, (sgn * (sg.d["a"] + 14.0), sg.d["b"] + 4.0, 0.0)) for sg in cerv[1:]]
        for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
            lo, hi = _box_around([q0, q1], 10)
            cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: _sd_segment(X, Y, Z, q0, q1) - 4.0, neck_blood, T_BLOOD)
            q0b, q1b = q0 + np.array((sgn * 9.0, 2.0, 0)), q1 + np.array((sgn * 9.0, 2.0, 0))
            cv.paint(lo - 10, hi + 10, lambda X, Y, Z, q0=q0b, q1=q1b: _sd_segment(X, Y, Z, q0, q1) - 6.0,
                     neck_blood * 0.8, T_BLOOD)
        thc = _to_world(cerv[6], (sgn * 16.0, cerv[6].d["b"] + 20.0, 4.0))
        cv.paint(thc - 30, thc + 30, lambda X, Y, Z, thc=thc: _sd_ellipsoid(X - thc[0], Y - thc[1], Z - thc[2], 9.0, 8.0, 20.0),
                 95.0 if phase == "native" else 160.0, T_ORGAN)
    # colon: insufflated (colonography) or collapsed with faecal gas
    _render_colon(cv, anat, spec)


def _render_muscle_tubes(cv: _Canvas, anat: Anatomy) -> None:
    """Erector spinae beside the spinous processes (T1..sacrum) and psoas beside the lumbar
    bodies, each outlined by a 2.5 mm intermuscular fat plane so muscles read apart."""
    tubes: list[list[tuple[np.ndarray, float]]] = []
    th_l = [sg for sg in anat.segments if sg.region in ("thoracic", "lumbar")]
    sac = [sg for sg in anat.segments if sg.region == "sacral"][:3]
    lum = [sg for sg in anat.segments if sg.region == "lumbar"]
    for sgn in (-1.0, 1.0):
        erector = []
        for i, sg in enumerate(th_l + sac):
            d = sg.d
            f = i / max(len(th_l) - 1, 1)
            r = 11.0 + 11.0 * min(f, 1.0) if sg.region != "sacral" else 16.0 - 4.0 * (i - len(th_l))
            if sg.region == "sacral":
                c = _to_world(sg, (sgn * (d["a"] * 0.8 + 6.0), -d["b"] - 16.0 - r * 0.4, 0.0))
            else:
                vc = -0.85 * d["b"] - d["cd"]
                c = _to_world(sg, (sgn * (d["cw"] + d["t"] + 0.55 * r), vc - d["cd"] - d["t"] - 0.45 * r, 0.0))
            erector.append((c, r))
        tubes.append(erector)
        psoas = []
        for i, sg in enumerate(lum):
            d = sg.d
            r = 7.0 + 15.0 * i / max(len(lum) - 1, 1)
            psoas.append((_to_world(sg, (sgn * (d["a"] + 0.75 * r + 1.0), -0.15 * d["b"], 0.0)), r))
        if sac:
            s1 = sac[0]
            psoas.append((_to_world(s1, (sgn * (s1.d["a"] + 38.0), 14.0, -10.0)), 20.0))
        tubes.append(psoas)
    for pad, hu, tis, only in ((2.5, -85.0, T_FAT, (T_MUSCLE, T_ORGAN, T_FAT)), (0.0, 52.0, T_MUSCLE, None)):
        for tube in tubes:
            for (p0, r0), (p1, r1) in zip(tube[:-1], tube[1:], strict=True):
                rr = 0.5 * (r0 + r1) + pad
                lo, hi = _box_around([p0, p1], rr + 2)
                cv.paint(lo, hi, lambda X, Y, Z, p0=p0, p1=p1, rr=rr: _sd_segment(X, Y, Z, p0, p1) - rr, hu, tis,
                         only=only)


def _colon_path(anat: Anatomy) -> np.ndarray:
    lm = anat.landmarks
    segs = anat.segments
    l1 = [sg for sg in segs if sg.region == "lumbar"][0]
    yb = l1.center[1]
    s3 = [sg for sg in segs if sg.region == "sacral"][-3]
    z1, zs, zh = l1.center[2], lm["z_sac_top"], lm["z_hip"]
    pts = [
        (0.0, s3.center[1] + 32.0, zh + 5.0),  # rectum
        (0.0, s3.center[1] + 38.0, s3.center[2]),
        (25.0, yb + 60.0, zs - 10.0),  # sigmoid
        (62.0, yb + 40.0, zs + 5.0),
        (80.0, yb + 15.0, zs + 40.0),  # descending
        (84.0, yb + 15.0, z1),
        (72.0, yb + 45.0, z1 + 45.0),  # splenic flexure
        (30.0, yb + 95.0, z1 - 15.0),  # transverse (sagging)
        (-30.0, yb + 95.0, z1 - 10.0),
        (-72.0, yb + 50.0, z1 + 20.0),  # hepatic flexure
        (-80.0, yb + 20.0, z1 - 30.0),  # ascending
        (-76.0, yb + 30.0, zs + 5.0),
        (-62.0, yb + 50.0, zs - 15.0),  # caecum
    ]
    return np.array(pts)


COLON_RADIUS_MM = 22.0
FLUID_HU = 450.0  # tagged residual fluid in CT colonography


def _render_colon(cv: _Canvas, anat: Anatomy, spec: CaseSpec):
    pts = _colon_path(anat)
    r = COLON_RADIUS_MM if spec.colon_gas else 13.0
    for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
        lo, hi = _box_around([q0, q1], r + 4)
        cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: _sd_segment(X, Y, Z, q0, q1) - r - 2.5, 40.0, T_MUSCLE)
    for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
        lo, hi = _box_around([q0, q1], r + 4)
        ymid = 0.5 * (q0[1] + q1[1])

        def lumen(X, Y, Z, q0=q0, q1=q1):
            return _sd_segment(X, Y, Z, q0, q1) - r

        if spec.colon_gas:
            # insufflated lumen; the fluid level depends on the position and is added per scan
            # (see _finish_scan) from the segment's mid-height stored here
            cv.paint(lo, hi, lumen, -1000.0, T_GAS)
            sl = cv.box(lo, hi)
            if sl is not None:
                if cv.colon_ymid is None:
                    cv.colon_ymid = np.full(cv.shape, np.nan, np.float32)
                inside = lumen(*cv.coords(sl)) < 0
                cv.colon_ymid[sl][inside] = ymid
        else:
            seed = anat.params["tex_seed"] + 11
            cv.paint(lo, hi, lambda X, Y, Z, lumen=lumen, seed=seed: np.maximum(
                lumen(X, Y, Z), 0.5 - _noise_points(seed, 7.0, *np.broadcast_arrays(X, Y, Z))), -950.0, T_GAS)


def _table_y(anat: Anatomy, spec: CaseSpec, z0: float, z1: float) -> float:
    """Height (world y, mm) of the patient-facing table surface for the scanned z range."""
    zs = np.linspace(z0, z1, 64)
    prof = _body_profile(anat, spec, zs)
    if spec.position == "supine":
        return float(np.min(prof["back"] - prof["fat"])) - 3.0
    return float(np.max(prof["yc"] + prof["D"] + prof["fat"])) + 3.0


def _render_table_into(hu: np.ndarray, tissue: np.ndarray, cv: _Canvas, spec: CaseSpec, y0: float):
    """Carbon-fibre couch: a curved sandwich plate under the back (supine) or belly (prone)."""
    sgn = -1.0 if spec.position == "supine" else 1.0
    X, Y = cv.X[:, :, 0], cv.Y[:, :, 0]
    curve = y0 + sgn * 0.0009 * X ** 2
    d = (Y - curve) * sgn
    plate = (d > 0) & (d < 10.0) & (np.abs(X) < 230.0)
    if not plate.any():
        return
    skin = plate & ((d < 2.0) | (d > 8.0))
    empty = tissue == T_AIR
    np.copyto(hu, np.float32(-700.0), where=plate[:, :, None] & empty)
    np.copyto(hu, np.float32(250.0), where=skin[:, :, None] & empty)
    np.copyto(tissue, np.uint8(T_TABLE), where=plate[:, :, None] & empty)


def _render_metal(cv: _Canvas, anat: Anatomy, spec: CaseSpec, info: dict):
    """Posterior lumbar fusion: pedicle screws in two adjacent levels, rods; returns metal mask."""
    lum = [sg for sg in anat.segments if sg.region == "lumbar"]
    rng = np.random.default_rng([spec.seed, 5])
    k = int(rng.integers(1, len(lum) - 1))
    metal = np.zeros(cv.shape, bool)
    heads = {-1: [], 1: []}
    for sg in lum[k:k + 2]:
        d = sg.d
        vc = -0.85 * d["b"] - d["cd"]
        for sgn in (-1, 1):
            entry = _to_world(sg, (sgn * (d["cw"] + d["t"] * 0.9), vc - d["cd"] * 0.2 - 12.0, 0.0))
            tip = _to_world(sg, (sgn * 6.0, 0.45 * d["b"], 0.0))
            heads[sgn].append(entry)
            for q0, q1, r in ((entry, tip, 3.2),):
                sl = cv.box(*_box_around([q0, q1], r + 1))
                if sl is None:
                    continue
                Xs, Ys, Zs = cv.coords(sl)
                metal[sl] |= (_sd_segment(Xs, Ys, Zs, q0, q1) - r) < 0
    for sgn in (-1, 1):
        a, b = heads[sgn][0] + np.array((0, -4.0, 12.0)), heads[sgn][-1] + np.array((0, -4.0, -12.0))
        sl = cv.box(*_box_around([a, b], 5))
        if sl is not None:
            Xs, Ys, Zs = cv.coords(sl)
            metal[sl] |= (_sd_segment(Xs, Ys, Zs, a, b) - 3.0) < 0
    info["metal_levels"] = [sg.label for sg in lum[k:k + 2]]
    return metal


def _add_streaks(hu2: np.ndarray, metal2: np.ndarray, dx: float, rng) -> None:
    """Add metal streaks to one axial slice in place: dark bands between metal objects, spokes."""
    lab, n = ndimage.label(metal2)
    if n == 0:
        return
    cents = np.array(ndimage.center_of_mass(metal2, lab, range(1, n + 1)))
    nx, ny = hu2.shape
    ii, jj = np.meshgrid(np.arange(nx, dtype=np.float32), np.arange(ny, dtype=np.float32), indexing="ij")
    amount = float(metal2.sum()) * dx * dx  # mm^2 of metal
    amp = min(600.0, 60.0 * math.sqrt(amount))
    for ci in cents:
        di, dj = ii - ci[0], jj - ci[1]
        rr = np.sqrt(di * di + dj * dj) * dx + 5.0
        ang = np.arctan2(dj, di)
        spokes = np.cos(ang * 9 + rng.uniform(0, 6.3)) * np.cos(ang * 4 + rng.uniform(0, 6.3))
        hu2 += (amp * 0.6 * spokes * np.exp(-rr / 60.0)).astype(np.float32)
    for a in range(len(cents)):
        for b in range(a + 1, len(cents)):
            p, q = cents[a], cents[b]
            vx, vy = q - p
            ln = math.hypot(vx, vy) or 1.0
            dist = np.abs((ii - p[0]) * vy - (jj - p[1]) * vx) / ln * dx
            along = ((ii - p[0]) * vx + (jj - p[1]) * vy) / (ln * ln)
            band = np.exp(-(dist / 4.0) ** 2) * np.exp(-np.clip(np.abs(along - 0.5) - 0.5, 0, None) * ln * dx / 20.0)
            hu2 -= (amp * band).astype(np.float32)


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
    prof = _body_profile(anat, spec, zs)
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
    base = specs[0]
    for s in specs[1:]:
        if replace(s, position=base.position, scan_seed=base.scan_seed, noise_hu=base.noise_hu) != base:
            raise ValueError("generate_scans: specs may differ only in position, scan_seed and noise_hu")
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
    infos = [dict(info, table_y=_table_y(anat, s, z0, z0 + (nz - 1) * sz)) for s in specs]
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
            if n_w > 1:
                cs = np.cumsum(np.concatenate([np.zeros((nx, ny, 1), np.float64), hu.astype(np.float64)], axis=2), axis=2)
                out = ((cs[:, :, centre + half + 1] - cs[:, :, centre - half]) / n_w).astype(np.float32)
            else:
                out = hu[:, :, centre]
            out = _add_noise(np.array(out, np.float32, copy=True), s, k0, (sx, sy))
            np.rint(out, out=out)
            np.clip(out, HU_MIN, HU_MAX, out=out)
            cts[i][:, :, k0:k1] = out
            tissues[i][:, :, k0:k1] = tis[:, :, centre]
    centroids = compute_centroids(mask, aff)
    out_cases = []
    for i, s in enumerate(specs):
        infos[i]["labels_present"] = sorted(centroids)
        infos[i].update({k: v for k, v in infos[0].items() if k not in infos[i]})
        out_cases.append(PhantomCase(ct=cts[i], mask=mask if i == 0 else mask.copy(), affine=aff.copy(),
                                     centroids=dict(centroids), spec=s, tissue=tissues[i],
                                     ribs=ribs if i == 0 else ribs.copy(), info=infos[i]))
    return out_cases


def _render_block(anat: Anatomy, spec: CaseSpec, xs, ys, zf, vox: float, info: dict):
    """Render everything a scan's position and acquisition do not change; returns the canvas,
    the labels and the rib levels of the thin slices."""
    cv = _Canvas(xs, ys, zf, vox)
    _render_soft(cv, anat, spec, info)
    _render_discs_canal(cv, anat)
    bt = _BoneTable()
    _render_spine(cv, anat, bt, info)
    _render_ribs_sternum(cv, anat, spec, bt, info)
    _render_pelvis(cv, anat, bt)
    _render_skull(cv, anat, bt)
    lab_lut, cort_lut, canc_lut, t_lut, rib_lut = bt.arrays()
    # composite bone: partial-volume ramp over one voxel, cortex of thickness t, textured marrow
    sdf = cv.bone_sdf
    near = sdf < vox
    if near.any():
        idx = np.nonzero(near)
        d = sdf[idx]
        oid = cv.bone_id[idx]
        t = t_lut[oid]
        f0 = np.clip(0.5 - d / vox, 0.0, 1.0)
        f1 = np.clip(0.5 - (d + t) / vox, 0.0, 1.0)
        canc = canc_lut[oid].copy()
        deep = f1 > 0
        if deep.any():
            tex = _bone_texture(anat.params["tex_seed"], xs[idx[0][deep]], ys[idx[1][deep]], zf[idx[2][deep]], vox)
            canc[deep] = canc[deep] + tex
        bg = cv.hu[idx]
        cv.hu[idx] = bg * (1 - f0) + cort_lut[oid] * (f0 - f1) + canc * f1
        inside = d < 0
        tis = np.where(d < -t, T_CANC, T_CORT).astype(np.uint8)
        cur = cv.tissue[idx]
        cv.tissue[idx] = np.where(inside, tis, cur)
    lab = np.zeros(cv.shape, np.uint8)
    ribs = np.zeros(cv.shape, np.uint8)
    inside = sdf < 0
    ids = cv.bone_id[inside]
    lab[inside] = lab_lut[ids]
    ribs[inside] = rib_lut[ids]
    if spec.metal:
        cv.metal = _render_metal(cv, anat, spec, info)
        cv.hu[cv.metal] = 3071.0
        cv.tissue[cv.metal] = T_METAL
    return cv, lab, ribs


def _finish_scan(cv: _Canvas, spec: CaseSpec, info: dict, k0: int, copy: bool):
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
    _render_table_into(hu, tis, cv, spec, info["table_y"])
    if cv.metal is not None:
        rng = np.random.default_rng([spec.seed, 6, spec.scan_seed, k0])
        for k in np.nonzero(cv.metal.any(axis=(0, 1)))[0]:
            _add_streaks(hu[:, :, k], cv.metal[:, :, k], cv.voxel, rng)
    return hu, tis


def _bone_texture(seed: int, x, y, z, vox: float) -> np.ndarray:
    """Trabecular-like mottling (HU, about +-30) of cancellous bone at world points."""
    c1 = max(2.5, 1.6 * vox)
    t = _noise_points(seed + 77, c1, x, y, z) + 0.6 * _noise_points(seed + 78, c1 * 0.5 if vox < 1.2 else c1 * 1.7, x, y, z)
    return t * np.float32(20.0)


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


def with_spec(spec: CaseSpec, **changes) -> CaseSpec:
    """A copy of ``spec`` with fields changed (validated)."""
    return replace(spec, **changes)
