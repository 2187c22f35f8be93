"""Convert and measure each selected series, exclude by the measured criteria, try fallbacks.

Per-series work runs through :func:`lib.core.parallel.map_cases` and is cached per series, so a
re-run skips finished work and a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from nibabel import orientations

from lib.core.parallel import CaseFailuresError, map_cases
from lib.core.paths import SPLITS
from lib.datasets.ctspine1k.ids import (
    SOURCES,
)
from lib.imaging.quality import measure_border_fraction, measure_noise_hu
from lib.io import (
    NiftiReadError,
    canonical_geometry,
    load_volume,
    save_volume,
    write_text,
)
from lib.io import dicom_read as dicom
from lib.stages.curation.config import (
    CONVERTER_VERSION,
    METADATA_TAGS,
    CurationConfig,
    QualityThresholds,
)
from lib.stages.curation.discover import Candidate
from lib.stages.curation.phi import PHI_KEYWORDS
from lib.stages.curation.select import SelectionResult


def _age_band(summary: Mapping[str, Any], width: int = 10) -> str:
    age = None
    pa = str(summary.get("PatientAge", "") or "")
    m = re.fullmatch(r"(\d{1,3})([YMWD])", pa.strip())
    if m:
        age = int(m.group(1)) if m.group(2) == "Y" else 0
    else:
        b, s = str(summary.get("PatientBirthDate", "") or ""), str(summary.get("StudyDate", "") or "")
        if re.fullmatch(r"\d{8}", b) and re.fullmatch(r"\d{8}", s):
            age = int(s[:4]) - int(b[:4]) - (1 if s[4:] < b[4:] else 0)
    if age is None or age < 0:
        return ""
    if age >= 90:
        return "90+"
    lo = (age // width) * width
    return f"{lo}-{lo + width - 1}"


def _dicom_meta(ds, deidentify: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for kw, col in METADATA_TAGS.items():
        v = ds.get(kw, "")
        meta[col] = str(v) if v not in (None, "") else ""
    summ = {k: ds.get(k, "") for k in ("PatientAge", "PatientBirthDate", "StudyDate")}
    meta["age_band"] = _age_band(summ)
    agent = str(ds.get("ContrastBolusAgent", "") or "")
    meta["contrast"] = "yes" if agent.strip() else "no/unknown"
    pp = str(ds.get("PatientPosition", "") or "")
    meta["patient_position"] = pp if re.fullmatch(r"[A-Z]{3,4}", pp) else ""
    if not deidentify:  # internal, identifying copy: everything the header holds
        for kw in sorted(PHI_KEYWORDS):
            if kw in ds and not kw.endswith("Sequence"):
                meta[kw] = str(ds.get(kw))
        meta["PatientAge"] = str(ds.get("PatientAge", ""))
        meta["SeriesDescription"] = str(ds.get("SeriesDescription", ""))
    return meta


def _fingerprint(job: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(CONVERTER_VERSION.encode())
    for f in job["files"]:
        try:
            st = os.stat(f)
            h.update(f"{Path(f).name}:{st.st_size}:{int(st.st_mtime)}".encode())
        except OSError:
            h.update(f"{Path(f).name}:missing".encode())
    h.update(json.dumps({k: job[k] for k in ("deidentify", "check_kw")}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _sanitize(text: str, job: Mapping[str, Any]) -> str:
    """Remove source folder paths (which may hold dates/descriptions) from a message."""
    for f in job["files"][:1]:
        folder = str(Path(f).parent)
        text = text.replace(folder, f"<{job['source']} series folder>")
        text = text.replace(str(Path(f).parent.parent), f"<{job['source']} study folder>")
    return text.replace(str(job.get("sources_dir", "")), "<sources>")


def image_digest(array: np.ndarray, affine: np.ndarray) -> str:
    """A digest of a converted image: its voxel values (dtype, shape, bytes) and its affine
    (rounded to 1e-4 mm), so a re-conversion of the same series gives the same digest and a
    different image a different one."""
    h = hashlib.blake2b(digest_size=16)
    a = np.ascontiguousarray(array)
    h.update(f"{a.dtype.str}:{a.shape}:".encode())
    h.update((np.round(np.asarray(affine, dtype=float), 4) + 0.0).tobytes())  # + 0.0: -0.0 -> 0.0
    h.update(a)
    return h.hexdigest()


def process_series(job: dict) -> dict:
    """Convert and measure one candidate; write its staged NIfTI and record (module-level for
    :func:`lib.core.parallel.map_cases`).

    Args:
        job: ``source``, ``patient``, ``source_key``, ``kind``, ``files``, ``staged`` (output
            ``.nii.gz``), ``record`` (output ``.json``), ``deidentify``, ``check_kw``
            (tolerances for :func:`lib.io.dicom_read.check_series`), ``fingerprint``.

    Returns:
        The record: ``status`` (``converted`` | ``fault``), ``faults`` (check, message,
        measured, threshold), ``measures`` (spacing, shape in RAS order, slices, z extent mm,
        noise HU, border fraction), ``meta`` (non-identifying tags), ``seconds``. A fault
        record means nothing was written but the record (no exception escapes for bad input).
    """
    t0 = time.perf_counter()
    rec: dict[str, Any] = {k: job[k] for k in ("source", "patient", "source_key", "kind")}
    rec.update(fingerprint=job["fingerprint"], converter=CONVERTER_VERSION, faults=[], measures={}, meta={})
    staged = Path(job["staged"])
    where = f"{job['source']}/{job['patient']}/{job['source_key']}"
    try:
        if job["kind"] == "dicom":
            vol = dicom.read_series(job["files"], where=where, **job["check_kw"])
            arr, affine = vol.array, vol.affine
            slice_axis = 2
            spacing_z = vol.geometry.slice_spacing_mm
            rec["meta"] = _dicom_meta(vol.header, job["deidentify"])
            rec["measures"]["tilt_deg"] = round(vol.geometry.tilt_deg, 4)
            if job["deidentify"]:
                save_volume(arr, affine, staged, dtype=np.int16)
            else:
                h = vol.header
                save_volume(arr, affine, staged, descrip=f"{h.get('PatientName', '')} {h.get('StudyDate', '')}",
                            aux_file=str(h.get("AccessionNumber", "")), extension_text=json.dumps(rec["meta"]))
        else:
            v = load_volume(job["files"][0], canonical=False)
            data = np.asarray(v.array)
            if data.dtype.kind == "f":
                if not np.isfinite(data).all():
                    raise NiftiReadError(f"{where}: {int((~np.isfinite(data)).sum())} NaN/inf voxels")
                data = np.rint(data)
            arr = np.clip(data, -32768, 32767).astype(np.int16)
            affine = v.affine
            ornt = orientations.io_orientation(affine)
            slice_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
            spacing_z = float(np.sqrt((affine[:3, slice_axis] ** 2).sum()))
            if job["deidentify"]:
                save_volume(arr, affine, staged, dtype=np.int16)
            else:
                h = v.header
                ext = " ".join(e.get_content().decode("utf-8", "replace") if isinstance(e.get_content(), bytes)
                               else str(e.get_content()) for e in h.extensions)
                save_volume(arr, affine, staged, descrip=h["descrip"].tobytes().rstrip(b"\0").decode("latin-1"),
                            aux_file=h["aux_file"].tobytes().rstrip(b"\0").decode("latin-1"), extension_text=ext)
        sp, sh = canonical_geometry(affine, arr.shape)
        rec["digest"] = image_digest(arr, affine)
        canon = np.moveaxis(arr, slice_axis, 2) if slice_axis != 2 else arr
        rec["measures"].update(
            spacing_mm=[round(s, 5) for s in sp], shape=list(sh), n_slices=int(arr.shape[slice_axis]),
            slice_spacing_mm=round(spacing_z, 5), z_extent_mm=round(arr.shape[slice_axis] * spacing_z, 3),
            noise_hu=round(measure_noise_hu(canon), 2), border_fraction=round(measure_border_fraction(canon), 4),
            hu_min=int(arr.min()), hu_max=int(arr.max()))
        rec["status"] = "converted"
    except dicom.SeriesError as exc:
        rec["status"] = "fault"
        rec["faults"] = [dict(check=f.check, message=_sanitize(f.message, job), measured=f.measured,
                              threshold=f.threshold) for f in exc.faults]
    except NiftiReadError as exc:
        rec["status"] = "fault"
        rec["faults"] = [dict(check="unreadable", message=_sanitize(str(exc), job), measured=None, threshold=None)]
    except Exception as exc:  # anything else about this input: recorded, the run goes on
        rec["status"] = "fault"
        rec["faults"] = [dict(check="error", message=_sanitize(f"{type(exc).__name__}: {exc}", job),
                              measured=None, threshold=None)]
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    write_text(job["record"], json.dumps(rec, indent=1, default=str) + "\n")
    return rec


def quality_faults(rec: Mapping[str, Any], q: QualityThresholds) -> list[dict]:
    """The measured low-quality criteria a converted record fails (check, measured, threshold)."""
    m = rec.get("measures", {})
    out = []

    def add(check, measured, threshold, text):
        out.append(dict(check=check, message=text, measured=measured, threshold=threshold))

    if m.get("n_slices", 0) < q.min_slices:
        add("too_few_slices", m.get("n_slices"), q.min_slices, f"{m.get('n_slices')} slices < {q.min_slices}")
    if m.get("z_extent_mm", 0.0) < q.min_z_extent_mm:
        add("z_extent", m.get("z_extent_mm"), q.min_z_extent_mm,
            f"craniocaudal coverage {m.get('z_extent_mm')} mm < {q.min_z_extent_mm} mm (truncated scan)")
    if m.get("slice_spacing_mm", 0.0) > q.max_slice_spacing_mm:
        add("slice_spacing", m.get("slice_spacing_mm"), q.max_slice_spacing_mm,
            f"slice spacing {m.get('slice_spacing_mm')} mm > {q.max_slice_spacing_mm} mm")
    noise = m.get("noise_hu", float("nan"))
    if noise is not None and not (isinstance(noise, float) and math.isnan(noise)) and noise > q.max_noise_hu:
        add("noise", noise, q.max_noise_hu, f"local noise SD {noise} HU in soft tissue > {q.max_noise_hu} HU")
    if m.get("border_fraction", 0.0) > q.max_border_fraction:
        add("truncated_fov", m.get("border_fraction"), q.max_border_fraction,
            f"{100 * m.get('border_fraction'):.1f} % of the image border lies inside the body "
            f"(> {100 * q.max_border_fraction:.0f} %): the field of view cuts the body")
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name)


@dataclass
class IncludedSeries:
    """A converted series that passed every check and becomes a release case."""

    release_id: str
    source: str
    patient: str
    source_key: str
    selection: str
    position: str
    time_point: str
    record: dict
    staged: Path


@dataclass
class ConversionOutcome:
    """What :func:`convert_selected` produced."""

    included: list[IncludedSeries]
    exclusions: pd.DataFrame
    records: dict[str, dict]
    failures: list
    reused: int
    converted: int

    def times_table(self) -> pd.DataFrame:
        """Seconds per series (conversion or measurement), by source, for this run's work."""
        rows = [{"source": r["source"], "source_key": r["source_key"], "status": r.get("status"),
                 "seconds": r.get("seconds"), "reused": r.get("_reused", False),
                 "voxels": int(np.prod(r["measures"]["shape"])) if r.get("measures", {}).get("shape") else 0}
                for r in self.records.values()]
        return pd.DataFrame(rows, columns=["source", "source_key", "status", "seconds", "reused", "voxels"])

    def summary(self) -> str:
        exc = self.exclusions
        n_ex = exc.loc[exc["action"] == "excluded", "release_id"].nunique() if len(exc) else 0
        return (f"{len(self.included)} cases included, {n_ex} patients excluded, {len(exc)} exclusion rows; "
                f"{self.converted} series converted now, {self.reused} reused from a previous run"
                + (f"; {len(self.failures)} failed unexpectedly" if self.failures else ""))


EXCLUSION_COLUMNS = ["release_id", "source", "source_key", "check", "measured", "threshold", "message", "action"]


def read_manifest(cfg: CurationConfig) -> dict[str, dict]:
    """``{release_id: {"source_key", "split"}}`` of files placed in the release by earlier runs."""
    p = cfg.work_dir / "placed.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def write_manifest(cfg: CurationConfig, manifest: Mapping[str, dict]) -> None:
    write_text(cfg.work_dir / "placed.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def release_file(cfg: CurationConfig, rid: str, split: str | None = None) -> Path | None:
    for s in ([split] if split else SPLITS):
        p = cfg.release_dir / s / "data" / f"{rid}.nii.gz"
        if p.exists():
            return p
    return None


def _job(cand: Candidate, cfg: CurationConfig) -> dict:
    q = cfg.quality
    job = {"source": cand.source, "patient": cand.patient, "source_key": cand.source_key, "kind": cand.kind,
           "files": list(cand.files), "deidentify": cfg.deidentify, "sources_dir": str(cfg.sources_dir),
           "check_kw": {"spacing_tolerance": q.spacing_tolerance, "max_tilt_deg": q.max_gantry_tilt_deg},
           "staged": str(cfg.work_dir / "converted" / cand.source / f"{_safe(cand.source_key)}.nii.gz"),
           "record": str(cfg.work_dir / "records" / cand.source / f"{_safe(cand.source_key)}.json")}
    job["fingerprint"] = _fingerprint(job)
    return job


def _cached(job: dict, cand: Candidate, manifest: Mapping[str, dict], cfg: CurationConfig) -> dict | None:
    try:
        rec = json.loads(Path(job["record"]).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != job["fingerprint"]:
        return None
    if rec.get("status") == "fault" or Path(job["staged"]).exists():
        return rec
    placed = manifest.get(cand.release_id)
    if placed and placed.get("source_key") == cand.source_key and release_file(cfg, cand.release_id, placed.get("split")):
        return rec
    return None


def convert_selected(sel: SelectionResult, cfg: CurationConfig, progress: bool = True) -> ConversionOutcome:
    """Convert and measure the selected series, apply the exclusion criteria, try fallbacks.

    Per-series work runs through :func:`lib.core.parallel.map_cases` (``cfg.workers`` processes or
    ``cfg.scheduler``). A series whose record from an earlier run matches (same files, sizes,
    times and settings) and whose output still exists is not converted again. Structural
    faults and failed quality criteria exclude the series; when the selection has a fallback
    (the patient's other COLONOG position / HNSCC time point) that is tried next, and both
    attempts are recorded.
    """
    manifest = read_manifest(cfg)
    queues = {s.release_id: [s.candidate, *s.fallbacks] for s in sel.selections}
    by_rid = {s.release_id: s for s in sel.selections}
    included: list[IncludedSeries] = []
    exclusions: list[dict] = []
    records: dict[str, dict] = {}
    failures: list = []
    reused = converted = 0
    while queues:
        jobs, todo = {}, []
        for queue in queues.values():
            cand = queue[0]
            job = _job(cand, cfg)
            rec = _cached(job, cand, manifest, cfg)
            if rec is not None:
                rec["_reused"] = True
                records[cand.case_id] = rec
                reused += 1
            else:
                jobs[cand.case_id] = job
                todo.append(cand.case_id)
        if todo:
            res = map_cases(process_series, [jobs[k] for k in todo], ids=todo, workers=cfg.workers,
                            scheduler=cfg.scheduler, on_error="collect", desc="01_curation convert", progress=progress)
            for k, rec in res.values.items():
                records[k] = rec
            converted += len(res.values)
            for f in res.failures:
                failures.append(f)
                src, key = f.case_id.split("/", 1)
                records[f.case_id] = {"source": src, "source_key": key, "status": "fault", "measures": {}, "meta": {},
                                      "faults": [dict(check="error", message=_sanitize(f.message.splitlines()[0], jobs[f.case_id]),
                                                      measured=None, threshold=None)]}
        next_queues = {}
        for rid, queue in queues.items():
            cand = queue[0]
            rec = records[cand.case_id]
            faults = rec["faults"] if rec.get("status") != "converted" else quality_faults(rec, cfg.quality)
            if not faults:
                s = by_rid[rid]
                reason = s.reason if cand is s.candidate else f"fallback after the selected series failed ({s.reason})"
                tp = s.time_point if cand is s.candidate else ""
                included.append(IncludedSeries(rid, cand.source, cand.patient, cand.source_key, reason, cand.position, tp,
                                             rec, Path(_job(cand, cfg)["staged"])))
                continue
            more = len(queue) > 1
            for f in faults:
                exclusions.append({"release_id": rid, "source": cand.source, "source_key": cand.source_key,
                                   "check": f["check"], "measured": f.get("measured"), "threshold": f.get("threshold"),
                                   "message": f["message"],
                                   "action": "series rejected, next candidate tried" if more else "excluded"})
            if more:
                next_queues[rid] = queue[1:]
        queues = next_queues
    if cfg.on_error == "raise" and failures:
        raise CaseFailuresError(failures)
    included.sort(key=lambda c: (SOURCES.index(c.source) if c.source in SOURCES else 99, c.release_id))
    exc_df = pd.DataFrame(exclusions, columns=EXCLUSION_COLUMNS)
    return ConversionOutcome(included, exc_df, records, failures, reused, converted)


def conversion_time_summary(conv: ConversionOutcome) -> pd.DataFrame:
    """Seconds per series by source for the series converted in this run (reused ones excluded)."""
    t = conv.times_table()
    t = t[~t["reused"].astype(bool)]
    if t.empty:
        return pd.DataFrame(columns=["source", "series", "mean_s", "median_s", "max_s", "mean_ms_per_Mvoxel"])
    g = t.groupby("source")
    return pd.DataFrame({
        "series": g.size(), "mean_s": g["seconds"].mean().round(3), "median_s": g["seconds"].median().round(3),
        "max_s": g["seconds"].max().round(3),
        "mean_ms_per_Mvoxel": (g["seconds"].sum() / (g["voxels"].sum() / 1e6) * 1000).round(1),
    }).reset_index()
