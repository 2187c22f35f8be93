"""The four raw CTSpine1K sources and VerSe: synthetic generation and verification of downloads.

Synthetic profile (the default) writes ``data/<profile>/sources/`` in the layouts and formats of
the public archives (DESIGN §5-6):

* ``COLONOG/<PatientID>/<study>/<series>/*.dcm`` - CT colonography, DICOM, two positions
  (prone and supine) per patient, abdominal field of view, finest z of all sources.
* ``HNSCC/<HN_Pxxx>/<study per time point>/<series>/*.dcm`` - head and neck, DICOM, three time
  points per patient, neck field of view, 2.0 mm z.
* ``MSD_T10/imagesTr/liver_<n>.nii.gz`` - Medical Segmentation Decathlon task 10 style NIfTI,
  abdominal field of view, z spacing 1.55 +- 1.2 mm.
* ``COVID19/volume-covid19-A-0<nnn>.nii.gz`` - chest NIfTI, 4.5 mm z.
* ``VerSe/rawdata/sub-verse<nnn>/sub-verse<nnn>[_dir-ax]_ct.nii.gz`` and
  ``VerSe/derivatives/sub-verse<nnn>/..._seg-vert_msk.nii.gz`` / ``..._seg-subreg_ctd.json``
  (BIDS; masks and centroids are part of this public source).

The truth for the CTSpine1K sources (masks, variants, low-quality flags, planted identifiers)
goes to ``data/<profile>/oracle/`` (see :mod:`lib.oracle`), never next to the sources.

Paper profile: :func:`verify_sources` checks that the user's downloads are where the params say
and in the expected layout, and lists precisely what is missing.

Geometry conventions: arrays are ``(x, y, z)`` in RAS+ voxel order unless stated, affines are
4x4 voxel -> world (mm) in RAS; DICOM is written in LPS as the standard requires.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from nibabel import orientations as nib_orient

from lib.core.seeding import stable_rng, stable_seed
from lib.datasets.ctspine1k.ids import release_id_for
from lib.datasets.ctspine1k.split_file import write_split_file
from lib.datasets.downloads import VerifyReport, verify_sources  # noqa: F401  (temporary)
from lib.datasets.paper_facts import PAPER_SPLIT_COUNTS, PAPER_TABLE1, PAPER_VARIANTS  # noqa: F401
from lib.datasets.verse import read_verse_centroids, write_verse_centroids  # noqa: F401
from lib.imaging.resampling import reorient_array
from lib.io import atomic_path, save_volume
from lib.io.dicom_write import deterministic_uid, format_ds, write_dicom_series

# ============================================================================ synthetic sources

SOURCES = ("COLONOG", "HNSCC", "MSD_T10", "COVID19", "VerSe")
SPLIT_ORDER = ("trainset", "test_public", "test_private")
CTSPINE1K_SOURCES = ("COLONOG", "HNSCC", "MSD_T10", "COVID19")


_SURNAMES = ("MILLER", "GARCIA", "NGUYEN", "SMITH", "KOWALSKI", "MUELLER", "ROSSI", "TANAKA", "DUBOIS",
             "OKAFOR", "LINDQVIST", "HASSAN", "NOVAK", "SILVA", "MURPHY", "PETROV")
_GIVEN = ("ANNA", "JAMES", "MARIA", "WEI", "FATIMA", "PETER", "LUCIA", "OMAR", "HELEN", "JOHN", "SOFIA", "RAJ")
_CITIES = ("SPRINGFIELD", "RIVERTON", "LAKEWOOD", "FAIRVIEW", "MAPLETON", "GREENVILLE")
_SCANNERS = (("SIEMENS", "SOMATOM Definition AS+", "B30f"), ("GE MEDICAL SYSTEMS", "LightSpeed VCT", "STANDARD"),
             ("TOSHIBA", "Aquilion ONE", "FC03"), ("Philips", "Brilliance 64", "B"))
_TOKEN_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def _token(rng) -> str:
    return "".join(rng.choice(list(_TOKEN_ALPHABET), 6))


def _date(rng, y0: int, y1: int) -> str:
    y = int(rng.integers(y0, y1 + 1))
    return f"{y:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


def _shift_date(date: str, days: int) -> str:
    import datetime as _dt

    d = _dt.date(int(date[:4]), int(date[4:6]), int(date[6:])) + _dt.timedelta(days=days)
    return d.strftime("%Y%m%d")


def _identity(rng, source: str, age_range: tuple[int, int], years: tuple[int, int]) -> dict:
    """Identifying and descriptive DICOM tags of one synthetic patient, with planted tokens."""
    tok = _token(rng)
    sex = str(rng.choice(["F", "M"]))
    study_date = _date(rng, *years)
    age = int(rng.integers(age_range[0], age_range[1] + 1))
    birth = _shift_date(study_date, -int(age * 365.25 + rng.integers(0, 300)))
    man, model, kernel = _SCANNERS[int(rng.integers(len(_SCANNERS)))]
    city = str(rng.choice(_CITIES))
    return {
        "token": tok,
        "PatientName": f"{rng.choice(_SURNAMES)}{tok}^{rng.choice(_GIVEN)}",
        "OtherPatientIDs": f"MRN{tok}{int(rng.integers(1000, 9999))}",
        "PatientBirthDate": birth,
        "PatientSex": sex,
        "PatientAge": f"{age:03d}Y",
        "InstitutionName": f"{city} GENERAL HOSPITAL {tok}",
        "InstitutionAddress": f"{int(rng.integers(1, 999))} MAIN ST {tok} {city}",
        "ReferringPhysicianName": f"DR{tok}^{rng.choice(_GIVEN)}",
        "OperatorsName": f"TECH{tok}",
        "StationName": f"CT{tok}",
        "DeviceSerialNumber": f"SN{tok}{int(rng.integers(100, 999))}",
        "AccessionNumber": f"A{tok}{int(rng.integers(10000, 99999))}",
        "StudyID": f"S{tok}",
        "StudyDate": study_date,
        "StudyTime": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        "Manufacturer": man,
        "ManufacturerModelName": model,
        "ConvolutionKernel": kernel,
        "KVP": str(int(rng.choice([100, 120, 120, 140]))),
        "XRayTubeCurrent": int(rng.integers(80, 400)),
    }


#: Tag keywords whose values identify a patient (written with planted tokens; audited).
PHI_KEYWORDS = ("PatientName", "OtherPatientIDs", "PatientBirthDate", "InstitutionName", "InstitutionAddress",
                "ReferringPhysicianName", "OperatorsName", "StationName", "DeviceSerialNumber",
                "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
                "StudyTime")


def _choose_exact(rng, n: int, counts: dict) -> list:
    """Assign labels to n items with exact counts for the given keys (rest 'default')."""
    out = ["default"] * n
    order = list(rng.permutation(n))
    for key, c in counts.items():
        for _ in range(min(c, len(order))):
            out[order.pop()] = key
    return out


def plan_sources(cfg: Mapping[str, object]) -> list[dict]:
    """Plan every synthetic source volume (no rendering): a list of picklable work items.

    Args:
        cfg: the 00_sources parameters (see ``params/<profile>/00_sources.yaml``): counts per
            source, grids, variant fractions, low-quality counts, seed.

    Returns:
        One dict per volume to write, in a stable order, each with ``item_id``, ``source``,
        ``patient_id``, ``spec`` (a :class:`lib.phantom.CaseSpec` as dict) and the
        format-specific fields (folders, tags, slice order, orientation, quality flag).
    """
    from lib.phantom import CaseSpec

    c = dict(cfg)
    seed = int(c["seed"])
    rng = np.random.default_rng([seed, 1000])
    ip = float(c["inplane_mm"])
    items: list[dict] = []

    def anatomy(src: str, i: int, r) -> dict:
        return dict(
            body_scale=float(np.clip(r.normal(1.05, 0.15), 0.8, 1.45)),
            lordosis=float(np.clip(r.normal(1.0, 0.18), 0.5, 1.5)),
            kyphosis=float(np.clip(r.normal(1.0, 0.18), 0.5, 1.6)),
            scoliosis_mm=float(r.uniform(5, 18)) if r.uniform() < 0.12 else 0.0,
            stump_ribs=bool(r.uniform() < 0.1),
            bone_density=float(r.uniform(0.7, 1.15)),
        )

    def noise(r, lo_hi=None):
        lo, hi = lo_hi or c["noise_hu_range"]
        return float(r.uniform(lo, hi))

    # ---- CTSpine1K sources: variants among the cases whose FOV holds the lumbosacral junction
    n_col, n_msd = int(c["n_colonog"]), int(c["n_msd"])
    n_ls = n_col + n_msd
    n_l6 = int(round(float(c["frac_l6"]) * n_ls))
    n_l5m = int(round(float(c["frac_l5_missing"]) * n_ls))
    n_tr = int(round(float(c["frac_transitional"]) * n_ls))
    ls_variant = _choose_exact(rng, n_ls, {"L6": n_l6, "L5_missing": n_l5m, "transitional": n_tr})
    n_metal = int(round(float(c["frac_metal"]) * n_ls))
    ls_metal = _choose_exact(rng, n_ls, {"metal": n_metal})

    def lumbar_of(v):
        return {"L6": 6, "L5_missing": 4}.get(v, 5)

    low = {"COLONOG": [], "MSD_T10": [], "HNSCC": []}
    low["COLONOG"] += ["noise"] * int(c["n_low_noise"]) + ["missing_slices"] * int(c["n_low_missing_slices"])
    low["MSD_T10"] += ["truncated"] * int(c["n_low_truncated"])

    # COLONOG: DICOM, two positions per patient
    for i in range(n_col + len(low["COLONOG"])):
        lowq = low["COLONOG"][i - n_col] if i >= n_col else ""
        v = ls_variant[i] if i < n_col else "default"
        r = stable_rng(seed, "COLONOG", i)
        pid = f"1.3.6.1.4.1.9328.50.4.{i + 1:04d}"
        ident = _identity(r, "COLONOG", (50, 80), (2005, 2008))
        pseed = stable_seed(seed, "COLONOG-anatomy", i)
        an = anatomy("COLONOG", i, r)
        study_desc = "CT COLONOGRAPHY SCREENING"
        study_folder = f"{ident['StudyDate'][4:6]}-{ident['StudyDate'][6:]}-{ident['StudyDate'][:4]}-Abdomen-{study_desc}-{int(r.integers(10000, 99999))}"
        for j, pos in enumerate(("supine", "prone")):
            sn = 2 + j
            spec = CaseSpec(seed=pseed, scan_seed=j, n_thoracic=12, n_lumbar=lumbar_of(v),
                            sacralization=v == "transitional", fov="abdomen",
                            spacing_mm=(ip, ip, float(c["z_colonog_mm"])), noise_hu=noise(r),
                            contrast_phase="native", metal=ls_metal[i] == "metal" if i < n_col else False,
                            colon_gas=True, position=pos, **an)
            if lowq == "noise":
                spec = replace(spec, noise_hu=float(c["low_noise_hu"]))
            items.append(dict(
                item_id=f"COLONOG/{pid}/{pos}", group=f"COLONOG/{pid}", source="COLONOG", patient_id=pid, fmt="dicom",
                spec=spec.to_dict(),
                time_point="", series_description=f"{pos.capitalize()} 1.0 {ident['ConvolutionKernel']}",
                study_folder=study_folder, series_folder=f"{sn}.000000-{pos.capitalize()}-{int(r.integers(10000, 99999))}",
                series_number=sn, study_description=study_desc, ident=ident, patient_position="HFS" if pos == "supine" else "HFP",
                slice_order=("descending", "ascending", "shuffled")[int(r.choice(3, p=[0.6, 0.3, 0.1]))],
                missing_slices=lowq == "missing_slices", quality="low" if lowq else "ok", quality_reason=lowq,
                body_part="ABDOMEN",
                variant=v if v != "default" else "normal"))

    # HNSCC: DICOM, three time points per patient, neck FOV
    n_tp = int(c["hnscc_time_points"])
    for i in range(int(c["n_hnscc"])):
        r = stable_rng(seed, "HNSCC", i)
        pid = f"HN_P{i + 1:03d}"
        ident = _identity(r, "HNSCC", (45, 78), (2003, 2012))
        pseed = stable_seed(seed, "HNSCC-anatomy", i)
        an = anatomy("HNSCC", i, r)
        for tp in range(n_tp):
            date = _shift_date(ident["StudyDate"], int(tp * r.integers(60, 120)))
            idt = dict(ident, StudyDate=date, AccessionNumber=f"A{ident['token']}{tp}{int(r.integers(1000, 9999))}")
            phase = "arterial" if r.uniform() < 0.5 else "native"
            spec = CaseSpec(seed=pseed, scan_seed=tp, fov="neck", spacing_mm=(ip, ip, float(c["z_hnscc_mm"])),
                            noise_hu=noise(r), contrast_phase=phase, **an)
            desc = "CT NECK W CONTRAST" if phase != "native" else "CT NECK WO CONTRAST"
            items.append(dict(
                item_id=f"HNSCC/{pid}/tp{tp}", source="HNSCC", patient_id=pid, fmt="dicom", spec=spec.to_dict(),
                time_point=str(tp), series_description=f"NECK {float(c['z_hnscc_mm']):.1f} SOFT",
                study_folder=f"{date[4:6]}-{date[6:]}-{date[:4]}-{desc}-{int(r.integers(10000, 99999))}",
                series_folder=f"2.000000-NECK {float(c['z_hnscc_mm']):.1f}-{int(r.integers(10000, 99999))}",
                series_number=2, study_description=desc, ident=idt, patient_position="HFS",
                slice_order="descending" if r.uniform() < 0.8 else "shuffled", missing_slices=False,
                quality="ok", quality_reason="", body_part="NECK", variant="normal"))

    # MSD T10: NIfTI, abdominal FOV, variable z
    zc = np.asarray(c["z_msd_choices_mm"], float)
    zw = np.asarray(c["z_msd_weights"], float)
    zw = zw / zw.sum()
    used_ids = set()
    for i in range(n_msd + len(low["MSD_T10"])):
        lowq = low["MSD_T10"][i - n_msd] if i >= n_msd else ""
        v = ls_variant[n_col + i] if i < n_msd else "default"
        r = stable_rng(seed, "MSD_T10", i)
        n = int(r.integers(0, 200))
        while n in used_ids:
            n = (n + 1) % 1000
        used_ids.add(n)
        stem = f"liver_{n}"
        z = float(r.choice(zc, p=zw))
        spec = CaseSpec(seed=stable_seed(seed, "MSD-anatomy", i), n_lumbar=lumbar_of(v), sacralization=v == "transitional",
                        fov="abdomen", spacing_mm=(ip, ip, z), noise_hu=noise(r), contrast_phase="portal",
                        metal=ls_metal[n_col + i] == "metal" if i < n_msd else False, **anatomy("MSD", i, r))
        if lowq == "truncated":
            spec = replace(spec, fov_xy_mm=170.0, fov_center_offset_mm=(75.0, -45.0))
        items.append(dict(item_id=f"MSD_T10/{stem}", source="MSD_T10", patient_id=stem, fmt="nifti", spec=spec.to_dict(),
                          rel_path=f"MSD_T10/imagesTr/{stem}.nii.gz", axcodes=("L", "P", "S") if r.uniform() < 0.7 else ("R", "A", "S"),
                          descrip_token=_token(r) if r.uniform() < 0.35 else "", time_point="", series_description="",
                          quality="low" if lowq else "ok", quality_reason=lowq, variant=v if v != "default" else "normal"))

    # COVID-19: NIfTI, chest FOV, thick slices
    for i in range(int(c["n_covid"])):
        r = stable_rng(seed, "COVID19", i)
        stem = f"volume-covid19-A-0{(14 + i * 37) % 1000:03d}"
        z = float(c["z_covid_mm"])
        spec = CaseSpec(seed=stable_seed(seed, "COVID-anatomy", i), fov="chest", spacing_mm=(ip, ip, z),
                        slice_thickness_mm=z, noise_hu=noise(r, c["covid_noise_hu_range"]), contrast_phase="native",
                        lung_opacity=float(r.uniform(0.1, 0.35)), **anatomy("COVID", i, r))
        items.append(dict(item_id=f"COVID19/{stem}", source="COVID19", patient_id=stem, fmt="nifti", spec=spec.to_dict(),
                          rel_path=f"COVID19/{stem}.nii.gz", axcodes=("R", "A", "S") if r.uniform() < 0.5 else ("L", "P", "S"),
                          descrip_token=_token(r) if r.uniform() < 0.35 else "", time_point="", series_description="",
                          quality="ok", quality_reason="", variant="normal"))

    # VerSe: BIDS, complete and cropped scans, oversampled variants, some masks on another grid
    n_v = int(c["n_verse"])
    counts = {"L6": int(round(float(c["verse_frac_l6"]) * n_v)), "L4": int(round(float(c["verse_frac_l4"]) * n_v))}
    tcounts = {"T11": int(round(float(c["verse_frac_t11"]) * n_v)), "T13": int(round(float(c["verse_frac_t13"]) * n_v))}
    if n_v >= 4:
        for k in counts:
            counts[k] = max(1, counts[k])
        for k in tcounts:
            tcounts[k] = max(1, tcounts[k])
    lv = _choose_exact(rng, n_v, counts)
    tv = _choose_exact(rng, n_v, tcounts)
    crop = _choose_exact(rng, n_v, {"crop": int(round(float(c["verse_frac_cropped"]) * n_v))})
    mdiff = _choose_exact(rng, n_v, {"diff": int(round(float(c["verse_frac_mask_spacing_differs"]) * n_v))})
    zv = float(c["z_verse_mm"])
    for i in range(n_v):
        r = stable_rng(seed, "VerSe", i)
        sub = f"sub-verse{(i * 7 + 4) % 1000:03d}" if n_v < 140 else f"sub-verse{i:03d}"
        nl = {"L6": 6, "L4": 4}.get(lv[i], 5)
        nt = {"T11": 11, "T13": 13}.get(tv[i], 12)
        fov = "verse_crop" if crop[i] == "crop" else "whole"
        # complete scans are spine-centred reconstructions (VerSe's in-plane FOV is the spine
        # region, not the whole body); cropped ones cover a run of levels
        spec = CaseSpec(seed=stable_seed(seed, "VerSe-anatomy", i), n_thoracic=nt, n_lumbar=nl, fov=fov,
                        spacing_mm=(ip, ip, zv), noise_hu=noise(r), contrast_phase=str(r.choice(["native", "portal"])),
                        metal=bool(r.uniform() < float(c["verse_frac_metal"])) and fov == "whole",
                        center_on_spine=fov == "whole", fov_xy_mm=float(c["verse_fov_xy_mm"]) if fov == "whole" else None,
                        **anatomy("VerSe", i, r))
        dir_ax = r.uniform() < 0.5
        stem = f"{sub}_dir-ax" if dir_ax else sub
        variant = "+".join([x for x in (lv[i], tv[i]) if x != "default"]) or "normal"
        items.append(dict(item_id=f"VerSe/{stem}", source="VerSe", patient_id=sub, fmt="verse", spec=spec.to_dict(),
                          rel_path=f"VerSe/rawdata/{sub}/{stem}_ct.nii.gz", stem=stem, subject=sub,
                          axcodes=tuple(str(a) for a in [("P", "I", "R"), ("L", "A", "S"), ("R", "P", "I"), ("R", "A", "S")][int(r.integers(4))]),
                          mask_zoom=(1.0, 1.0, 0.5) if mdiff[i] == "diff" else None, descrip_token="",
                          time_point="", series_description="complete" if fov == "whole" else "cropped",
                          quality="ok", quality_reason="", variant=variant))
    return items


# ----------------------------------------------------------------------------- writing


def _dicom_view(ct: np.ndarray, affine: np.ndarray, patient_position: str) -> tuple[np.ndarray, np.ndarray]:
    """Array/affine as a scanner stores them: HFS rows run R->L and columns A->P
    (ImageOrientationPatient 1,0,0,0,1,0); HFP is turned over (-1,0,0,0,-1,0)."""
    if patient_position.endswith("P"):
        return ct, np.asarray(affine, float)
    nx, ny = ct.shape[:2]
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return ct[::-1, ::-1, :], np.asarray(affine, float) @ flip


def _marker(oracle_root: Path, item_id: str) -> Path:
    return Path(oracle_root) / "_done" / (item_id.replace("/", "__") + ".json")


def _spec_from(d: Mapping):
    from lib.phantom import CaseSpec

    spec_d = dict(d)
    for k in ("spacing_mm", "fov_center_offset_mm", "z_range_mm", "crop_levels"):
        if spec_d.get(k) is not None:
            spec_d[k] = tuple(spec_d[k])
    return CaseSpec(**spec_d)


def generate_group(items: list[dict]) -> list[dict]:
    """Render and write the planned volumes of one group (one patient's scans that share a
    grid, e.g. COLONOG supine + prone) and their truth; return one result per volume.

    Module-level (picklable) for :func:`lib.parallel.map_cases`. Skips the work when every
    volume's completion marker from a previous run exists (markers are written last).
    """
    from lib.phantom import retain_heap

    with retain_heap():  # rendering and writing allocate many volume-sized arrays
        return _generate_group(items)


def _generate_group(items: list[dict]) -> list[dict]:
    from lib.phantom import generate_scans, plan_grid

    orc_root = Path(items[0]["oracle_root"])
    markers = [_marker(orc_root, it["item_id"]) for it in items]
    if all(m.exists() for m in markers) and not items[0].get("force"):
        out = []
        for m in markers:
            done = json.loads(m.read_text())
            done["skipped"] = True
            out.append(done)
        return out
    specs = [_spec_from(it["spec"]) for it in items]
    if len(specs) > 1:  # one scan range for the group, so the anatomy is rendered once
        shape, aff = plan_grid(specs[0])
        z0 = float(aff[2, 3])
        zr = (z0, z0 + (shape[2] - 1) * float(aff[2, 2]))
        specs = [replace(s, z_range_mm=zr) for s in specs]
    t0 = time.perf_counter()
    cases = generate_scans(specs)
    t_gen = (time.perf_counter() - t0) / len(cases)
    return [_write_item(it, case, t_gen) for it, case in zip(items, cases, strict=True)]


def generate_item(item: dict) -> dict:
    """Render and write one planned source volume and its truth; return its index row."""
    return generate_group([item])[0]


def _write_item(item: dict, case, t_gen: float) -> dict:
    from lib.oracle import write_truth

    src_root, orc_root = Path(item["sources_root"]), Path(item["oracle_root"])
    marker = _marker(orc_root, item["item_id"])
    spec = case.spec
    src = item["source"]
    phi: list[dict] = []
    thick = spec.slice_thickness_mm or spec.spacing_mm[2]
    if item["fmt"] == "dicom":
        ident = item["ident"]
        pos = item["patient_position"]
        arr, aff = _dicom_view(case.ct, case.affine, pos)
        marr, _ = _dicom_view(case.mask, case.affine, pos)
        study_uid = deterministic_uid("study", item["patient_id"], item["study_folder"], ident["AccessionNumber"])
        series_uid = deterministic_uid("series", study_uid, item["item_id"], spec.seed, spec.scan_seed)
        key = series_uid
        tags = {k: v for k, v in ident.items() if k != "token"}
        tags.update(PatientID=item["patient_id"], StudyDescription=item["study_description"],
                    SeriesDescription=item["series_description"], SeriesNumber=item["series_number"],
                    BodyPartExamined=item["body_part"], PatientPosition=pos, SliceThickness=format_ds(thick),
                    SeriesDate=ident["StudyDate"], AcquisitionDate=ident["StudyDate"], ContentDate=ident["StudyDate"],
                    ProtocolName=item["study_description"])
        if spec.contrast_phase != "native":
            tags["ContrastBolusAgent"] = "IOHEXOL"
        drop: tuple[int, ...] = ()
        nz = arr.shape[2]
        if item.get("missing_slices"):
            rng = np.random.default_rng([spec.seed, 31])
            n = max(3, int(round(0.06 * nz)))
            k0 = nz // 2 - n // 2 + int(rng.integers(-4, 5))
            extra = [int(x) for x in rng.choice(np.arange(5, nz - 5), 2, replace=False)]
            drop = tuple(sorted(set(range(k0, k0 + n)) | set(extra)))
        folder = src_root / src / item["patient_id"] / item["study_folder"] / item["series_folder"]
        t1 = time.perf_counter()
        write_dicom_series(arr, aff, folder, tags, slice_order=item["slice_order"], drop_slices=drop,
                           series_uid=series_uid, study_uid=study_uid)
        t_write = time.perf_counter() - t1
        image_rel = str(folder.relative_to(src_root))
        truth_mask, truth_aff = marr, aff
        for kw in PHI_KEYWORDS:
            if kw in tags:
                phi.append(dict(source=src, patient_id=item["patient_id"], source_key=key, keyword=kw,
                                value=str(tags[kw]), token=ident["token"]))
        phi.append(dict(source=src, patient_id=item["patient_id"], source_key=key, keyword="folder_name",
                        value=item["study_folder"], token=""))
        shape = arr.shape
    else:
        arr, aff = reorient_array(case.ct, case.affine, item["axcodes"])
        path = src_root / item["rel_path"]
        descrip = f"{item['descrip_token']} scan" if item.get("descrip_token") else ""
        t1 = time.perf_counter()
        save_volume(arr.astype(np.int16), aff, path, descrip=descrip)
        key = path.name[: -len(".nii.gz")]
        truth_mask, _ = reorient_array(case.mask, case.affine, item["axcodes"])
        truth_aff = aff
        if item["fmt"] == "verse":
            from lib.imaging.resampling import resample_labels_to

            sub, stem = item["subject"], item["stem"]
            der = src_root / "VerSe" / "derivatives" / sub
            m_aff, m_shape, m_arr = case.affine, case.mask.shape, case.mask
            if item.get("mask_zoom"):
                zf = np.asarray(item["mask_zoom"], float)
                m_aff = case.affine @ np.diag([*zf, 1.0])
                m_shape = tuple(int(round(n / z)) for n, z in zip(case.mask.shape, zf, strict=True))
                m_arr = resample_labels_to(case.mask, case.affine, m_shape, m_aff)
            m_out, m_out_aff = reorient_array(m_arr, m_aff, item["axcodes"])
            save_volume(m_out.astype(np.uint8), m_out_aff, der / f"{stem}_seg-vert_msk.nii.gz")
            write_verse_centroids(der / f"{stem}_seg-subreg_ctd.json", case.centroids, aff, arr.shape)
        t_write = time.perf_counter() - t1
        image_rel = item["rel_path"]
        if item.get("descrip_token"):
            phi.append(dict(source=src, patient_id=item["patient_id"], source_key=key, keyword="nifti_descrip",
                            value=descrip, token=item["descrip_token"]))
        shape = arr.shape
    mpath, cpath = write_truth(orc_root, src, key, truth_mask, truth_aff, case.centroids)
    sp = spec.spacing_mm
    row = dict(
        source=src, patient_id=item["patient_id"], source_key=key, series_description=item.get("series_description", ""),
        time_point=item.get("time_point", ""), n_thoracic=spec.n_thoracic, n_lumbar=spec.n_lumbar,
        variant=item["variant"], sacralization=spec.sacralization, fov=spec.fov, spacing_x_mm=sp[0],
        spacing_y_mm=sp[1], spacing_z_mm=sp[2], slice_thickness_mm=thick, shape="x".join(str(n) for n in shape),
        quality=item["quality"], quality_reason=item["quality_reason"], metal=spec.metal,
        contrast_phase=spec.contrast_phase, labels=" ".join(str(v) for v in sorted(case.centroids)),
        seed=spec.seed, scan_seed=spec.scan_seed, mask_path=str(mpath.relative_to(orc_root)),
        centroids_path=str(cpath.relative_to(orc_root)), image_path=image_rel)
    timing = dict(item_id=item["item_id"], source=src, voxels=int(np.prod(shape)), generate_s=0.0, write_s=0.0)
    done = dict(row=row, phi=phi, timing=timing)
    # the marker holds no wall times, so the oracle folder is byte-identical for a seed
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(done, sort_keys=True))
    done = dict(done, timing=dict(timing, generate_s=round(t_gen, 3), write_s=round(t_write, 3)), skipped=False)
    return done


@dataclass
class GenerationReport:
    """What :func:`generate_sources` did."""

    index: pd.DataFrame
    timings: pd.DataFrame
    failures: list = field(default_factory=list)
    skipped: int = 0

    def summary(self) -> str:
        return (f"{len(self.index)} volumes ({self.skipped} already there), {len(self.failures)} failed"
                + ("".join(f"\n  - {f}" for f in self.failures)))


def generate_sources(paths, cfg: Mapping[str, object], workers: int = 0, on_error: str = "collect",
                     force: bool = False, progress: bool = True) -> GenerationReport:
    """Generate every synthetic source and the oracle for a profile.

    Writes ``paths.sources`` (COLONOG, HNSCC, MSD_T10, COVID19, VerSe) and ``paths.oracle``
    (``index.csv``, ``phi_planted.json``, truth masks and centroids). Re-runs skip finished
    volumes; an interrupted run resumes. Failures are collected (``on_error="collect"``) and
    reported, never silently dropped.
    """
    from lib.core.parallel import map_cases

    items = plan_sources(cfg)
    src_root, orc_root = Path(paths.sources), Path(paths.oracle)
    src_root.mkdir(parents=True, exist_ok=True)
    orc_root.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(it.get("group", it["item_id"]), []).append(
            dict(it, sources_root=str(src_root), oracle_root=str(orc_root), force=force))
    res = map_cases(generate_group, list(groups.values()), ids=list(groups), workers=workers,
                    on_error=on_error, desc="00_sources", progress=progress)
    by_item = {}
    for gid, outs in res.values.items():
        for it, out in zip(groups[gid], outs, strict=True):
            by_item[it["item_id"]] = out
    rows, phi, timings, skipped = [], [], [], 0
    for it in items:
        out = by_item.get(it["item_id"])
        if out is None:
            continue
        rows.append(out["row"])
        phi.extend(out["phi"])
        timings.append(dict(out["timing"], skipped=out.get("skipped", False)))
        skipped += int(out.get("skipped", False))
    index = pd.DataFrame(rows, columns=list(_index_columns()))
    from lib.io import write_text

    write_text(orc_root / "index.csv", index.to_csv(index=False))
    tokens = sorted({p["token"] for p in phi if p["token"]})
    write_text(orc_root / "phi_planted.json", json.dumps({"tokens": tokens, "values": phi}, indent=1))
    _write_msd_dataset_json(src_root, index)
    write_official_split(src_root / "data_split.txt", index, seed=int(cfg.get("seed", 0)))
    return GenerationReport(index=index, timings=pd.DataFrame(timings), failures=list(res.failures), skipped=skipped)


def official_split(index: pd.DataFrame, seed: int, min_per_test_split: dict[str, int] | None = None
                   ) -> dict[str, str]:
    """The synthetic release's official split (``{release_id: split}``), as CTSpine1K ships one.

    Per source, the paper's proportions (:data:`PAPER_SPLIT_COUNTS`). The generator knows the
    variants, and the real test splits hold the paper's L6 and lumbar-sacralisation cases, so
    variant patients are dealt to each test split first until it holds
    ``min_per_test_split`` of each (default 3 L6 and 2 missing L5, the failure analysis'
    minimum), within each source's test-slot counts; the rest is seeded and random. Only
    good-quality volumes are listed (a real release ships no discarded scan).
    """
    minimum = {"L6": 3, "L5_missing": 2} if min_per_test_split is None else dict(min_per_test_split)
    ok = index[(index["quality"] == "ok") & index["source"].isin(list(PAPER_SPLIT_COUNTS))]
    patients: dict[str, tuple[str, str]] = {}  # release id -> (source, variant)
    for r in ok.itertuples():
        key = r.patient_id if r.source in ("COLONOG", "HNSCC") else r.source_key
        patients.setdefault(release_id_for(r.source, str(key)), (r.source, str(r.variant)))
    rng = np.random.default_rng(seed)
    slots: dict[tuple[str, str], int] = {}
    for src, per_split in PAPER_SPLIT_COUNTS.items():
        counts = tuple(per_split[s] for s in SPLIT_ORDER)
        n = sum(1 for s, _ in patients.values() if s == src)
        frac = np.asarray(counts, float) / sum(counts)
        pub, priv = int(round(n * frac[1])), int(round(n * frac[2]))
        slots[(src, "test_public")], slots[(src, "test_private")] = pub, priv
    assignment: dict[str, str] = {}
    for kind, need in minimum.items():
        cands = sorted(rid for rid, (_, v) in patients.items() if kind in v.split("+"))
        cands = [cands[i] for i in rng.permutation(len(cands))]
        for split in ("test_public", "test_private"):
            got = 0
            for rid in cands:
                src = patients[rid][0]
                if got >= need:
                    break
                if rid not in assignment and slots[(src, split)] > 0:
                    assignment[rid] = split
                    slots[(src, split)] -= 1
                    got += 1
    for src in PAPER_SPLIT_COUNTS:
        rest = sorted(rid for rid, (s, _) in patients.items() if s == src and rid not in assignment)
        rest = [rest[i] for i in rng.permutation(len(rest))]
        for rid in rest:
            for split in ("test_public", "test_private"):
                if slots[(src, split)] > 0:
                    assignment[rid] = split
                    slots[(src, split)] -= 1
                    break
            else:
                assignment[rid] = "trainset"
    return assignment


def write_official_split(path: Path, index: pd.DataFrame, seed: int) -> Path:
    """Write :func:`official_split` as ``data_split.txt`` in the release's official format."""
    return write_split_file(path, official_split(index, seed))


def _index_columns():
    from lib.oracle import INDEX_COLUMNS

    return INDEX_COLUMNS


def _write_msd_dataset_json(src_root: Path, index: pd.DataFrame) -> None:
    """MSD archives ship a dataset.json listing the training images; mimic it."""
    msd = index[index["source"] == "MSD_T10"]
    if msd.empty:
        return
    from lib.io import write_text

    body = {"name": "Liver", "description": "synthetic stand-in for the MSD task archive", "tensorImageSize": "3D",
            "modality": {"0": "CT"}, "numTraining": int(len(msd)),
            "training": [{"image": "./" + str(Path(p).relative_to("MSD_T10")), "label": None} for p in msd["image_path"]]}
    write_text(src_root / "MSD_T10" / "dataset.json", json.dumps(body, indent=1))


# ----------------------------------------------------------------------------- reading back


def load_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a DICOM series with SimpleITK (GDCM sorts slices by position) in HU.

    Returns:
        (array, affine): array (x, y, z) in the file's row/column/slice order, as float32 HU;
        affine the RAS voxel -> world matrix (LPS from DICOM converted to RAS).
    """
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    if not names:
        raise FileNotFoundError(f"{folder}: no DICOM series")
    reader.SetFileNames(names)
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    D = np.array(img.GetDirection(), float).reshape(3, 3)
    M = np.eye(4)
    M[:3, :3] = D * np.array(img.GetSpacing(), float)
    M[:3, 3] = img.GetOrigin()
    return arr.astype(np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]) @ M


def load_source_volume(sources_root: Path, image_path: str):
    """Load one source image (DICOM series folder or NIfTI) as a canonical :class:`lib.io.Volume`."""
    from lib.io import Volume, load_volume, to_canonical_order

    p = Path(sources_root) / image_path
    if p.is_dir():
        arr, aff = load_dicom_series(p)
        ornt = nib_orient.io_orientation(aff)
        can = np.ascontiguousarray(to_canonical_order(arr, ornt))
        ras = nib_orient.axcodes2ornt(("R", "A", "S"))
        can_aff = aff @ nib_orient.inv_ornt_aff(nib_orient.ornt_transform(ornt, ras), arr.shape)
        return Volume(can, can_aff, aff, ornt, None, p)
    return load_volume(p, canonical=True)


def showcase_rows(index: pd.DataFrame) -> pd.DataFrame:
    """One good-quality row per source and one row per variant / special kind, for figures.

    Kinds: each source; variants L6, L5_missing, transitional, T11, T13; metal; stump-free
    low-quality kinds (noise, truncated, missing_slices); VerSe cropped and mask-on-other-grid.
    """
    picks: list[tuple[str, pd.Series]] = []
    ok = index[index["quality"] == "ok"]
    for src in SOURCES:
        sub = ok[(ok["source"] == src) & (ok["variant"] == "normal")]
        if sub.empty:
            sub = ok[ok["source"] == src]
        if not sub.empty:
            picks.append((f"source_{src}", sub.iloc[0]))
    for var in ("L6", "L5_missing", "transitional", "T11", "T13"):
        sub = ok[ok["variant"].astype(str).str.split("+").apply(lambda v, var=var: var in v or (var == "L5_missing" and "L4" in v))]
        if not sub.empty:
            picks.append((f"variant_{var}", sub.iloc[0]))
    sub = ok[ok["metal"].astype(bool)]
    if not sub.empty:
        picks.append(("metal", sub.iloc[0]))
    low = index[index["quality"] == "low"]
    for reason in sorted(low["quality_reason"].dropna().unique()):
        picks.append((f"lowq_{reason}", low[low["quality_reason"] == reason].iloc[0]))
    rows = []
    for kind, row in picks:
        r = row.copy()
        r["kind"] = kind
        rows.append(r)
    return pd.DataFrame(rows).reset_index(drop=True)


def summarize_sources(index: pd.DataFrame) -> pd.DataFrame:
    """Per-source counts, spacing and size of the generated set beside the paper's Table 1."""
    rows = []
    for src in SOURCES:
        sub = index[index["source"] == src]
        if sub.empty:
            continue
        shapes = np.array([[int(v) for v in s.split("x")] for s in sub["shape"]])
        paper = PAPER_TABLE1[src]
        rows.append(dict(
            source=src, patients=sub["patient_id"].nunique(), volumes=len(sub),
            low_quality=int((sub["quality"] == "low").sum()),
            L6_patients=int(sub.loc[sub["variant"].str.contains("L6"), "patient_id"].nunique()),
            L5_missing_patients=int(sub.loc[sub["variant"].str.contains("L5_missing|L4", regex=True), "patient_id"].nunique()),
            mean_spacing_mm="({:.2f}, {:.2f}, {:.2f})".format(sub["spacing_x_mm"].mean(), sub["spacing_y_mm"].mean(),
                                                              sub["spacing_z_mm"].mean()),
            mean_size="x".join(str(int(round(v))) for v in shapes.mean(0)),
            paper_patients=paper["patients"], paper_spacing_mm=str(paper["spacing_mm"]),
            paper_size="x".join(str(v) for v in paper["size"]) if paper["size"] else "varies"))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- paper mode


def save_showcase_figures(paths, index: pd.DataFrame, out_dir: Path, progress: bool = True) -> pd.DataFrame:
    """Save an orthogonal-view figure (bone window, truth overlay) per showcase row.

    Reads each volume back from the written source (DICOM through SimpleITK, NIfTI through
    :mod:`lib.io`) and its truth through :func:`lib.oracle.load_truth`, so the pictures show
    what a pipeline will read, not the generator's arrays.

    Returns:
        Table with kind, source, patient_id, source_key, variant and the PNG path.
    """
    from tqdm.auto import tqdm

    from lib import oracle, viz

    rows = []
    picks = showcase_rows(index)
    for _, r in tqdm(list(picks.iterrows()), desc="figures", disable=not progress, leave=False):
        vol = load_source_volume(Path(paths.sources), r["image_path"])
        truth = oracle.load_truth(paths, r["source"], r["source_key"], vol)
        cents = oracle.load_centroids(paths, r["source"], r["source_key"])
        title = (f"{r['kind']}: {r['source']} {r['patient_id']} ({r['variant']}, {r['fov']}, "
                 f"z {float(r['spacing_z_mm']):.2f} mm{', ' + r['quality_reason'] if r['quality'] == 'low' else ''})")
        slices = None
        lumbar = [lab for lab in cents if 20 <= lab <= 25]
        if r["kind"].startswith("variant_") and lumbar and r["kind"] not in ("variant_T11", "variant_T13"):
            # variants of the lumbosacral junction: cut through the last lumbar vertebra
            ijk = np.linalg.inv(vol.affine) @ np.array([*cents[max(lumbar)], 1.0])
            fg = np.nonzero(truth)
            slices = (int(np.median(fg[0])), int(round(ijk[1])), int(round(ijk[2])))
        fig = viz.plot_ortho(vol.array, truth, vol.spacing, centroids=cents, affine=vol.affine, title=title,
                             slices=slices)
        png = Path(out_dir) / f"{r['kind']}.png"
        viz.save_figure(fig, png)
        rows.append(dict(kind=r["kind"], source=r["source"], patient_id=r["patient_id"], source_key=r["source_key"],
                         variant=r["variant"], png=str(png)))
    return pd.DataFrame(rows)


def timing_table(timings: pd.DataFrame) -> pd.DataFrame:
    """Seconds per volume (render, write) and megavoxels per second, by source."""
    t = timings[~timings["skipped"].astype(bool)] if "skipped" in timings else timings
    if t.empty:
        return pd.DataFrame()
    g = t.groupby("source")
    out = pd.DataFrame({
        "volumes": g.size(),
        "mean_voxels_M": g["voxels"].mean() / 1e6,
        "generate_s_per_volume": g["generate_s"].mean(),
        "write_s_per_volume": g["write_s"].mean(),
        "total_s": g["generate_s"].sum() + g["write_s"].sum(),
    })
    out["Mvox_per_s"] = out["mean_voxels_M"] / out["generate_s_per_volume"]
    return out.round(3).reset_index()


def probe_paper_scale(slices: int = 40, seed: int = 0, full_slices: int = 542) -> dict:
    """Time a slab of a paper-scale COLONOG-like case (512 x 512, 0.75 mm, 0.8 mm slices).

    Renders ``slices`` slices around L3 and extrapolates linearly to ``full_slices`` (the
    paper's mean COLONOG size, 512 x 512 x 542). A quick estimate for the notebook; the
    benchmark renders whole cases.
    """
    from lib.phantom import CaseSpec, _build_anatomy, generate_case

    base = CaseSpec(seed=seed, fov="abdomen", spacing_mm=(0.75, 0.75, 0.8), fov_xy_mm=384.0, colon_gas=True)
    z_l3 = [sg for sg in _build_anatomy(base).segments if sg.name == "L3"][0].center[2]
    spec = replace(base, z_range_mm=(z_l3 - 0.4 * slices, z_l3 + 0.4 * (slices - 1)))
    t0 = time.perf_counter()
    case = generate_case(spec)
    dt = time.perf_counter() - t0
    n = case.ct.shape[2]
    return dict(shape="x".join(map(str, case.ct.shape)), slab_s=round(dt, 3), s_per_slice=round(dt / n, 4),
                full_slices=full_slices, full_case_s_estimate=round(dt / n * full_slices, 1))


def timing_note(timing: pd.DataFrame, bench_json: Path | None = None, probe: dict | None = None) -> str:
    """Closing note: generation time per volume on this grid and at paper scale (probe, bench)."""
    lines = []
    if timing is not None and not timing.empty:
        n = int(timing["volumes"].sum())
        per = (timing["total_s"].sum()) / max(n, 1)
        worst = timing.loc[timing["generate_s_per_volume"].idxmax()]
        lines.append(f"**This grid:** {n} volumes rendered and written, {per:.2f} s per volume on average "
                     f"(slowest source {worst['source']}: {worst['generate_s_per_volume']:.2f} s render + "
                     f"{worst['write_s_per_volume']:.2f} s write per volume).")
    else:
        lines.append("**This grid:** nothing was rendered in this run (all volumes already existed).")
    if probe:
        lines.append(f"**Paper scale, estimated here:** a {probe['shape']} slab of a COLONOG-like case "
                     f"(0.75 mm, 0.8 mm slices) took {probe['slab_s']:.2f} s = {probe['s_per_slice']:.3f} s per "
                     f"slice, so about {probe['full_case_s_estimate']:.0f} s for a 512 x 512 x {probe['full_slices']} case.")
    if bench_json is not None and Path(bench_json).exists():
        b = json.loads(Path(bench_json).read_text())
        for row in b.get("cases", []):
            lines.append(f"**{row['scale']} scale** ({row['fov']}, {row['shape']}, {row['spacing_mm']} mm): "
                         f"{row['generate_s']:.2f} s per case ({row['mvox_per_s']:.1f} Mvoxel/s; bench run {b.get('when', '')}).")
    else:
        lines.append("**Paper scale, whole cases:** run `make bench` (bench/bench_phantom.py).")
    return "\n\n".join(lines)
