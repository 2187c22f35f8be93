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

    Module-level (picklable) for :func:`lib.parallel.map_cases`. Skips the work when every
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


def _write_item(item: dict, case, t_gen: float) -> dict:
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
        for kw in PLANTED_PHI_KEYWORDS:
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
