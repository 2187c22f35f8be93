"""The skeleton: vertebrae, ribs, sternum, shoulder girdle, pelvis and skull as bone SDFs.

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

Each bone object gets a row of the :class:`BoneTable` (label, cortical and cancellous HU, cortex
thickness, rib level) and its SDF is unioned into the canvas; :func:`composite_bone` turns the
union into HU, tissue classes, vertebra labels and rib levels.
"""

from __future__ import annotations

import math

import numpy as np

from lib.core import labels as L
from lib.synthetic.phantom.anatomy import Anatomy, Segment, body_profile, local_box, to_world
from lib.synthetic.phantom.canvas import Canvas
from lib.synthetic.phantom.sdf import (
    box_around,
    extrude,
    length,
    local,
    noise_points,
    sd_ellipse,
    sd_ellipsoid,
    sd_segment,
)
from lib.synthetic.phantom.spec import T_BRAIN, T_CANC, T_CART, T_CORT, T_DISC, T_FLUID, CaseSpec


class BoneTable:
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


def _sdf_body(d: dict, u, v, w):
    """SDF of a vertebral body (C2..L6) in local coordinates: a waisted elliptic cylinder with a
    flattened posterior wall, concave endplates and rounded rims."""
    a, b, h = d["a"], d["b"], d["h"]
    rad2 = (u / a) ** 2 + (v / b) ** 2
    waist = 1.0 - 0.07 * (1.0 - np.minimum((2.0 * w / h) ** 2, 1.0))
    d2 = np.maximum(sd_ellipse(u, v, a * waist, b * waist), -(v + 0.85 * b))
    dz = np.abs(w) - h / 2 + 0.9 * np.maximum(1.0 - rad2, 0.0)
    r = 1.5
    return extrude(d2 + r, dz + r) - r


def _sdf_dens(sg: Segment, u, v, w):
    """SDF of the dens of C2 (the odontoid process, part of C2's body) in local coordinates."""
    h, s = sg.d["h"], anat_scale(sg)
    return sd_segment(u, v, w, (0, 0.5, h / 2 - 3), (0, 1.0, h / 2 + 14 * s)) - 5.0 * s


def body_points_local(sg: Segment, step_mm: float = 0.5) -> np.ndarray:
    """Points (n, 3) of a ``step_mm`` grid inside the vertebral body of ``sg`` (C2..L6; C2's with
    its dens), in its local (u, v, w) frame: the solid whose centre of mass is the VerSe-style
    body centroid."""
    d = sg.d
    a, b, h = d["a"], d["b"], d["h"]
    top = h / 2 + (14 * anat_scale(sg) + 5.0 * anat_scale(sg) if sg.name == "C2" else 0.0)
    axes = [np.arange(lo - 1.0, hi + 1.0 + step_mm / 2, step_mm, dtype=np.float32)
            for lo, hi in ((-a, a), (-b, b), (-h / 2, top))]
    u, v, w = np.meshgrid(*axes, indexing="ij")
    sd = _sdf_body(d, u, v, w)
    if sg.name == "C2":
        sd = np.minimum(sd, _sdf_dens(sg, u, v, w))
    inside = sd < 0
    return np.stack([u[inside], v[inside], w[inside]], axis=1).astype(np.float64)


def _sdf_vertebra(sg: Segment, u, v, w, parts, geo):
    """Union SDF of one vertebra (C2..L6) in local coordinates."""
    d = sg.d
    cw, cd, t = d["cw"], d["cd"], d["t"]
    vc, ha, wa0 = geo["vc"], geo["ha"], geo["wa0"]
    sd = _sdf_body(d, u, v, w)
    # posterior arch ring around the canal, sheared so laminae slope caudally
    wl = w - (wa0 + d["shear"] * np.minimum(v - vc, 0.0))
    ring = np.maximum(sd_ellipse(u, v - vc, cw + t, cd + t), -sd_ellipse(u, v - vc, cw, cd))
    ring = np.maximum(ring, v - (vc + cd + t * 0.5 + 2.0))
    arch = extrude(ring, np.abs(wl) - ha / 2)
    sd = np.minimum(sd, arch)
    for kind, p in parts:
        if kind == "capsule":
            sd = np.minimum(sd, sd_segment(u, v, w, p["p0"], p["p1"]) - p["r"])
        else:  # plate: 2D capsule in (v, w) extruded in u
            d2p = sd_segment(np.float32(0), v, w, (0, *p["p0"]), (0, *p["p1"])) - p["hs"]
            sd = np.minimum(sd, extrude(d2p, np.abs(u) - p["th"]))
    # keep the canal open
    canal = sd_ellipse(u, v - vc, cw, cd)
    sd = np.maximum(sd, -canal)
    if sg.name == "C2":
        sd = np.minimum(sd, _sdf_dens(sg, u, v, w))
    return sd


def anat_scale(sg: Segment) -> float:
    return sg.d.get("s", 1.0)


def _sdf_atlas(sg: Segment, u, v, w):
    """C1: anterior arch, lateral masses, posterior arch, transverse processes; no body."""
    s = sg.d.get("s", 1.0)
    vr = -5.0 * s
    ring = np.maximum(sd_ellipse(u, v - vr, 23.0 * s, 19.0 * s), -sd_ellipse(u, v - vr, 18.5 * s, 14.5 * s))
    hgt = np.where(v > 0, 5.0, 4.0) * s
    sd = extrude(ring, np.abs(w) - hgt)
    for sgn in (-1, 1):
        sd = np.minimum(sd, sd_ellipsoid(u - sgn * 18.5 * s, v + 1.5 * s, w, 6.5 * s, 9.0 * s, 8.0 * s))
        sd = np.minimum(sd, sd_segment(u, v, w, (sgn * 22 * s, -3 * s, 0), (sgn * 36 * s, -5 * s, 1)) - 3.8 * s)
    sd = np.minimum(sd, sd_ellipsoid(u, v + 25.0 * s, w, 5.0 * s, 4.0 * s, 5.0 * s))  # posterior tubercle
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
    sd = extrude(sd_ellipse(u, v, a, b) + 1.0, dz + 1.0) - 1.0
    # posterior plate (laminae fused) with canal
    vc = -b - 5.0
    plate = extrude(np.maximum(sd_ellipse(u, v - vc, a * 0.95, 8.0), -sd_ellipse(u, v - vc, a * 0.45, 3.5)),
                     np.maximum(w - up + 3.0, -w - dn))
    sd = np.minimum(sd, plate)
    sd = np.minimum(sd, sd_segment(u, v, w, (0, vc - 6, h / 2), (0, vc - 9, -h / 2)) - 3.0)  # median crest
    if q <= 2 or d.get("fused_l5"):
        wing = 26.0 - 6.0 * max(q, 0)
        if d.get("fused_l5"):
            wing = 30.0
        for sgn in (-1, 1):
            sd = np.minimum(sd, extrude(sd_ellipse(u - sgn * (a + wing * 0.55), v + 3.0, wing * 0.75, b * 1.1) + 2,
                                         np.abs(w) - h / 2 - d["disc"] * 0.7 + 2) - 2)
    return sd


def _render_spine(cv: Canvas, anat: Anatomy, bt: BoneTable, info: dict):
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
                cv.bone(lo, hi, lambda X, Y, Z, sg=sg: _sdf_atlas(sg, *local(X, Y, Z, sg.center, sg.frame)), oid)
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
            wpts = np.array([to_world(sg, q) for q in pts])
            lo, hi = box_around(wpts, 10.0)
            cv.bone(lo, hi, lambda X, Y, Z, sg=sg, parts=parts, geo=geo:
                    _sdf_vertebra(sg, *local(X, Y, Z, sg.center, sg.frame), parts, geo), oid)
        elif sg.region == "sacral":
            oid = bt.add(0, cort * 0.9, canc * 0.9, ct_)
            d = sg.d
            ext = d["h"] / 2 + d["disc"] + 6.0
            lat = d["a"] + (45.0 if (d["q"] <= 2 or d.get("fused_l5")) else 4.0)
            lo, hi = local_box(sg, (-lat, -d["b"] - 28.0, -ext), (lat, d["b"] * 1.3 + 4.0, ext))
            cv.bone(lo, hi, lambda X, Y, Z, sg=sg: _sdf_sacral(sg, *local(X, Y, Z, sg.center, sg.frame)), oid)
        else:
            oid = bt.add(0, cort * 0.8, canc * 0.9, 0.8)
            R = 12.0
            cv.bone(sg.center - R, sg.center + R, lambda X, Y, Z, sg=sg: extrude(
                sd_ellipse(*local(X, Y, Z, sg.center, sg.frame)[:2], sg.d["a"], sg.d["b"]),
                np.abs(local(X, Y, Z, sg.center, sg.frame)[2]) - sg.d["h"] / 2), oid)


def _render_discs_canal(cv: Canvas, anat: Anatomy):
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
            u, v, w = local(X, Y, Z, c, F)
            return extrude(np.maximum(sd_ellipse(u, v, a, b), -(v + 0.85 * b)), np.abs(w) - hh)

        def tex(X, Y, Z, c=c, F=F, a=a, b=b):
            u, v, _ = local(X, Y, Z, c, F)
            r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            return 35.0 * np.clip(r, 0, 1) - 15.0  # annulus brighter than nucleus

        cv.paint(c - R, c + R, sdf, 85.0, T_DISC, texture=tex)
    # spinal canal: CSF tube through canal centres
    pts = []
    for sg in segs:
        if sg.region in ("cervical", "thoracic", "lumbar"):
            vc = -0.85 * sg.d["b"] - sg.d["cd"] if sg.name != "C1" else -5.0 * sg.d.get("s", 1.0)
            pts.append((to_world(sg, (0, vc, 0)), sg.d.get("cd", 7.0) * 0.9))
    for (p0, r0), (p1, _r1) in zip(pts[:-1], pts[1:], strict=True):
        lo, hi = box_around([p0, p1], r0 + 2)
        cv.paint(lo, hi, lambda X, Y, Z, p0=p0, p1=p1, r0=r0: sd_segment(X, Y, Z, p0, p1) - r0, 12.0, T_FLUID)


def _rib_paths(anat: Anatomy, spec: CaseSpec):
    """Rib centre-lines (world mm) per thoracic vertebra and side, with cartilage start index."""
    segs = [sg for sg in anat.segments if sg.region == "thoracic"]
    n = len(segs)
    out = []
    p = anat.params
    for i, sg in enumerate(segs):
        d = sg.d
        prof = body_profile(anat, spec, np.array([sg.center[2]]))
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
            head = to_world(sg, (sgn * (d["a"] + 2.5), -0.45 * d["b"], 0.42 * d["h"]))
            tub = to_world(sg, tip + np.array((sgn * 1.0, -d["rt"] - 3.0, 0.0)))
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


def _render_ribs_sternum(cv: Canvas, anat: Anatomy, spec: CaseSpec, bt: BoneTable, info: dict):
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
            lo, hi = box_around([a, b], r + 1.5)
            if j + 1 > rb["cart_from"]:
                cv.paint(lo, hi, lambda X, Y, Z, a=a, b=b, r=r: sd_segment(X, Y, Z, a, b) - r * 0.85, 120.0, T_CART)
            else:
                cv.bone(lo, hi, lambda X, Y, Z, a=a, b=b, r=r: sd_segment(X, Y, Z, a, b) - r, oid)
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
            d2 = sd_ellipse(X - a[0], Y - yy, wdt, 6.0)
            return extrude(d2, np.maximum(Z - a[2], b[2] - Z))

        cv.bone(np.array((a[0] - 30, b[1] - 25, zbot - 2)), np.array((a[0] + 30, b[1] + 15, ztop + 2)), sdf, oid)
        info["sternum"] = (a, b)
    # clavicles and scapulae
    t1 = th[0]
    prof = body_profile(anat, spec, np.array([t1.center[2] + 12]))
    W = float(prof["W"][0])
    for sgn in (-1, 1):
        oid = bt.add(0, p["cort_hu"] * 0.85, p["canc_hu"], 1.2)
        a = np.array((sgn * 18.0, t1.center[1] + 70.0, t1.center[2] + 2.0))
        m = np.array((sgn * 0.55 * W, t1.center[1] + 55.0, t1.center[2] + 8.0))
        b = np.array((sgn * (W - 18.0), t1.center[1] + 5.0, t1.center[2] + 12.0))
        for q0, q1 in ((a, m), (m, b)):
            lo, hi = box_around([q0, q1], 8)
            cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: sd_segment(X, Y, Z, q0, q1) - 5.5, oid)
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
            return extrude(np.maximum(d_in, np.maximum(Z - zt, zb - Z)), np.abs(Y - yy) - 3.0)

        cv.bone(np.array((cx - 60, cy - 25, zb - 3)), np.array((cx + 60, cy + 25, zt + 3)), scap, oid)


def _render_pelvis(cv: Canvas, anat: Anatomy, bt: BoneTable):
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
            e = sd_ellipsoid(X - c[0], Y - c[1], Z - c[2], rx, ry, rz)
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
            np.abs(length(X - fh[0], Y - fh[1], Z - fh[2]) - 29.0 * s) - 3.5,
            -((X - fh[0]) * -sgn + (Z - fh[2]) * 0.7) - 2), oid)
        troch = fh + np.array((sgn * 38.0, -8.0, -18.0)) * s
        shaft = troch + np.array((sgn * -12.0, 6.0, -320.0))
        oid3 = bt.add(0, p["cort_hu"], p["canc_hu"] * 0.9, 2.5)
        cv.bone(fh - 27, fh + 27, lambda X, Y, Z, fh=fh: length(X - fh[0], Y - fh[1], Z - fh[2]) - 23.5 * s, oid2)
        for q0, q1, r in ((fh, troch, 14.0), (troch, shaft, 13.0)):
            lo, hi = box_around([q0, q1], r + 3)
            cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r=r: sd_segment(X, Y, Z, q0, q1) - r * s, oid3)
        # pubic and ischial rami
        sym_top = np.array((sgn * 6.0, sy + 118.0 * s, z_hip - 5.0))
        sym_bot = np.array((sgn * 7.0, sy + 112.0 * s, z_hip - 38.0))
        isch = np.array((sgn * 62.0 * s, sy + 45.0 * s, z_hip - 48.0))
        ant = fh + np.array((-sgn * 18.0, 22.0, 4.0)) * s
        post = fh + np.array((-sgn * 10.0, -24.0, -18.0)) * s
        for q0, q1, r in ((ant, sym_top, 7.5), (sym_top, sym_bot, 7.5), (sym_bot, isch, 6.5), (post, isch, 10.0)):
            lo, hi = box_around([q0, q1], r + 3)
            cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r=r: sd_segment(X, Y, Z, q0, q1) - r, oid)


def _render_skull(cv: Canvas, anat: Anatomy, bt: BoneTable):
    p = anat.params
    s = p["s"] * p["head_scale"]
    c1 = anat.segments[0]
    base = c1.center
    oid = bt.add(0, p["cort_hu"] * 1.05, p["canc_hu"] * 1.2, 2.0)
    # vault: ellipsoidal shell above the foramen magnum
    cc = base + np.array((0.0, 22.0 * s, 62.0 * s))
    rx, ry, rz = 72.0 * s, 92.0 * s, 80.0 * s

    def vault(X, Y, Z):
        e = sd_ellipsoid(X - cc[0], Y - cc[1], Z - cc[2], rx, ry, rz)
        shell = np.abs(e + 3.5) - 3.5
        fm = length(X - base[0], (Y - base[1] - 2.0) * 0.8) - 15.0 * s  # foramen magnum
        shell = np.maximum(shell, -np.maximum(fm, Z - (base[2] + 40.0)))
        face = np.maximum(Y - cc[1] - 20.0, cc[2] - 25.0 * s - Z)  # open to the face below the brow
        return np.maximum(shell, -face)

    R = np.array((rx, ry, rz)) + 8
    cv.bone(cc - R, cc + R, vault, oid)
    # brain inside
    cv.paint(cc - R, cc + R, lambda X, Y, Z: np.maximum(sd_ellipsoid(X - cc[0], Y - cc[1], Z - cc[2], rx - 8, ry - 8, rz - 8),
                                                       (cc[2] - 0.55 * rz) - Z), 34.0, T_BRAIN)
    # condyles, petrous ridges, mastoids, clivus
    for sgn in (-1, 1):
        for q0, q1, r in (
            (base + np.array((sgn * 18.5, 1.0, 10.0)) * s, base + np.array((sgn * 17.0, 6.0, 15.0)) * s, 5.5),
            (base + np.array((sgn * 22.0, 12.0, 28.0)) * s, base + np.array((sgn * 52.0, -8.0, 30.0)) * s, 8.0),
            (base + np.array((sgn * 48.0, -12.0, 28.0)) * s, base + np.array((sgn * 50.0, -10.0, 8.0)) * s, 7.0),
        ):
            lo, hi = box_around([q0, q1], r + 3)
            cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1, r=r: sd_segment(X, Y, Z, q0, q1) - r, oid)
    q0, q1 = base + np.array((0, 14.0, 18.0)) * s, base + np.array((0, 32.0, 46.0)) * s
    lo, hi = box_around([q0, q1], 12)
    cv.bone(lo, hi, lambda X, Y, Z: sd_segment(X, Y, Z, q0, q1) - 8.0, oid)
    # mandible (U shape) with teeth, hard palate
    oid2 = bt.add(0, p["cort_hu"] * 1.1, p["canc_hu"] * 1.3, 2.0)
    chin = base + np.array((0.0, 88.0, -28.0)) * s
    pts = [base + np.array((sgn * 48.0, 28.0, 22.0)) * s for sgn in (-1,)] + [
        base + np.array((-46.0, 30.0, -18.0)) * s, base + np.array((-30.0, 70.0, -26.0)) * s, chin,
        base + np.array((30.0, 70.0, -26.0)) * s, base + np.array((46.0, 30.0, -18.0)) * s,
        base + np.array((48.0, 28.0, 22.0)) * s]
    for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
        lo, hi = box_around([q0, q1], 10)
        cv.bone(lo, hi, lambda X, Y, Z, q0=q0, q1=q1: sd_segment(X, Y, Z, q0, q1) - 6.5, oid2)
    pal = base + np.array((0.0, 58.0, 8.0)) * s
    cv.bone(pal - 40, pal + 40, lambda X, Y, Z: extrude(sd_ellipse(X - pal[0], Y - pal[1], 24.0 * s, 28.0 * s),
                                                         np.abs(Z - pal[2]) - 3.0), oid2)


def render_skeleton(cv: Canvas, anat: Anatomy, spec: CaseSpec, info: dict) -> BoneTable:
    """Discs and spinal canal (painted), then every bone object unioned into the canvas: spine,
    ribs, sternum, clavicles, scapulae, pelvis, femora, skull. Returns the bone table of the
    objects, for :func:`composite_bone`."""
    _render_discs_canal(cv, anat)
    bt = BoneTable()
    _render_spine(cv, anat, bt, info)
    _render_ribs_sternum(cv, anat, spec, bt, info)
    _render_pelvis(cv, anat, bt)
    _render_skull(cv, anat, bt)
    return bt


def composite_bone(cv: Canvas, bt: BoneTable, tex_seed: int, xs, ys, zf, vox: float) -> tuple[np.ndarray, np.ndarray]:
    """Composite the unioned bone SDF into the canvas HU and tissue; returns the vertebra labels
    and the rib levels of the thin slices (uint8, canvas shape).

    Partial-volume ramp over one voxel (``vox`` mm), cortex of the object's thickness, marrow
    textured at the world points ``xs``, ``ys``, ``zf`` (mm) of the canvas grid.
    """
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
            tex = _bone_texture(tex_seed, xs[idx[0][deep]], ys[idx[1][deep]], zf[idx[2][deep]], vox)
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
    return lab, ribs


def _bone_texture(seed: int, x, y, z, vox: float) -> np.ndarray:
    """Trabecular-like mottling (HU, about +-30) of cancellous bone at world points."""
    c1 = max(2.5, 1.6 * vox)
    t = noise_points(seed + 77, c1, x, y, z) + 0.6 * noise_points(seed + 78, c1 * 0.5 if vox < 1.2 else c1 * 1.7, x, y, z)
    return t * np.float32(20.0)
