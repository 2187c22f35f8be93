"""Curation: raw sources -> the CTSpine1K release layout, de-identified, split, with Table 1.

The paper's "Data Collection" and "Data Records" as code, the same for synthetic sources and
for the real downloads (only the paths and thresholds in the params differ):

1. **Discover** candidate series/volumes under the sources folder (``COLONOG/<patient>/<study>/
   <series>/*.dcm``, ``HNSCC/...``, ``MSD_T10/images*/liver_<n>.nii.gz``,
   ``COVID19/volume-covid19-A-0<nnn>.nii.gz``).
2. **Select** as the paper did: one COLONOG position per patient by seeded random choice (or the
   row of the release's ``Path.csv``), one HNSCC time point, seeded subsets of MSD T10 and
   COVID-19, optionally only the IDs an official split file lists.
3. **Convert and measure** each selected series (:mod:`lib.dicom` for DICOM), through
   :func:`lib.parallel.map_cases`; results are cached per series so a re-run skips finished work
   and a killed run resumes.
4. **Exclude** unusable and low-quality scans by stated, measured criteria (thresholds in the
   params); each exclusion is recorded with check, measured value and threshold.
5. **Split** stratified by source with the paper's proportions, or from ``data_split.txt``.
6. **Write the release** (``{trainset,test_public,test_private}/{data,gt}/``, metadata sheets,
   ``readme.txt``, ``data_split.txt``) and the stage tables (cases, provenance, exclusions,
   Table 1).
7. **Audit**: every output file's bytes (decompressed ``.gz`` and zip members included) and
   every output file name are searched for the identifying values found in the sources; the
   stage fails if one is found.

Release IDs keep the sources' spellings; the source of an ID is inferred by a pattern table
(:data:`BUILTIN_ID_PATTERNS`, extendable by the user); an ID that matches no pattern is reported
by name and kept.

Nothing in this module reads the synthetic oracle.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io as _pyio
import json
import math
import os
import re
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel import orientations
from pydicom.multival import MultiValue

from lib.core.paths import SPLITS, ProfilePaths
from lib.core.seeding import stable_rng
from lib.datasets.ctspine1k.ids import BUILTIN_ID_PATTERNS, DICOM_SOURCES, NIFTI_SOURCES  # noqa: F401
from lib.datasets.ctspine1k.ids import SOURCES, UNKNOWN, count_by_source_split, infer_source  # noqa: F401
from lib.datasets.ctspine1k.ids import merge_id_patterns, release_id_for, unknown_ids  # noqa: F401
from lib.datasets.ctspine1k.release import find_special_cases, has_masks, release_inventory  # noqa: F401
from lib.datasets.ctspine1k.release import write_readme  # noqa: F401
from lib.datasets.ctspine1k.split_file import paper_fractions, read_split_file  # noqa: F401
from lib.datasets.ctspine1k.split_file import split_stratified, write_split_file  # noqa: F401
from lib.datasets.ctspine1k.table1 import build_table1, table1_markdown  # noqa: F401
from lib.datasets.nnunet import export_nnunet  # noqa: F401
from lib.datasets.paper_facts import PAPER_SPLIT_COUNTS, PAPER_TABLE1, PAPER_TOTALS  # noqa: F401
from lib.datasets.verse import export_verse_centroids  # noqa: F401
from lib.imaging.quality import measure_border_fraction, measure_noise_hu
from lib.io import (
    NiftiReadError,
    atomic_path,
    canonical_geometry,
    load_volume,
    move_atomic,
    save_volume,
    strip_nifti_suffix,
    write_text,
)
from lib.io import dicom_read as dicom

# ============================================================================ constants


METADATA_SHEETS = {"COLONOG": "metadata_colonog.xlsx", "HNSCC": "metadata_neck.xlsx"}

#: Non-identifying DICOM tags kept in the metadata sheets (keyword -> column).
METADATA_TAGS = {
    "Manufacturer": "manufacturer", "ManufacturerModelName": "model", "ConvolutionKernel": "kernel",
    "KVP": "kvp", "XRayTubeCurrent": "tube_current_ma", "SliceThickness": "slice_thickness_mm",
    "PatientSex": "sex", "BodyPartExamined": "body_part",
}

#: Keywords whose values identify a patient, a visit, a place or a person (DICOM PS3.15
#: basic profile, the subset that CT headers carry). Every PN (person name) and DA/DT (date)
#: element is identifying too, wherever it sits. PatientID is the public archive ID used as
#: release ID, and UIDs are kept: both are allowed.
PHI_KEYWORDS = frozenset({
    "PatientName", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientBirthTime",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "MedicalRecordLocator",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PerformingPhysicianName",
    "OperatorsName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingPhysician",
    "AccessionNumber", "StudyID", "StationName", "DeviceSerialNumber", "IssuerOfPatientID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "AcquisitionDateTime", "PerformedProcedureStepID",
    "RequestedProcedureID", "PatientComments", "AdditionalPatientHistory", "ImageComments",
    "Occupation", "MilitaryRank", "BranchOfService", "RegionOfResidence", "CountryOfResidence",
    "PatientInsurancePlanCodeSequence", "ScheduledProcedureStepID", "PerformedProcedureStepDescription",
})

CONVERTER_VERSION = "lib.dicom/1"


# ============================================================================ configuration


@dataclass(frozen=True)
class QualityThresholds:
    """Measured criteria for excluding a scan (all in the units named).

    Attributes:
        min_slices: fewer slices -> ``too_few_slices`` (truncated scan).
        min_z_extent_mm: craniocaudal coverage (slices x spacing) below this -> ``z_extent``.
        max_slice_spacing_mm: thicker slices -> ``slice_spacing``.
        max_noise_hu: local noise SD in soft tissue above this -> ``noise``.
        max_border_fraction: share of the in-plane image border lying inside the body
            (> -500 HU) above this -> ``truncated_fov`` (body cut by the field of view).
        spacing_tolerance: relative slice-step deviation allowed (DICOM geometry check).
        max_gantry_tilt_deg: larger tilt -> ``gantry_tilt`` (DICOM geometry check).
    """

    min_slices: int = 20
    min_z_extent_mm: float = 100.0
    max_slice_spacing_mm: float = 6.0
    max_noise_hu: float = 80.0
    max_border_fraction: float = 0.1
    spacing_tolerance: float = 0.05
    max_gantry_tilt_deg: float = 0.5


@dataclass(frozen=True)
class CurationConfig:
    """Everything the curation functions need, built from the notebook parameters."""

    sources_dir: Path
    release_dir: Path
    stage_dir: Path
    sources: tuple[str, ...] = SOURCES
    seed: int = 0
    path_csv: Path | None = None
    fallback_series: bool = True
    hnscc_time_point: int = 0
    subset_sizes: Mapping[str, int] = field(default_factory=dict)
    split_file: Path | None = None
    restrict_to_split_file: bool = False
    id_patterns: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(BUILTIN_ID_PATTERNS))
    quality: QualityThresholds = QualityThresholds()
    deidentify: bool = True
    workers: int = 0
    scheduler: str | None = None
    on_error: str = "collect"

    @property
    def work_dir(self) -> Path:
        """Per-series records and staged conversions (``runs/<profile>/01_curation/work``)."""
        return self.stage_dir / "work"

    @property
    def tables_dir(self) -> Path:
        return self.stage_dir / "tables"

    @classmethod
    def from_params(cls, P: Any, paths: ProfilePaths) -> CurationConfig:
        """Build from the validated 01_curation parameters (attribute or dict access)."""
        p = P.as_dict() if hasattr(P, "as_dict") else dict(P)
        src = Path(p["sources_dir"]) if p.get("sources_dir") else paths.sources

        def rel(name: str) -> Path | None:
            v = p.get(name) or ""
            if not v:
                return None
            q = Path(v)
            return q if q.is_absolute() else src / q

        q = QualityThresholds(
            min_slices=int(p["min_slices"]), min_z_extent_mm=float(p["min_z_extent_mm"]),
            max_slice_spacing_mm=float(p["max_slice_spacing_mm"]), max_noise_hu=float(p["max_noise_hu"]),
            max_border_fraction=float(p["max_border_fraction"]), spacing_tolerance=float(p["spacing_tolerance"]),
            max_gantry_tilt_deg=float(p["max_gantry_tilt_deg"]))
        unknown = sorted(set(p["sources"]) - set(SOURCES))
        if unknown:
            raise ValueError(f"parameter sources: unknown source(s) {unknown}; expected some of {SOURCES}")
        if p["on_error"] not in ("collect", "raise"):
            raise ValueError(f"parameter on_error: {p['on_error']!r}; expected 'collect' or 'raise'")
        return cls(
            sources_dir=src, release_dir=Path(p["release_dir"]) if p.get("release_dir") else paths.release,
            stage_dir=paths.stage("01_curation"), sources=tuple(p["sources"]), seed=int(p["seed"]),
            path_csv=rel("path_csv"), fallback_series=bool(p["fallback_series"]),
            hnscc_time_point=int(p["hnscc_time_point"]),
            subset_sizes={"MSD_T10": int(p["msd_subset_size"]), "COVID19": int(p["covid_subset_size"])},
            split_file=rel("split_file"), restrict_to_split_file=bool(p["restrict_to_split_file"]),
            id_patterns=merge_id_patterns(p.get("extra_id_patterns") or {}), quality=q,
            deidentify=bool(p["deidentify"]), workers=int(p["workers"]), scheduler=p.get("scheduler") or None,
            on_error=str(p["on_error"]))


# ============================================================================ release IDs


# ============================================================================ discovery


@dataclass
class Candidate:
    """One series (DICOM) or volume (NIfTI) that curation may use.

    ``source_key`` is the SeriesInstanceUID (DICOM) or the file stem (NIfTI). The private
    fields (``_order``, folder names) may hold dates or descriptions from the source: they are
    used for selection in memory and never written out.
    """

    source: str
    patient: str
    source_key: str
    kind: str  # "dicom" | "nifti"
    files: list[str]
    study_key: str = ""
    position: str = ""  # COLONOG: supine | prone | unknown
    modality: str = "CT"
    n_files: int = 0
    _order: str = ""
    _study_folder: str = ""
    _series_folder: str = ""
    _error: str = ""

    @property
    def release_id(self) -> str:
        return release_id_for(self.source, self.patient)

    @property
    def case_id(self) -> str:
        return f"{self.source}/{self.source_key}"


def _position(summary: Mapping[str, str]) -> str:
    pp = summary.get("PatientPosition", "").upper()
    if pp.endswith("P") and pp in ("HFP", "FFP"):
        return "prone"
    if pp in ("HFS", "FFS"):
        return "supine"
    desc = summary.get("SeriesDescription", "").lower()
    if "prone" in desc:
        return "prone"
    if "supine" in desc:
        return "supine"
    return "unknown"


def discover_candidates(sources_dir: str | Path, sources: Sequence[str] = SOURCES) -> list[Candidate]:
    """Find every candidate series/volume of the given sources.

    DICOM sources: each folder of DICOM files below ``<source>/<patient>/`` is a series (one
    header read per folder). NIfTI sources: ``MSD_T10/images*/*.nii.gz`` and
    ``COVID19/**/*.nii.gz``.

    Raises:
        FileNotFoundError: the sources folder does not exist (naming it).
    """
    root = Path(sources_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: sources folder not found (run 00_sources, or set sources_dir)")
    out: list[Candidate] = []
    for src in sources:
        base = root / src
        if not base.exists():
            continue
        if src in DICOM_SOURCES:
            for ref in dicom.discover_series(base):
                rel = ref.folder.relative_to(base).parts
                s = ref.summary
                out.append(Candidate(
                    source=src, patient=rel[0], source_key=s.get("SeriesInstanceUID") or "/".join(rel),
                    kind="dicom", files=[str(f) for f in ref.files], study_key=s.get("StudyInstanceUID", ""),
                    position=_position(s) if src == "COLONOG" else "", modality=s.get("Modality", ""),
                    n_files=len(ref.files), _order=f"{s.get('StudyDate', '')}{s.get('StudyTime', '')}",
                    _study_folder=rel[1] if len(rel) > 2 else "", _series_folder=rel[-1] if len(rel) > 1 else "",
                    _error=s.get("_error", "")))
        else:
            pattern = "images*/*.nii*" if src == "MSD_T10" else "**/*.nii*"
            for f in sorted(base.glob(pattern)):
                if f.name.startswith(".") or not f.name.endswith((".nii", ".nii.gz")):
                    continue
                stem = strip_nifti_suffix(f)
                out.append(Candidate(source=src, patient=stem, source_key=stem, kind="nifti", files=[str(f)],
                                     n_files=1))
    return out


def candidates_table(cands: Sequence[Candidate]) -> pd.DataFrame:
    """Counts per source: patients, candidate series, and for DICOM the positions/studies."""
    rows = []
    for src in dict.fromkeys(c.source for c in cands):
        cs = [c for c in cands if c.source == src]
        rows.append({"source": src, "patients": len({c.patient for c in cs}), "candidates": len(cs),
                     "studies": len({(c.patient, c.study_key) for c in cs}) if cs[0].kind == "dicom" else len(cs),
                     "files": sum(c.n_files for c in cs),
                     "positions": ", ".join(f"{k} {v}" for k, v in sorted(Counter(c.position for c in cs if c.position).items()))})
    return pd.DataFrame(rows, columns=["source", "patients", "candidates", "studies", "files", "positions"])


# ============================================================================ selection


@dataclass
class Selection:
    """The series chosen for one patient, with its ordered fallbacks and why."""

    candidate: Candidate
    reason: str
    fallbacks: list[Candidate] = field(default_factory=list)
    time_point: str = ""

    @property
    def release_id(self) -> str:
        return self.candidate.release_id


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def read_path_table(path: str | Path) -> list[tuple[str, str, str]]:
    """Read a ``Path.csv`` as released: one ``patient/study/series`` per row (folder names or
    UIDs), no header; a header row or extra columns are tolerated (the first cell holding two
    ``/`` is used).

    Raises:
        FileNotFoundError / ValueError: naming the file and the bad row.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: Path.csv not found")
    rows: list[tuple[str, str, str]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        cells = next(csv.reader([line])) if "," in line else [line]
        cell = next((c for c in cells if c.count("/") >= 2), None)
        if cell is None:
            if n == 1:
                continue  # header
            raise ValueError(f"{path}, row {n}: expected 'patient/study/series', got {line[:120]!r}")
        parts = cell.strip().split("/")
        rows.append((parts[0].strip(), parts[1], "/".join(parts[2:])))
    return rows


def _match_path_row(row: tuple[str, str, str], cands: Sequence[Candidate]) -> Candidate | None:
    pat, study, series = row
    for exact in (True, False):
        for c in cands:
            if c.patient != pat:
                continue
            if exact:
                ok_st = study in (c._study_folder, c.study_key)
                ok_se = series in (c._series_folder, c.source_key)
            else:  # tolerate whitespace/case differences of downloaders
                ok_st = _norm(study) in (_norm(c._study_folder), _norm(c.study_key))
                ok_se = _norm(series) in (_norm(c._series_folder), _norm(c.source_key))
            if ok_st and ok_se:
                return c
    return None


@dataclass
class SelectionResult:
    """Selections (one per patient) and notes on what could not be followed."""

    selections: list[Selection]
    notes: list[str]
    dropped: list[dict]  # not selected by rule (subset, split-file restriction), with reason

    def table(self) -> pd.DataFrame:
        """One row per selected patient (no identifying values)."""
        rows = [{"release_id": s.release_id, "source": s.candidate.source, "source_key": s.candidate.source_key,
                 "position": s.candidate.position, "time_point": s.time_point, "fallbacks": len(s.fallbacks),
                 "reason": s.reason} for s in self.selections]
        return pd.DataFrame(rows, columns=["release_id", "source", "source_key", "position", "time_point",
                                           "fallbacks", "reason"])


def select_series(cands: Sequence[Candidate], cfg: CurationConfig,
                  listed_ids: Iterable[str] | None = None) -> SelectionResult:
    """Choose one series per patient as the paper did.

    * COLONOG: one position per patient by a seeded random choice (seed, patient); the other
      position is the fallback when ``cfg.fallback_series``.
    * HNSCC: the time point ``cfg.hnscc_time_point`` in study-date order (0 = first,
      -1 = last); the other time points are fallbacks, nearest first.
    * A ``Path.csv`` row for a patient fixes its series (no fallback: the table is the truth).
    * MSD T10 / COVID-19: a seeded subset of ``cfg.subset_sizes[source]`` volumes (0 = all).
    * ``listed_ids``: when given (``restrict_to_split_file``), only these release IDs are kept.

    Non-CT series and series whose first file could not be read are never selected.
    """
    notes: list[str] = []
    dropped: list[dict] = []
    table_rows: dict[str, tuple[str, str, str]] = {}
    if cfg.path_csv is not None:
        for row in read_path_table(cfg.path_csv):
            table_rows[row[0]] = row
    listed = {strip_nifti_suffix(i) for i in listed_ids} if listed_ids is not None else None
    by_patient: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for c in cands:
        if c._error:
            notes.append(f"{c.source}/{c.patient}: series {c.source_key}: first file unreadable as DICOM; skipped")
            continue
        if c.kind == "dicom" and c.modality != "CT":
            continue
        by_patient[(c.source, c.patient)].append(c)
    selections: list[Selection] = []
    for (src, patient), cs in sorted(by_patient.items()):
        rid = release_id_for(src, patient)
        if listed is not None and rid not in listed:
            dropped.append({"release_id": rid, "source": src, "reason": "not listed in the split file"})
            continue
        if src in DICOM_SOURCES and patient in table_rows:
            hit = _match_path_row(table_rows[patient], cs)
            if hit is not None:
                selections.append(Selection(hit, "Path.csv row", [], ""))
                continue
            notes.append(f"{src}/{patient}: the Path.csv row matches no series on disk; seeded choice used instead")
        if src == "COLONOG":
            cs = sorted(cs, key=lambda c: (c.position, c.source_key))
            order = stable_rng(cfg.seed, "position", patient, nbytes=6).permutation(len(cs))
            ranked = [cs[i] for i in order]
            positions = sorted({c.position for c in cs})
            reason = f"seeded random choice among {len(cs)} series ({'/'.join(positions)})"
            selections.append(Selection(ranked[0], reason, ranked[1:] if cfg.fallback_series else []))
        elif src == "HNSCC":
            studies: dict[str, list[Candidate]] = defaultdict(list)
            for c in cs:
                studies[c.study_key].append(c)
            ordered = sorted(studies.values(), key=lambda g: (g[0]._order, g[0]._study_folder, g[0].study_key))
            n = len(ordered)
            want = cfg.hnscc_time_point if cfg.hnscc_time_point >= 0 else n + cfg.hnscc_time_point
            idx = min(max(want, 0), n - 1)
            if idx != want:
                notes.append(f"HNSCC/{patient}: time point {cfg.hnscc_time_point} not available ({n} time points); used {idx}")
            rank = sorted(range(n), key=lambda i: (abs(i - idx), i))
            series = [max(ordered[i], key=lambda c: (c.n_files, c.source_key)) for i in rank]
            selections.append(Selection(series[0], f"time point {idx} of {n} by study date",
                                        series[1:] if cfg.fallback_series else [], str(idx)))
        else:
            for c in sorted(cs, key=lambda c: c.source_key):
                selections.append(Selection(c, "all volumes of the source", []))
    for src in NIFTI_SOURCES:
        k = int(cfg.subset_sizes.get(src, 0) or 0)
        group = [s for s in selections if s.candidate.source == src]
        if k and len(group) > k:
            rng = stable_rng(cfg.seed, "subset", src, nbytes=6)
            keep_idx = set(rng.choice(len(group), size=k, replace=False).tolist())
            for i, s in enumerate(group):
                if i in keep_idx:
                    s.reason = f"seeded subset ({k} of {len(group)})"
                else:
                    dropped.append({"release_id": s.release_id, "source": src, "reason": f"not in the seeded subset of {k}"})
            drop_ids = {group[i].release_id for i in range(len(group)) if i not in keep_idx}
            selections = [s for s in selections if not (s.candidate.source == src and s.release_id in drop_ids)]
    return SelectionResult(selections, notes, dropped)


# ============================================================================ measuring


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


# ============================================================================ per-series work


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


def process_series(job: dict) -> dict:
    """Convert and measure one candidate; write its staged NIfTI and record (module-level for
    :func:`lib.parallel.map_cases`).

    Args:
        job: ``source``, ``patient``, ``source_key``, ``kind``, ``files``, ``staged`` (output
            ``.nii.gz``), ``record`` (output ``.json``), ``deidentify``, ``check_kw``
            (tolerances for :func:`lib.dicom.check_series`), ``fingerprint``.

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


# ============================================================================ conversion driver


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name)


@dataclass
class IncludedCase:
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

    included: list[IncludedCase]
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


def _write_manifest(cfg: CurationConfig, manifest: Mapping[str, dict]) -> None:
    write_text(cfg.work_dir / "placed.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _release_file(cfg: CurationConfig, rid: str, split: str | None = None) -> Path | None:
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
    if placed and placed.get("source_key") == cand.source_key and _release_file(cfg, cand.release_id, placed.get("split")):
        return rec
    return None


def convert_selected(sel: SelectionResult, cfg: CurationConfig, progress: bool = True) -> ConversionOutcome:
    """Convert and measure the selected series, apply the exclusion criteria, try fallbacks.

    Per-series work runs through :func:`lib.parallel.map_cases` (``cfg.workers`` processes or
    ``cfg.scheduler``). A series whose record from an earlier run matches (same files, sizes,
    times and settings) and whose output still exists is not converted again. Structural
    faults and failed quality criteria exclude the series; when the selection has a fallback
    (the patient's other COLONOG position / HNSCC time point) that is tried next, and both
    attempts are recorded.
    """
    from lib.core.parallel import map_cases

    manifest = read_manifest(cfg)
    queues = {s.release_id: [s.candidate, *s.fallbacks] for s in sel.selections}
    by_rid = {s.release_id: s for s in sel.selections}
    included: list[IncludedCase] = []
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
                included.append(IncludedCase(rid, cand.source, cand.patient, cand.source_key, reason, cand.position, tp,
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
        from lib.core.parallel import CaseErrors

        raise CaseErrors(failures)
    included.sort(key=lambda c: (SOURCES.index(c.source) if c.source in SOURCES else 99, c.release_id))
    exc_df = pd.DataFrame(exclusions, columns=EXCLUSION_COLUMNS)
    return ConversionOutcome(included, exc_df, records, failures, reused, converted)


# ============================================================================ splits


@dataclass
class SplitResult:
    """Split assignment and what the split file did not cover."""

    assignment: dict[str, str]                 # release_id -> split
    origin: dict[str, str]                     # release_id -> "split file" | "seeded"
    unknown_ids: list[str]                     # IDs matching no source pattern (kept)
    listed_missing: list[str] = field(default_factory=list)  # in the split file, not available
    not_listed: list[str] = field(default_factory=list)      # available, not in the split file
    notes: list[str] = field(default_factory=list)

    def counts(self, patterns: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
        """Cases per source and split (rows: sources incl. ``unknown``, then ``total``)."""
        return count_by_source_split(self.assignment, patterns)


def assign_splits(release_ids: Sequence[str], cfg: CurationConfig,
                  file_assignment: Mapping[str, str] | None = None) -> SplitResult:
    """Splits for the included cases: from the split file when given (IDs it does not list are
    split by the seeded rule and reported), else seeded and stratified by source."""
    ids = list(release_ids)
    unk = unknown_ids(ids, cfg.id_patterns)
    notes = [f"release ID {u!r} matches no source pattern: kept, counted as '{UNKNOWN}' "
             f"(add a pattern in extra_id_patterns)" for u in unk]
    if file_assignment is None:
        a = split_stratified(ids, cfg.seed, cfg.id_patterns)
        return SplitResult(a, {r: "seeded" for r in a}, unk, notes=notes)
    listed = {r: s for r, s in file_assignment.items() if r in set(ids)}
    missing = sorted(set(file_assignment) - set(ids))
    not_listed = sorted(set(ids) - set(file_assignment))
    a = dict(listed)
    a.update(split_stratified(not_listed, cfg.seed, cfg.id_patterns))
    origin = {r: ("split file" if r in listed else "seeded") for r in a}
    if not_listed:
        notes.append(f"{len(not_listed)} included case(s) not in the split file, split by the seeded rule: "
                     + ", ".join(not_listed[:10]) + (" ..." if len(not_listed) > 10 else ""))
    if missing:
        notes.append(f"{len(missing)} ID(s) in the split file are not among the included cases (excluded or not "
                     f"downloaded): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    return SplitResult(a, origin, unk, missing, not_listed, notes)


# ============================================================================ release layout


@dataclass
class PlacementReport:
    """What :func:`place_release` moved."""

    placed: int = 0
    moved_between_splits: list[str] = field(default_factory=list)
    already_in_place: int = 0
    stale: list[str] = field(default_factory=list)


def place_release(included: Sequence[IncludedCase], assignment: Mapping[str, str], cfg: CurationConfig
                  ) -> PlacementReport:
    """Put every included image at ``<release>/<split>/data/<ID>.nii.gz`` and create ``gt/``.

    Staged conversions are moved in (rename, atomic); an image already in the release from an
    earlier run with the same source series stays, or moves to its new split with its mask
    (``gt/<ID>_seg.nii.gz``). Release images no longer selected are moved out to
    ``work/orphans/`` (never deleted) and reported. A manifest of placed files is rewritten
    after every move, so a killed run resumes correctly.
    """
    rep = PlacementReport()
    manifest = read_manifest(cfg)
    for s in SPLITS:
        (cfg.release_dir / s / "data").mkdir(parents=True, exist_ok=True)
        (cfg.release_dir / s / "gt").mkdir(parents=True, exist_ok=True)
    wanted = {c.release_id for c in included}
    for s in SPLITS:
        for f in sorted((cfg.release_dir / s / "data").glob("*.nii.gz")):
            rid = strip_nifti_suffix(f)
            if rid not in wanted:
                move_atomic(f, cfg.work_dir / "orphans" / f"{s}__{f.name}")
                mask = cfg.release_dir / s / "gt" / f"{rid}_seg.nii.gz"
                if mask.exists():
                    move_atomic(mask, cfg.work_dir / "orphans" / f"{s}__{mask.name}")
                manifest.pop(rid, None)
                _write_manifest(cfg, manifest)
                rep.stale.append(rid)
    for c in included:
        split = assignment[c.release_id]
        dst = cfg.release_dir / split / "data" / f"{c.release_id}.nii.gz"
        if c.staged.exists():
            move_atomic(c.staged, dst)
            for s in SPLITS:  # an older file of this ID elsewhere is superseded
                old = cfg.release_dir / s / "data" / f"{c.release_id}.nii.gz"
                if s != split and old.exists():
                    old.unlink()
            rep.placed += 1
        else:
            cur = _release_file(cfg, c.release_id)
            if cur is None:
                raise FileNotFoundError(f"{c.release_id}: converted image neither staged nor in the release "
                                        f"(delete {cfg.work_dir / 'records'} and re-run)")
            if cur != dst:
                move_atomic(cur, dst)
                rep.moved_between_splits.append(c.release_id)
            else:
                rep.already_in_place += 1
        for s in SPLITS:  # the mask follows the image
            mask = cfg.release_dir / s / "gt" / f"{c.release_id}_seg.nii.gz"
            if s != split and mask.exists():
                move_atomic(mask, cfg.release_dir / split / "gt" / mask.name)
        manifest[c.release_id] = {"source_key": c.source_key, "split": split}
        _write_manifest(cfg, manifest)
    return rep


def cases_table(included: Sequence[IncludedCase], assignment: Mapping[str, str], cfg: CurationConfig) -> pd.DataFrame:
    """``tables/cases.csv``: release_id, split, source, spacing, shape, path (+ measures)."""
    rows = []
    for c in included:
        m = c.record["measures"]
        split = assignment[c.release_id]
        rows.append({"release_id": c.release_id, "split": split, "source": infer_source(c.release_id, cfg.id_patterns),
                     "spacing": "x".join(f"{s:g}" for s in m["spacing_mm"]), "shape": "x".join(str(n) for n in m["shape"]),
                     "path": str(cfg.release_dir / split / "data" / f"{c.release_id}.nii.gz"),
                     "spacing_x_mm": m["spacing_mm"][0], "spacing_y_mm": m["spacing_mm"][1], "spacing_z_mm": m["spacing_mm"][2],
                     "n_slices": m["n_slices"], "z_extent_mm": m["z_extent_mm"], "noise_hu": m["noise_hu"],
                     "border_fraction": m["border_fraction"]})
    return pd.DataFrame(rows, columns=["release_id", "split", "source", "spacing", "shape", "path", "spacing_x_mm",
                                       "spacing_y_mm", "spacing_z_mm", "n_slices", "z_extent_mm", "noise_hu",
                                       "border_fraction"])


def provenance_table(included: Sequence[IncludedCase], split: SplitResult) -> pd.DataFrame:
    """``tables/provenance.csv``: release_id, split, source, source_key (SeriesInstanceUID for
    DICOM, file stem for NIfTI) and how the series was chosen. No identifying values."""
    rows = [{"release_id": c.release_id, "split": split.assignment[c.release_id], "source": c.source,
             "source_key": c.source_key, "patient_id": c.patient, "position": c.position, "time_point": c.time_point,
             "selection": c.selection, "split_origin": split.origin[c.release_id]} for c in included]
    return pd.DataFrame(rows, columns=["release_id", "split", "source", "source_key", "patient_id", "position",
                                       "time_point", "selection", "split_origin"])


def write_metadata_sheets(included: Sequence[IncludedCase], assignment: Mapping[str, str], release_dir: Path
                          ) -> list[Path]:
    """``metadata_colonog.xlsx`` and ``metadata_neck.xlsx``: one row per release case with the
    non-identifying tags (:data:`METADATA_TAGS`, age band, contrast, patient position) plus
    spacing and size. With de-identification off, the records carry identifying tags and they
    end up here (and the PHI audit fails)."""
    written = []
    for src, fname in METADATA_SHEETS.items():
        rows = []
        for c in included:
            if c.source != src:
                continue
            m = c.record["measures"]
            row = {"ID": c.release_id, "split": assignment[c.release_id]}
            if src == "COLONOG":
                row["position"] = c.position
            else:
                row["time_point"] = c.time_point
            row.update(c.record.get("meta", {}))
            row.update({"spacing_x_mm": m["spacing_mm"][0], "spacing_y_mm": m["spacing_mm"][1],
                        "spacing_z_mm": m["spacing_mm"][2], "size": "x".join(str(n) for n in m["shape"])})
            rows.append(row)
        df = pd.DataFrame(rows)
        path = Path(release_dir) / fname
        with atomic_path(path) as tmp:
            df.to_excel(tmp, index=False, sheet_name="metadata", engine="openpyxl")
        written.append(path)
    return written


# ============================================================================ Table 1


# ============================================================================ exports


# ============================================================================ PHI audit


@dataclass(frozen=True)
class Identifier:
    """An identifying value found in the sources (kept in memory only, never written).

    Attributes:
        kind: where it came from (DICOM keyword, ``folder_name``, ``nifti_descrip`` ...).
        value: the text as found.
        needles: lower-case byte strings searched for (the value and its variants: name
            parts, other date spellings), each with a boundary rule: ``"none"`` (substring),
            ``"word"`` (not inside a longer alphanumeric run), ``"digits"`` (not inside a
            longer digit run).
    """

    kind: str
    value: str
    needles: tuple[tuple[bytes, str], ...]


def _date_variants(d: str) -> list[str]:
    y, m, dd = d[:4], d[4:6], d[6:8]
    return [d, f"{y}-{m}-{dd}", f"{m}-{dd}-{y}", f"{dd}.{m}.{y}", f"{m}/{dd}/{y}", f"{dd}/{m}/{y}", f"{y}/{m}/{dd}"]


def make_identifier(kind: str, value: str, vr: str = "LO") -> Identifier | None:
    """Identifier with its search variants, or None when too short/generic to audit.

    Rules: dates (``DA``, 8 digits) in seven spellings, digit-bounded; times (``TM``) of 6+
    digits, digit-bounded; person names (``PN``) whole (``^`` as given, and as spaces) plus
    every name part of 5+ characters, word-bounded; other text whole (4+ characters) plus every
    word of 5+ characters that mixes letters and digits (planted tokens, MRNs), word-bounded.
    """
    value = str(value).strip().strip("\0").strip()
    if len(value) < 4:
        return None
    needles: list[tuple[str, str]] = []
    if vr == "DA" and re.fullmatch(r"\d{8}", value):
        needles = [(v, "digits") for v in _date_variants(value)]
    elif vr == "DT" and re.match(r"\d{8}", value):
        needles = [(v, "digits") for v in _date_variants(value[:8])] + [(value, "none")]
    elif vr == "TM":
        digits = value.split(".")[0]
        if len(digits) < 6 or not digits.isdigit():
            return None
        needles = [(digits, "digits"), (f"{digits[:2]}:{digits[2:4]}:{digits[4:6]}", "digits")]
    elif vr == "PN":
        needles = [(value, "none"), (value.replace("^", " ").strip(), "none")]
        needles += [(part, "word") for part in re.split(r"[\^\s]+", value) if len(part) >= 5]
    else:
        needles = [(value, "none")]
        needles += [(w, "word") for w in re.findall(r"[A-Za-z0-9]+", value)
                    if len(w) >= 5 and re.search(r"\d", w) and re.search(r"[A-Za-z]", w)]
    out: list[tuple[bytes, str]] = []
    for text, rule in needles:
        for enc in ("utf-8", "latin-1"):
            try:
                b = text.lower().encode(enc)
            except UnicodeEncodeError:
                continue
            if (b, rule) not in out and len(b) >= 4:
                out.append((b, rule))
    return Identifier(kind, value, tuple(out)) if out else None


def _walk_identifying(ds, out: dict[tuple[str, str], Identifier]) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                _walk_identifying(item, out)
            continue
        kw = elem.keyword or ""
        if kw in ("PatientID",) or elem.VR == "UI":
            continue
        if kw in PHI_KEYWORDS or elem.VR in ("PN", "DA", "DT"):
            vals = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
            for v in vals:
                if v is None:
                    continue
                key = (kw or str(elem.tag), str(v))
                if key not in out:
                    ident = make_identifier(kw or str(elem.tag), str(v), elem.VR)
                    if ident is not None:
                        out[key] = ident


def collect_identifiers(sources_dir: str | Path, sources: Sequence[str] = SOURCES, every_file: bool = True,
                        progress: bool = False) -> list[Identifier]:
    """Every identifying value present in the sources, for the PHI audit.

    DICOM: all elements named in :data:`PHI_KEYWORDS` and every PN/DA/DT element (sequences
    included) of every file (``every_file``) or of the first, middle and last file of each
    series (identifying tags are series-level attributes; reading every header costs ~3 ms a
    file);
    the study and series folder names (they carry dates and descriptions). NIfTI: the free-text
    header fields ``descrip``, ``aux_file``, ``intent_name`` and extension contents.
    PatientID (the public archive ID used as release ID) and UIDs are not identifiers here.
    """
    from tqdm.auto import tqdm

    root = Path(sources_dir)
    found: dict[tuple[str, str], Identifier] = {}
    for src in sources:
        base = root / src
        if not base.exists():
            continue
        if src in DICOM_SOURCES:
            folders = sorted({p.parent for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")})
            for folder in tqdm(folders, desc=f"identifiers {src}", disable=not progress, leave=False):
                files = dicom.list_dicom_files(folder)
                if not files:
                    continue
                pick = files if every_file else sorted({files[0], files[len(files) // 2], files[-1]})
                for f in pick:
                    try:
                        ds = dicom.read_dataset(f, pixels=False)
                    except dicom.SeriesError:
                        continue
                    _walk_identifying(ds, found)
                rel = folder.relative_to(base).parts
                for name in rel[1:]:  # study / series folder names (not the public patient ID)
                    ident = make_identifier("folder_name", name)
                    if ident is not None:
                        found.setdefault(("folder_name", name), ident)
        else:
            for f in sorted(base.rglob("*.nii*")):
                try:
                    hdr = nib.load(str(f)).header
                except Exception:
                    continue
                texts = {"nifti_descrip": hdr["descrip"].tobytes(), "nifti_aux_file": hdr["aux_file"].tobytes(),
                         "nifti_intent_name": hdr["intent_name"].tobytes()}
                for i, e in enumerate(hdr.extensions):
                    c = e.get_content()
                    texts[f"nifti_extension_{i}"] = c if isinstance(c, bytes) else str(c).encode()
                for kind, raw in texts.items():
                    text = raw.split(b"\0")[0].decode("latin-1").strip()
                    ident = make_identifier(kind, text)
                    if ident is not None:
                        found.setdefault((kind, text), ident)
    return list(found.values())


@dataclass(frozen=True)
class Leak:
    """An identifier found in an output: file, where in it, which kind (value masked)."""

    path: str
    where: str
    kind: str
    masked: str

    def __str__(self) -> str:
        return f"{self.path} [{self.where}]: {self.kind} value {self.masked}"


class PHILeakError(RuntimeError):
    """Raised by :func:`require_no_phi` with every leak found."""

    def __init__(self, leaks: Sequence[Leak]):
        self.leaks = list(leaks)
        head = "\n".join(f"  - {x}" for x in self.leaks[:20])
        more = f"\n  ... and {len(self.leaks) - 20} more" if len(self.leaks) > 20 else ""
        super().__init__(f"PHI audit failed: {len(self.leaks)} identifying value(s) found in outputs:\n{head}{more}")


def _mask_value(v: str) -> str:
    return f"{v[:2]}***({len(v)} chars)"


_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{4,}")


def _bounded(text: bytes, needle: bytes, rule: str) -> bool:
    if rule == "none":
        return needle in text
    start = text.find(needle)
    cls = rb"[0-9]" if rule == "digits" else rb"[0-9a-z]"
    while start >= 0:
        end = start + len(needle)
        before = text[start - 1: start] if start else b""
        after = text[end: end + 1]
        if not (before and re.match(cls, before)) and not (after and re.match(cls, after)):
            return True
        start = text.find(needle, start + 1)
    return False


def _gzip_header_text(raw: bytes) -> bytes:
    """FNAME / FCOMMENT fields of a gzip header (plain text before the compressed stream)."""
    if len(raw) < 10:
        return b""
    flags, pos, out = raw[3], 10, []
    if flags & 4 and len(raw) >= 12:  # FEXTRA
        pos += 2 + int.from_bytes(raw[10:12], "little")
    for bit in (8, 16):  # FNAME, FCOMMENT
        if flags & bit:
            end = raw.find(b"\0", pos)
            if end < 0:
                break
            out.append(raw[pos:end])
            pos = end + 1
    return b"\n".join(out)


def _png_text(raw: bytes) -> bytes:
    """Text chunks (tEXt, iTXt, zTXt) of a PNG; image data is not text."""
    out, pos = [], 8
    while pos + 8 <= len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "big")
        kind = raw[pos + 4:pos + 8]
        data = raw[pos + 8:pos + 8 + n]
        if kind in (b"tEXt", b"iTXt"):
            out.append(data)
        elif kind == b"zTXt":
            key, _, rest = data.partition(b"\0")
            try:
                out.append(key + b" " + zlib.decompress(rest[1:]))
            except zlib.error:
                out.append(key)
        pos += 12 + n
    return b"\n".join(out)


def _gunzip(raw: bytes) -> bytes:
    try:
        from isal import igzip

        return igzip.decompress(raw)
    except ImportError:  # pragma: no cover - isal is a declared dependency
        return gzip.decompress(raw)


def _nifti_views(body: bytes, label: str) -> list[tuple[str, bytes]]:
    """Views of a (decompressed) NIfTI-1 file: the header and extensions always; the voxel
    bytes only when they contain a run of four text bytes (what the audit searches), checked
    on every byte with numpy. CT in HU and label maps never do (a 16-bit value in
    [-1024, 3071] has a non-printable upper byte), so their voxels are proven free of text
    without a slow text scan."""
    if len(body) < 352 or body[344:348] not in (b"n+1\0", b"ni1\0") or int.from_bytes(body[:4], "little") != 348:
        return [(label, body)]
    vox_offset = int(np.frombuffer(body[108:112], "<f4")[0])
    if vox_offset < 348 or vox_offset > len(body):
        return [(f"{label} (NIfTI)", body)]
    header = body[:vox_offset]
    b = np.frombuffer(body, dtype=np.uint8, offset=vox_offset)
    if b.size < 4:
        return [(f"{label} NIfTI header", header)]
    code = int.from_bytes(body[70:72], "little")
    n_even = (len(body) - vox_offset) // 2 * 2
    if code == 4 and n_even:  # int16: a printable byte pair needs an upper byte 0x20..0x7E
        if int(np.frombuffer(body, "<i2", count=n_even // 2, offset=vox_offset).max()) < 0x2000:
            return [(f"{label} NIfTI header", header)]
    elif code in (2, 256) and int(b.max()) < 0x20 and (code == 2 or int(b.min()) >= 0):  # uint8/int8 labels
        return [(f"{label} NIfTI header", header)]
    p = (b >= 0x20) & (b <= 0x7E)
    run4 = p[:-3] & p[1:-2] & p[2:-1] & p[3:]
    if run4.any():
        return [(f"{label} NIfTI header", header), (f"{label} NIfTI voxels", body[vox_offset:])]
    return [(f"{label} NIfTI header", header)]


def _contents(path: Path) -> list[tuple[str, bytes]]:
    """Byte views of a file to search: gzip -> header text + decompressed stream; zip
    (``.xlsx``) -> member names + every member; PNG -> text chunks; anything else -> raw bytes.
    Compressed payloads are never searched as raw bytes (random bytes, no text)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            body = _gunzip(raw)
        except (OSError, EOFError, zlib.error):
            body = b""
        return [("gzip header", _gzip_header_text(raw)), *_nifti_views(body, "gunzipped")]
    if len(raw) >= 348 and raw[344:348] in (b"n+1\0", b"ni1\0"):
        return _nifti_views(raw, "bytes")
    if raw[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(_pyio.BytesIO(raw)) as z:
                infos = z.infolist()
                views = [("zip member names", "\n".join(i.filename for i in infos).encode("utf-8"))]
                views += [(f"zip member {i.filename}", z.read(i)) for i in infos]
                return views
        except zipfile.BadZipFile:
            return [("bytes", raw)]
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        return [("png text", _png_text(raw))]
    return [("bytes", raw)]


def _searchable(data: bytes) -> tuple[bytes, bytes]:
    """(lower-cased printable runs joined by newlines, lower-cased full data for non-ASCII
    needles). Binary payloads (voxels) shrink to their few text runs."""
    runs = b"\n".join(_PRINTABLE_RUN.findall(data)).lower()
    return runs, data


def audit_phi(roots: Sequence[str | Path], identifiers: Sequence[Identifier]) -> list[Leak]:
    """Search every file under ``roots`` (names and bytes) for the identifiers.

    Content views: raw bytes, gunzipped ``.gz``, zip members (``.xlsx``). ASCII needles are
    matched case-insensitively within printable runs; non-ASCII needles (latin-1/UTF-8
    names) byte-exactly in the whole data. Voxel data of CT/masks cannot hide text (16-bit HU
    in [-1024, 3071] never forms two printable bytes in a row).

    Returns:
        Every leak, with the value masked (the report itself must not leak).
    """
    leaks: list[Leak] = []
    ascii_n = [(i, n, r) for i in identifiers for n, r in i.needles if n.isascii()]
    other_n = [(i, n, r) for i in identifiers for n, r in i.needles if not n.isascii()]
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            rel = str(f.relative_to(root.parent if root.is_file() else root))
            name = rel.lower().encode("utf-8")
            seen: set[tuple[str, str]] = set()
            for ident, n, r in ascii_n:
                if (ident.kind, ident.value) not in seen and _bounded(name, n, r):
                    seen.add((ident.kind, ident.value))
                    leaks.append(Leak(str(f), "file name", ident.kind, _mask_value(ident.value)))
            for where, data in _contents(f):
                text, full = _searchable(data)
                for ident, n, r in ascii_n:
                    if (ident.kind, ident.value) in seen:
                        continue
                    if n in text and _bounded(text, n, r):
                        seen.add((ident.kind, ident.value))
                        leaks.append(Leak(str(f), where, ident.kind, _mask_value(ident.value)))
                for ident, n, _r in other_n:
                    if (ident.kind, ident.value) not in seen and (n in full or n in full.lower()):
                        seen.add((ident.kind, ident.value))
                        leaks.append(Leak(str(f), where, ident.kind, _mask_value(ident.value)))
    return leaks


@dataclass
class AuditReport:
    """Outcome of a PHI audit."""

    files: int
    identifiers: int
    leaks: list[Leak]

    @property
    def passed(self) -> bool:
        return not self.leaks

    def summary(self) -> str:
        return (f"PHI audit: {self.files} output files and their names searched for {self.identifiers} identifying "
                f"values from the sources: " + ("no leak" if self.passed else f"{len(self.leaks)} LEAK(S)"))


def require_no_phi(roots: Sequence[str | Path], identifiers: Sequence[Identifier], raise_on_leak: bool = True
                   ) -> AuditReport:
    """Run :func:`audit_phi`; raise :class:`PHILeakError` on any leak (the stage fails)."""
    leaks = audit_phi(roots, identifiers)
    n = sum(1 if Path(r).is_file() else sum(1 for p in Path(r).rglob("*") if p.is_file())
            for r in roots if Path(r).exists())
    rep = AuditReport(n, len(identifiers), leaks)
    if leaks and raise_on_leak:
        raise PHILeakError(leaks)
    return rep


# ============================================================================ stage outputs


def write_stage_tables(cfg: CurationConfig, sel: SelectionResult, conv: ConversionOutcome, split: SplitResult
                       ) -> dict[str, Path]:
    """Write ``tables/`` CSVs: cases, provenance, exclusions, selection, split_counts,
    unknown_ids, conversion_times. Returns ``{name: path}``."""
    t = cfg.tables_dir
    out = {
        "cases": cases_table(conv.included, split.assignment, cfg),
        "provenance": provenance_table(conv.included, split),
        "exclusions": conv.exclusions,
        "selection": sel.table(),
        "not_selected": pd.DataFrame(sel.dropped, columns=["release_id", "source", "reason"]),
        "split_counts": split.counts(cfg.id_patterns),
        "unknown_ids": pd.DataFrame({"release_id": split.unknown_ids}),
        "conversion_times": conv.times_table(),
    }
    paths = {}
    for name, df in out.items():
        paths[name] = write_text(t / f"{name}.csv", df.to_csv(index=False))
    return paths


def write_release(cfg: CurationConfig, conv: ConversionOutcome, split: SplitResult) -> PlacementReport:
    """Place the images, write ``data_split.txt``, the metadata sheets and ``readme.txt``."""
    rep = place_release(conv.included, split.assignment, cfg)
    write_split_file(cfg.release_dir / "data_split.txt", split.assignment)
    write_metadata_sheets(conv.included, split.assignment, cfg.release_dir)
    write_readme(cfg.release_dir, split.assignment, cfg.id_patterns)
    return rep


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


# ============================================================================ figures


def plot_quality(records: Mapping[str, dict], q: QualityThresholds, path: str | Path) -> Path:
    """Scatter of the measured criteria (noise, z extent, border fraction) per converted series,
    coloured by source, thresholds drawn, failures marked. Saved as PNG (atomic)."""
    import matplotlib.pyplot as plt

    from lib.viz import save_figure

    recs = [r for r in records.values() if r.get("status") == "converted"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = dict(zip(SOURCES, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    specs = [("z_extent_mm", "noise_hu", "z extent (mm)", "noise SD (HU)"),
             ("slice_spacing_mm", "noise_hu", "slice spacing (mm)", "noise SD (HU)"),
             ("n_slices", "border_fraction", "slices", "body share of image border")]
    for ax, (xk, yk, xl, yl) in zip(axes, specs, strict=True):
        for src in SOURCES:
            rs = [r for r in recs if r["source"] == src]
            if not rs:
                continue
            bad = [bool(quality_faults(r, q)) for r in rs]
            xs = [r["measures"][xk] for r in rs]
            ys = [r["measures"][yk] for r in rs]
            ax.scatter([x for x, b in zip(xs, bad, strict=True) if not b], [y for y, b in zip(ys, bad, strict=True) if not b],
                       s=18, c=colours[src], label=src, alpha=0.8)
            ax.scatter([x for x, b in zip(xs, bad, strict=True) if b], [y for y, b in zip(ys, bad, strict=True) if b],
                       s=60, c=colours[src], marker="x")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    axes[0].axhline(q.max_noise_hu, ls="--", c="k", lw=0.8)
    axes[0].axvline(q.min_z_extent_mm, ls="--", c="k", lw=0.8)
    axes[1].axhline(q.max_noise_hu, ls="--", c="k", lw=0.8)
    axes[1].axvline(q.max_slice_spacing_mm, ls="--", c="k", lw=0.8)
    axes[2].axhline(q.max_border_fraction, ls="--", c="k", lw=0.8)
    axes[2].axvline(q.min_slices, ls="--", c="k", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle("Measured quality criteria per converted series (x = fails a criterion; dashed = thresholds)")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


def plot_release_previews(release_dir: str | Path, path: str | Path,
                          patterns: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Mid-sagittal slice (bone window) of the first case of each source in the release, in
    mm aspect. Saved as PNG (atomic)."""
    import matplotlib.pyplot as plt

    from lib.viz import save_figure

    rd = Path(release_dir)
    picks = {}
    for split in SPLITS:
        for f in sorted((rd / split / "data").glob("*.nii.gz")):
            picks.setdefault(infer_source(f.name, patterns), f)
    n = max(1, len(picks))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 4.2), squeeze=False)
    for ax, (src, f) in zip(axes[0], sorted(picks.items()), strict=False):
        v = load_volume(f)
        a = np.asarray(v.array)
        sl = a[a.shape[0] // 2].T  # (z, y)
        sx, sy, sz = v.spacing
        ax.imshow(sl, cmap="gray", vmin=-400, vmax=1200, origin="lower", aspect=sz / sy)
        ax.set_title(f"{src}\n{strip_nifti_suffix(f)[:26]}", fontsize=8)
        ax.axis("off")
    fig.suptitle("Release images: mid-sagittal, bone window")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=100)
    return path


