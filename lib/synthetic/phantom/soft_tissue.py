"""Soft tissues, the colon, the table and metal: everything painted on the canvas but bone.

What is modelled: the body outline with subcutaneous fat, muscle (paraspinal, psoas,
abdominal wall), lungs, heart, great vessels (contrast phase), liver, spleen, kidneys, bowel,
bladder, airway, gas-filled colon for colonography (with a fluid level that follows gravity,
added per scan), the patient table (carbon-fibre couch under the back or the belly), and
metal implants (posterior spinal fusion) with streaks. Soft tissues are painted in order
(painter's algorithm): a later object overwrites an earlier one.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from lib.synthetic.phantom.anatomy import Anatomy, body_profile, to_world
from lib.synthetic.phantom.canvas import Canvas
from lib.synthetic.phantom.sdf import box_around, noise_grid, noise_points, sd_ellipsoid, sd_segment
from lib.synthetic.phantom.spec import (
    T_AIR,
    T_BLOOD,
    T_CART,
    T_FAT,
    T_FLUID,
    T_GAS,
    T_LUNG,
    T_MUSCLE,
    T_ORGAN,
    T_TABLE,
    CaseSpec,
)


def _zrange(cv: Canvas, z_lo: float, z_hi: float) -> slice | None:
    """Slice of block slices with z in [z_lo, z_hi]; None when empty."""
    k = np.nonzero((cv.z >= z_lo) & (cv.z <= z_hi))[0]
    return slice(int(k[0]), int(k[-1]) + 1) if len(k) else None


_BLOOD_HU = {"native": 42.0, "arterial": 260.0, "portal": 160.0}
"""Blood (heart, aorta, IVC) HU per contrast phase."""


def render_soft(cv: Canvas, anat: Anatomy, spec: CaseSpec, info: dict):
    """Body outline, fat, muscle, organs, lungs, vessels, airway, bowel (painter's order)."""
    prof = body_profile(anat, spec, cv.z.astype(float))
    pf = {k: _f32(prof[k]) for k in ("W", "D", "yc", "xc", "fat", "back", "spine_y", "spine_x")}
    lean = _paint_body(cv, anat, pf)
    _paint_visceral_cavity(cv, anat, pf, lean)
    _paint_chest(cv, anat, spec, info, prof, pf, lean)
    _paint_abdominal_organs(cv, anat, spec)
    # paraspinal muscles (erector spinae) and psoas: muscle tubes wrapped in thin fat planes
    _render_muscle_tubes(cv, anat)
    _paint_great_vessels(cv, anat, spec)
    _paint_neck(cv, anat, spec)
    # colon: insufflated (colonography) or collapsed with faecal gas
    _render_colon(cv, anat, spec)


def _f32(a) -> np.ndarray:
    """A per-slice profile array as float32 of shape (1, 1, nz), broadcasting over the canvas."""
    return np.asarray(a, np.float32)[None, None, :]


def _paint_body(cv: Canvas, anat: Anatomy, pf: dict[str, np.ndarray]) -> np.ndarray:
    """Outer body (skin) with subcutaneous fat and a flattened back, thighs split below the
    hips; inside it the lean compartment (muscle by default). Returns the lean mask."""
    lm = anat.landmarks
    X, Y = cv.X, cv.Y
    W, D, yc, xc, fat, back = pf["W"], pf["D"], pf["yc"], pf["xc"], pf["fat"], pf["back"]
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
    body = (r_out < 1.0) & (Y > back - fat) & _f32(inbody).astype(bool)
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
    return lean


def _paint_visceral_cavity(cv: Canvas, anat: Anatomy, pf: dict[str, np.ndarray], lean: np.ndarray) -> None:
    """Visceral cavity of abdomen and pelvis (inside the muscle wall): bowel, visceral fat and
    bowel gas from world-fixed noise."""
    p = anat.params
    lm = anat.landmarks
    seed = p["tex_seed"]
    X, Y = cv.X, cv.Y
    W, D, yc, xc = pf["W"], pf["D"], pf["yc"], pf["xc"]
    sy, sx = pf["spine_y"], pf["spine_x"]
    ks = _zrange(cv, lm["z_hip"] - 20, lm["z_diaphragm"] + 5)
    if ks is None:
        return
    wall = 12.0
    Wv, Dv, ycv = W[:, :, ks] - wall, D[:, :, ks] - wall, yc[:, :, ks]
    visc = (((X - xc[:, :, ks]) / Wv) ** 2 + ((Y - ycv - 8.0) / Dv) ** 2 < 1.0) & lean[:, :, ks]
    visc &= Y > sy[:, :, ks] + 5.0
    visc &= ~((np.abs(X - sx[:, :, ks]) < 42.0) & (Y < sy[:, :, ks] + 24.0))
    if not visc.any():
        return
    zs = cv.z[ks]
    t = noise_grid(seed + 1, 15.0, cv.x, cv.y, zs)
    fatty = visc & (t > 1.1 - 2.4 * p["visceral_fat"])
    organ = visc & ~fatty
    hu = cv.hu[:, :, ks]
    tis = cv.tissue[:, :, ks]
    np.copyto(hu, -95.0 + 6.0 * t, where=fatty)
    np.copyto(tis, np.uint8(T_FAT), where=fatty)
    np.copyto(hu, 30.0 + 8.0 * t, where=organ)
    np.copyto(tis, np.uint8(T_ORGAN), where=organ)
    g = noise_grid(seed + 9, 7.0, cv.x, cv.y, zs)
    gas = organ & (g > 1.45)
    np.copyto(hu, np.float32(-920.0), where=gas)
    np.copyto(tis, np.uint8(T_GAS), where=gas)


def _paint_chest(cv: Canvas, anat: Anatomy, spec: CaseSpec, info: dict, prof: dict[str, np.ndarray],
                 pf: dict[str, np.ndarray], lean: np.ndarray) -> None:
    """Lungs inside the thoracic cavity, above the diaphragm domes, and the heart."""
    lm = anat.landmarks
    th = [sg for sg in anat.segments if sg.region == "thoracic"]
    z_apex = th[0].center[2] + 28.0
    z_dia = lm["z_diaphragm"]
    ks = _zrange(cv, z_dia - 40, z_apex)
    if ks is None:
        return
    lung = _lung_mask(cv, pf, lean, ks, z_apex, z_dia)
    if lung.any():
        _paint_lungs(cv, anat, spec, info, ks, lung)
    hc = np.array((26.0, float(np.mean(prof["yc"])) + 25.0, z_dia + 50.0))
    blood = _BLOOD_HU[spec.contrast_phase]
    cv.paint(hc - 75, hc + 75, lambda X, Y, Z: sd_ellipsoid(X - hc[0], Y - hc[1], Z - hc[2], 55.0, 45.0, 55.0),
             blood, T_BLOOD)


def _lung_mask(cv: Canvas, pf: dict[str, np.ndarray], lean: np.ndarray, ks: slice, z_apex: float,
               z_dia: float) -> np.ndarray:
    """Both lungs over the block slices ``ks``: ellipses beside the mediastinum narrowing to
    rounded apices, above the diaphragm domes, inside the lean compartment."""
    X, Y = cv.X, cv.Y
    W, D, yc = pf["W"], pf["D"], pf["yc"]
    sy, sx = pf["spine_y"], pf["spine_x"]
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
    return lung


def _paint_lungs(cv: Canvas, anat: Anatomy, spec: CaseSpec, info: dict, ks: slice, lung: np.ndarray) -> None:
    """Lung parenchyma (vessels as bright noise peaks) and ground-glass opacities."""
    seed = anat.params["tex_seed"]
    zs = cv.z[ks]
    v = noise_grid(seed + 3, 6.0, cv.x, cv.y, zs)
    hu = cv.hu[:, :, ks]
    tis = cv.tissue[:, :, ks]
    np.copyto(hu, np.where(v > 1.35, np.float32(-300.0), -865.0 + 15.0 * v), where=lung)
    np.copyto(tis, np.uint8(T_LUNG), where=lung)
    if spec.lung_opacity > 0:  # ground-glass opacities, peripheral and basal
        g = noise_grid(seed + 5 + spec.scan_seed, 18.0, cv.x, cv.y, zs)
        thr = 1.6 - 4.0 * spec.lung_opacity
        ggo = lung & (g > thr)
        np.copyto(hu, -560.0 + 60.0 * (g - thr), where=ggo)
    info["has_lung"] = True


def _paint_abdominal_organs(cv: Canvas, anat: Anatomy, spec: CaseSpec) -> None:
    """Liver, spleen, kidneys (enhancing with the contrast phase) and bladder."""
    p = anat.params
    lm = anat.landmarks
    z_dia = lm["z_diaphragm"]
    # liver, spleen, kidneys, bladder (abdomen)
    l1 = [sg for sg in anat.segments if sg.region == "lumbar"][0]
    zl1 = l1.center[2]
    phase = spec.contrast_phase
    liver_hu = p["liver_hu"] + {"native": 0, "arterial": 20, "portal": 50}[phase]
    spleen_hu = 48 + {"native": 0, "arterial": 60, "portal": 70}[phase]
    kid_hu = 33 + {"native": 0, "arterial": 150, "portal": 130}[phase]
    yb = l1.center[1]
    lc = np.array((-62.0, yb + 45.0, z_dia + 5.0))
    cv.paint(lc - 110, lc + 110, lambda X, Y, Z: np.maximum(
        sd_ellipsoid(X - lc[0], Y - lc[1], Z - lc[2], 85.0, 80.0, 75.0), Z - (z_dia + 26.0 - 0.004 * (X + 55.0) ** 2)),
        liver_hu, T_ORGAN)
    spc = np.array((78.0, yb - 5.0, z_dia - 5.0))
    cv.paint(spc - 70, spc + 70, lambda X, Y, Z: np.maximum(
        sd_ellipsoid(X - spc[0], Y - spc[1], Z - spc[2], 38.0, 50.0, 55.0), Z - (z_dia + 12.0)), spleen_hu, T_ORGAN)
    for sgn in (-1, 1):
        kc = np.array((sgn * 68.0, yb - 2.0, zl1 - (8.0 if sgn < 0 else -4.0)))
        cv.paint(kc - 65, kc + 65, lambda X, Y, Z, kc=kc: sd_ellipsoid(X - kc[0], Y - kc[1], Z - kc[2], 26.0, 24.0, 55.0),
                 kid_hu, T_ORGAN)
    pb = body_profile(anat, spec, np.array([lm["z_hip"] + 5.0]))
    bc = np.array((0.0, float(pb["yc"][0] + pb["D"][0]) - 50.0, lm["z_hip"] + 5.0))
    cv.paint(bc - 60, bc + 60, lambda X, Y, Z: sd_ellipsoid(X - bc[0], Y - bc[1], Z - bc[2], 48.0, 35.0, 40.0), 8.0, T_FLUID)


def _paint_great_vessels(cv: Canvas, anat: Anatomy, spec: CaseSpec) -> None:
    """Aorta and IVC (chest and abdomen) in front of the vertebral bodies, aortic arch and
    ascending aorta; HU by contrast phase."""
    blood = _BLOOD_HU[spec.contrast_phase]
    th = [sg for sg in anat.segments if sg.region == "thoracic"]
    segs = [sg for sg in anat.segments if sg.region in ("cervical", "thoracic", "lumbar")]
    # aorta and IVC (chest and abdomen), iliac vessels
    aorta_pts, ivc_pts = [], []
    for sg in segs:
        if sg.region == "thoracic" and sg.label >= 12 or sg.region == "lumbar" and sg.label <= 23:
            aorta_pts.append(to_world(sg, (16.0, sg.d["b"] + 14.0, 0.0)))
        if sg.region == "lumbar" or (sg.region == "thoracic" and sg.label >= 17):
            ivc_pts.append(to_world(sg, (-24.0, sg.d["b"] + 16.0, 0.0)))
    for pts, r in ((aorta_pts, 11.5), (ivc_pts, 10.0)):
        for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
            lo, hi = box_around([q0, q1], r + 2)
            cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r=r: sd_segment(X, Y, Z, q0, q1) - r, blood, T_BLOOD)
    # aortic arch and ascending aorta
    if len(th) > 5:
        t4 = th[3]
        a0 = to_world(t4, (16.0, t4.d["b"] + 14.0, 0.0))
        a1 = a0 + np.array((-14.0, 40.0, 22.0))
        a2 = a0 + np.array((-22.0, 62.0, -40.0))
        for q0, q1 in ((aorta_pts[0] if aorta_pts else a0, a0), (a0, a1), (a1, a2)):
            lo, hi = box_around([q0, q1], 14)
            cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: sd_segment(X, Y, Z, q0, q1) - 12.5, blood, T_BLOOD)


def _paint_neck(cv: Canvas, anat: Anatomy, spec: CaseSpec) -> None:
    """Airway (pharynx -> trachea -> carina) with its cartilage wall, carotid arteries and
    jugular veins, thyroid lobes."""
    phase = spec.contrast_phase
    th = [sg for sg in anat.segments if sg.region == "thoracic"]
    # airway: pharynx -> trachea -> carina, with neck vessels and thyroid
    cerv = [sg for sg in anat.segments if sg.region == "cervical"]
    air_pts = [to_world(cerv[1], (0.0, cerv[1].d["b"] + 14.0, 12.0))]
    for sg in cerv[2:]:
        air_pts.append(to_world(sg, (0.0, sg.d["b"] + 12.0 + (6.0 if sg.label >= 5 else 0.0), 0.0)))
    for sg in th[:5]:
        air_pts.append(to_world(sg, (0.0, sg.d["b"] + 16.0, 0.0)))
    for r_, hu_, t_ in ((10.5, 110.0, T_CART), (8.0, -990.0, T_GAS)):
        for q0, q1 in zip(air_pts[:-1], air_pts[1:], strict=True):
            lo, hi = box_around([q0, q1], 14)
            cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r_=r_: sd_segment(X, Y, Z, q0, q1) - r_, hu_, t_)
    neck_blood = {"native": 42.0, "arterial": 300.0, "portal": 170.0}[phase]
    for sgn in (-1, 1):
        pts = [to_world(sg, (sgn * (sg.d["a"] + 14.0), sg.d["b"] + 4.0, 0.0)) for sg in cerv[1:]]
        for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
            lo, hi = box_around([q0, q1], 10)
            cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: sd_segment(X, Y, Z, q0, q1) - 4.0, neck_blood, T_BLOOD)
            q0b, q1b = q0 + np.array((sgn * 9.0, 2.0, 0)), q1 + np.array((sgn * 9.0, 2.0, 0))
            cv.paint(lo - 10, hi + 10, lambda X, Y, Z, q0=q0b, q1=q1b: sd_segment(X, Y, Z, q0, q1) - 6.0,
                     neck_blood * 0.8, T_BLOOD)
        thc = to_world(cerv[6], (sgn * 16.0, cerv[6].d["b"] + 20.0, 4.0))
        cv.paint(thc - 30, thc + 30, lambda X, Y, Z, thc=thc: sd_ellipsoid(X - thc[0], Y - thc[1], Z - thc[2], 9.0, 8.0, 20.0),
                 95.0 if phase == "native" else 160.0, T_ORGAN)


def _render_muscle_tubes(cv: Canvas, anat: Anatomy) -> None:
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
                c = to_world(sg, (sgn * (d["a"] * 0.8 + 6.0), -d["b"] - 16.0 - r * 0.4, 0.0))
            else:
                vc = -0.85 * d["b"] - d["cd"]
                c = to_world(sg, (sgn * (d["cw"] + d["t"] + 0.55 * r), vc - d["cd"] - d["t"] - 0.45 * r, 0.0))
            erector.append((c, r))
        tubes.append(erector)
        psoas = []
        for i, sg in enumerate(lum):
            d = sg.d
            r = 7.0 + 15.0 * i / max(len(lum) - 1, 1)
            psoas.append((to_world(sg, (sgn * (d["a"] + 0.75 * r + 1.0), -0.15 * d["b"], 0.0)), r))
        if sac:
            s1 = sac[0]
            psoas.append((to_world(s1, (sgn * (s1.d["a"] + 38.0), 14.0, -10.0)), 20.0))
        tubes.append(psoas)
    for pad, hu, tis, only in ((2.5, -85.0, T_FAT, (T_MUSCLE, T_ORGAN, T_FAT)), (0.0, 52.0, T_MUSCLE, None)):
        for tube in tubes:
            for (p0, r0), (p1, r1) in zip(tube[:-1], tube[1:], strict=True):
                rr = 0.5 * (r0 + r1) + pad
                lo, hi = box_around([p0, p1], rr + 2)
                cv.paint(lo, hi, lambda X, Y, Z, p0=p0, p1=p1, rr=rr: sd_segment(X, Y, Z, p0, p1) - rr, hu, tis,
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


def _render_colon(cv: Canvas, anat: Anatomy, spec: CaseSpec):
    pts = _colon_path(anat)
    r = COLON_RADIUS_MM if spec.colon_gas else 13.0
    for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
        lo, hi = box_around([q0, q1], r + 4)
        cv.paint(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: sd_segment(X, Y, Z, q0, q1) - r - 2.5, 40.0, T_MUSCLE)
    for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
        lo, hi = box_around([q0, q1], r + 4)
        ymid = 0.5 * (q0[1] + q1[1])

        def lumen(X, Y, Z, q0=q0, q1=q1):
            return sd_segment(X, Y, Z, q0, q1) - r

        if spec.colon_gas:
            # insufflated lumen; the fluid level depends on the position and is added per scan
            # (lib.synthetic.phantom.scan) from the segment's mid-height stored here
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
                lumen(X, Y, Z), 0.5 - noise_points(seed, 7.0, *np.broadcast_arrays(X, Y, Z))), -950.0, T_GAS)


def table_y(anat: Anatomy, spec: CaseSpec, z0: float, z1: float) -> float:
    """Height (world y, mm) of the patient-facing table surface for the scanned z range."""
    zs = np.linspace(z0, z1, 64)
    prof = body_profile(anat, spec, zs)
    if spec.position == "supine":
        return float(np.min(prof["back"] - prof["fat"])) - 3.0
    return float(np.max(prof["yc"] + prof["D"] + prof["fat"])) + 3.0


def render_table_into(hu: np.ndarray, tissue: np.ndarray, cv: Canvas, spec: CaseSpec, y0: float):
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


def render_metal(cv: Canvas, anat: Anatomy, spec: CaseSpec, info: dict):
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
            entry = to_world(sg, (sgn * (d["cw"] + d["t"] * 0.9), vc - d["cd"] * 0.2 - 12.0, 0.0))
            tip = to_world(sg, (sgn * 6.0, 0.45 * d["b"], 0.0))
            heads[sgn].append(entry)
            for q0, q1, r in ((entry, tip, 3.2),):
                sl = cv.box(*box_around([q0, q1], r + 1))
                if sl is None:
                    continue
                Xs, Ys, Zs = cv.coords(sl)
                metal[sl] |= (sd_segment(Xs, Ys, Zs, q0, q1) - r) < 0
    for sgn in (-1, 1):
        a, b = heads[sgn][0] + np.array((0, -4.0, 12.0)), heads[sgn][-1] + np.array((0, -4.0, -12.0))
        sl = cv.box(*box_around([a, b], 5))
        if sl is not None:
            Xs, Ys, Zs = cv.coords(sl)
            metal[sl] |= (sd_segment(Xs, Ys, Zs, a, b) - 3.0) < 0
    info["metal_levels"] = [sg.label for sg in lum[k:k + 2]]
    return metal


def add_streaks(hu2: np.ndarray, metal2: np.ndarray, dx: float, rng) -> None:
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
