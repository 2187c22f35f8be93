"""Generate the synthetic sources: render each planned volume, write it in its source format.

Writes ``data/<profile>/sources/`` in the layouts of the public archives and the truth to
``data/<profile>/oracle/`` (:mod:`lib.synthetic.oracle`):

* ``COLONOG/<PatientID>/<study>/<series>/*.dcm`` - CT colonography, DICOM, two positions
  (prone and supine) per patient, abdominal field of view, finest z of all sources.
* ``HNSCC/<HN_Pxxx>/<study per time point>/<series>/*.dcm`` - head and neck, DICOM, three time
  points per patient, neck field of view, 2.0 mm z.
* ``MSD_T10/imagesTr/liver_<n>.nii.gz`` - Medical Segmentation Decathlon task 10 style NIfTI.
* ``COVID19/volume-covid19-A-0<nnn>.nii.gz`` - chest NIfTI, 4.5 mm z.
* ``VerSe/rawdata/sub-verse<nnn>/sub-verse<nnn>[_dir-ax]_ct.nii.gz`` and
  ``VerSe/derivatives/sub-verse<nnn>/..._seg-vert_msk.nii.gz`` / ``..._seg-subreg_ctd.json``.

Geometry: arrays ``(x, y, z)`` RAS+, affines voxel -> world (mm, RAS); DICOM is written in LPS.
Re-runs skip finished volumes (completion markers written last); a killed run resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.parallel import map_cases
from lib.datasets.verse import write_verse_centroids
from lib.imaging.resampling import reorient_array, resample_labels_to
from lib.io import atomic_path, save_volume, write_text
from lib.io.dicom_write import deterministic_uid, format_ds, write_dicom_series
from lib.synthetic.identities import PLANTED_PHI_KEYWORDS
from lib.synthetic.oracle import INDEX_COLUMNS, write_truth
from lib.synthetic.phantom import CaseSpec, generate_scans, plan_grid, retain_heap
from lib.synthetic.source_plan import plan_sources, write_official_split


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
    spec_d = dict(d)
    for k in ("spacing_mm", "fov_center_offset_mm", "z_range_mm", "crop_levels"):
        if spec_d.get(k) is not None:
            spec_d[k] = tuple(spec_d[k])
    return CaseSpec(**spec_d)


def generate_group(items: list[dict]) -> list[dict]:
    """Render and write the planned volumes of one group (one patient's scans that share a
    grid, e.g. COLONOG supine + prone) and their truth; return one result per volume.

    Module-level (picklable) for :func:`lib.core.parallel.map_cases`. Skips the work when every
    volume's completion marker from a previous run exists (markers are written last).
    """
    with retain_heap():  # rendering and writing allocate many volume-sized arrays
        return _generate_group(items)


def _generate_group(items: list[dict]) -> list[dict]:
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


@dataclass
class _WrittenImage:
    """What writing one source image produced (before the truth is written).

    Attributes:
        key: the volume's source key (SeriesInstanceUID, or the NIfTI file stem).
        image_rel: image path relative to the sources root (series folder or NIfTI file).
        truth_mask: label array on the written image's grid.
        truth_aff: its voxel -> world matrix (RAS, mm).
        shape: the written image array's shape.
        phi: planted identifying values, one dict per value.
        write_s: wall time of the write in seconds.
    """

    key: str
    image_rel: str
    truth_mask: np.ndarray
    truth_aff: np.ndarray
    shape: tuple[int, ...]
    phi: list[dict]
    write_s: float


def _dicom_tags(item: dict, spec: CaseSpec, thick: float) -> dict:
    """The DICOM tags of a planned series: the fake identity (less its token) and the series'
    descriptions, position, dates and ``SliceThickness`` (``thick``, mm)."""
    ident = item["ident"]
    tags = {k: v for k, v in ident.items() if k != "token"}
    tags.update(PatientID=item["patient_id"], StudyDescription=item["study_description"],
                SeriesDescription=item["series_description"], SeriesNumber=item["series_number"],
                BodyPartExamined=item["body_part"], PatientPosition=item["patient_position"],
                SliceThickness=format_ds(thick), SeriesDate=ident["StudyDate"], AcquisitionDate=ident["StudyDate"],
                ContentDate=ident["StudyDate"], ProtocolName=item["study_description"])
    if spec.contrast_phase != "native":
        tags["ContrastBolusAgent"] = "IOHEXOL"
    return tags


def _missing_slice_drop(item: dict, spec: CaseSpec, nz: int) -> tuple[int, ...]:
    """Slice indices left out of a "missing slices" series (a seeded central run of ~6 % of
    the ``nz`` slices plus two single slices); none for other series."""
    if not item.get("missing_slices"):
        return ()
    rng = np.random.default_rng([spec.seed, 31])
    n = max(3, int(round(0.06 * nz)))
    k0 = nz // 2 - n // 2 + int(rng.integers(-4, 5))
    extra = [int(x) for x in rng.choice(np.arange(5, nz - 5), 2, replace=False)]
    return tuple(sorted(set(range(k0, k0 + n)) | set(extra)))


def _write_dicom_image(item: dict, case, src_root: Path, thick: float) -> _WrittenImage:
    """Write a planned COLONOG / HNSCC volume as a DICOM series, with its planted PHI."""
    spec, src, ident = case.spec, item["source"], item["ident"]
    pos = item["patient_position"]
    arr, aff = _dicom_view(case.ct, case.affine, pos)
    marr, _ = _dicom_view(case.mask, case.affine, pos)
    study_uid = deterministic_uid("study", item["patient_id"], item["study_folder"], ident["AccessionNumber"])
    series_uid = deterministic_uid("series", study_uid, item["item_id"], spec.seed, spec.scan_seed)
    key = series_uid
    tags = _dicom_tags(item, spec, thick)
    drop = _missing_slice_drop(item, spec, arr.shape[2])
    folder = src_root / src / item["patient_id"] / item["study_folder"] / item["series_folder"]
    t1 = time.perf_counter()
    write_dicom_series(arr, aff, folder, tags, slice_order=item["slice_order"], drop_slices=drop,
                       series_uid=series_uid, study_uid=study_uid)
    t_write = time.perf_counter() - t1
    phi: list[dict] = []
    for kw in PLANTED_PHI_KEYWORDS:
        if kw in tags:
            phi.append(dict(source=src, patient_id=item["patient_id"], source_key=key, keyword=kw,
                            value=str(tags[kw]), token=ident["token"]))
    phi.append(dict(source=src, patient_id=item["patient_id"], source_key=key, keyword="folder_name",
                    value=item["study_folder"], token=""))
    return _WrittenImage(key, str(folder.relative_to(src_root)), marr, aff, arr.shape, phi, t_write)


def _write_verse_derivatives(item: dict, case, src_root: Path, aff: np.ndarray, shape: tuple[int, ...]) -> None:
    """Write a VerSe scan's mask (on another grid when ``mask_zoom``) and centroid file (the true
    vertebral-body centroids, as VerSe's ``_ctd.json`` holds).

    Args:
        item: the planned VerSe item.
        case: the rendered case (CT, mask, affine, centroids).
        src_root: the sources root.
        aff: voxel -> world (RAS, mm) of the written CT.
        shape: the written CT array's shape.
    """
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
    write_verse_centroids(der / f"{stem}_seg-subreg_ctd.json", case.body_centroids, aff, shape)


def _write_nifti_image(item: dict, case, src_root: Path) -> _WrittenImage:
    """Write a planned MSD / COVID-19 / VerSe volume as NIfTI in its planned orientation (VerSe
    with its derivatives), with the planted ``descrip`` token if any."""
    arr, aff = reorient_array(case.ct, case.affine, item["axcodes"])
    path = src_root / item["rel_path"]
    descrip = f"{item['descrip_token']} scan" if item.get("descrip_token") else ""
    t1 = time.perf_counter()
    save_volume(arr.astype(np.int16), aff, path, descrip=descrip)
    key = path.name[: -len(".nii.gz")]
    truth_mask, _ = reorient_array(case.mask, case.affine, item["axcodes"])
    if item["fmt"] == "verse":
        _write_verse_derivatives(item, case, src_root, aff, arr.shape)
    t_write = time.perf_counter() - t1
    phi: list[dict] = []
    if item.get("descrip_token"):
        phi.append(dict(source=item["source"], patient_id=item["patient_id"], source_key=key, keyword="nifti_descrip",
                        value=descrip, token=item["descrip_token"]))
    return _WrittenImage(key, item["rel_path"], truth_mask, aff, arr.shape, phi, t_write)


def _index_row(item: dict, case, img: _WrittenImage, thick: float, mpath: Path, cpath: Path,
               orc_root: Path) -> dict:
    """The oracle index row of one written volume (spacings and thickness in mm)."""
    spec, sp = case.spec, case.spec.spacing_mm
    return dict(
        source=item["source"], patient_id=item["patient_id"], source_key=img.key,
        series_description=item.get("series_description", ""),
        time_point=item.get("time_point", ""), n_thoracic=spec.n_thoracic, n_lumbar=spec.n_lumbar,
        variant=item["variant"], sacralization=spec.sacralization, fov=spec.fov, spacing_x_mm=sp[0],
        spacing_y_mm=sp[1], spacing_z_mm=sp[2], slice_thickness_mm=thick, shape="x".join(str(n) for n in img.shape),
        quality=item["quality"], quality_reason=item["quality_reason"], metal=spec.metal,
        contrast_phase=spec.contrast_phase, labels=" ".join(str(v) for v in sorted(case.centroids)),
        seed=spec.seed, scan_seed=spec.scan_seed, mask_path=str(mpath.relative_to(orc_root)),
        centroids_path=str(cpath.relative_to(orc_root)), image_path=img.image_rel)


def _write_item(item: dict, case, t_gen: float) -> dict:
    """Write one rendered volume in its source format, its truth and its completion marker.

    Args:
        item: the planned item (with ``sources_root`` and ``oracle_root``).
        case: the rendered case.
        t_gen: rendering wall time per volume in seconds.

    Returns:
        ``{"row", "phi", "timing", "skipped"}`` (timing in seconds).
    """
    src_root, orc_root = Path(item["sources_root"]), Path(item["oracle_root"])
    marker = _marker(orc_root, item["item_id"])
    spec = case.spec
    thick = spec.slice_thickness_mm or spec.spacing_mm[2]
    if item["fmt"] == "dicom":
        img = _write_dicom_image(item, case, src_root, thick)
    else:
        img = _write_nifti_image(item, case, src_root)
    mpath, cpath = write_truth(orc_root, item["source"], img.key, img.truth_mask, img.truth_aff, case.centroids,
                               case.body_centroids)
    row = _index_row(item, case, img, thick, mpath, cpath, orc_root)
    timing = dict(item_id=item["item_id"], source=item["source"], voxels=int(np.prod(img.shape)),
                  generate_s=0.0, write_s=0.0)
    done = dict(row=row, phi=img.phi, timing=timing)
    # the marker holds no wall times, so the oracle folder is byte-identical for a seed
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(done, sort_keys=True))
    done = dict(done, timing=dict(timing, generate_s=round(t_gen, 3), write_s=round(img.write_s, 3)), skipped=False)
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
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    write_text(orc_root / "index.csv", index.to_csv(index=False))
    tokens = sorted({p["token"] for p in phi if p["token"]})
    write_text(orc_root / "phi_planted.json", json.dumps({"tokens": tokens, "values": phi}, indent=1))
    _write_msd_dataset_json(src_root, index)
    write_official_split(src_root / "data_split.txt", index, seed=int(cfg.get("seed", 0)))
    return GenerationReport(index=index, timings=pd.DataFrame(timings), failures=list(res.failures), skipped=skipped)


def _write_msd_dataset_json(src_root: Path, index: pd.DataFrame) -> None:
    """MSD archives ship a dataset.json listing the training images; mimic it."""
    msd = index[index["source"] == "MSD_T10"]
    if msd.empty:
        return
    body = {"name": "Liver", "description": "synthetic stand-in for the MSD task archive", "tensorImageSize": "3D",
            "modality": {"0": "CT"}, "numTraining": int(len(msd)),
            "training": [{"image": "./" + str(Path(p).relative_to("MSD_T10")), "label": None} for p in msd["image_path"]]}
    write_text(src_root / "MSD_T10" / "dataset.json", json.dumps(body, indent=1))
