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
import shutil
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

from lib.core import labels as L
from lib.core.paths import SPLITS, ProfilePaths
from lib.core.seeding import stable_rng
from lib.imaging.quality import measure_border_fraction, measure_noise_hu
from lib.io import NiftiReadError, atomic_path, check_pair, load_volume, save_volume, write_text
from lib.io import dicom_read as dicom

# ============================================================================ constants

SOURCES = ("COLONOG", "HNSCC", "MSD_T10", "COVID19")
"""The four CTSpine1K sources, in the paper's order."""
DICOM_SOURCES = ("COLONOG", "HNSCC")
NIFTI_SOURCES = ("MSD_T10", "COVID19")
UNKNOWN = "unknown"

BUILTIN_ID_PATTERNS: dict[str, tuple[str, ...]] = {
    "COLONOG": (r"1\.3\.6\.1\.4\.1\.9328\.50\.4\.\d{4}", r"CTC-\d{10}"),
    "HNSCC": (r"HN_P\d{3}",),
    "MSD_T10": (r"liver_\d+",),
    "COVID19": (r"volume-covid19-A-\d{4}(?:_\d+)?_ct",),
}
"""Release-ID spellings per source (full match). ``CTC-<10 digits>`` (COLONOG) and
``volume-covid19-A-0202_0_ct`` occur in the official release next to the usual spellings."""

PAPER_SPLIT_COUNTS: dict[str, dict[str, int]] = {
    "COLONOG": {"trainset": 480, "test_public": 152, "test_private": 152},
    "HNSCC": {"trainset": 20, "test_public": 5, "test_private": 6},
    "MSD_T10": {"trainset": 90, "test_public": 30, "test_private": 30},
    "COVID19": {"trainset": 20, "test_public": 10, "test_private": 10},
}
"""CTSpine1K Table 1: patients per source and split (total 610 / 197 / 198)."""

PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "COLONOG": {"patients": 784, "spacing_mm": (0.75, 0.75, 0.81), "size": (512, 512, 542)},
    "HNSCC": {"patients": 31, "spacing_mm": (1.09, 1.09, 2.0), "size": (512, 512, 202)},
    "MSD_T10": {"patients": 150, "spacing_mm": (0.77, 0.77, 1.55), "size": (512, 512, 478)},
    "COVID19": {"patients": 40, "spacing_mm": (0.79, 0.79, 4.5), "size": (512, 512, 93)},
}
"""CTSpine1K Table 1 per source: patients, mean spacing (x, y, z) mm, mean matrix size."""

PAPER_TOTALS = {"patients": 1005, "vertebrae": 11172, "cervical": 419, "thoracic": 5942, "lumbar": 4712,
                "L6_cases": 17, "sacralization_cases": 11}
"""Paper totals: labelled vertebrae by region, sacral lumbarization (L6) and lumbar sacralization."""

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


def merge_id_patterns(extra: Mapping[str, str | Sequence[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """The built-in release-ID pattern table with the user's patterns added.

    Args:
        extra: ``{source: regex or [regex, ...]}``; patterns of a known source are added to
            its built-in ones (not replacing them), a new source name adds a source.

    Raises:
        ValueError: a pattern that is not a valid regular expression, naming it.
    """
    table = {k: tuple(v) for k, v in BUILTIN_ID_PATTERNS.items()}
    for src, pats in (extra or {}).items():
        pats = (pats,) if isinstance(pats, str) else tuple(pats)
        for pat in pats:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"extra_id_patterns[{src!r}]: invalid regular expression {pat!r} ({exc})") from None
        table[src] = table.get(src, ()) + pats
    return table


def strip_id(name: str | Path) -> str:
    """Release ID of a file name: drop a ``.nii.gz`` / ``.nii`` suffix only (IDs such as
    ``1.3.6.1.4.1.9328.50.4.0001`` contain dots, so no generic suffix stripping)."""
    name = Path(name).name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def infer_source(release_id: str, patterns: Mapping[str, Sequence[str]] | None = None) -> str:
    """Source of a release ID by the pattern table (full match); ``"unknown"`` when none fits.

    ``.nii.gz`` / ``_seg`` suffixes are ignored, so file names work too.
    """
    rid = strip_id(release_id)
    if rid.endswith("_seg"):
        rid = rid[: -len("_seg")]
    for src, pats in (patterns or BUILTIN_ID_PATTERNS).items():
        if any(re.fullmatch(p, rid) for p in pats):
            return src
    return UNKNOWN


def release_id_for(source: str, key: str) -> str:
    """Release ID in the source's own spelling.

    COLONOG and HNSCC: the patient folder (the archive's public PatientID, e.g.
    ``1.3.6.1.4.1.9328.50.4.0001``, ``HN_P001``). MSD T10: the file stem (``liver_12``).
    COVID-19: the file stem with ``_ct`` (``volume-covid19-A-0014_ct``), as the release spells it.
    """
    if source == "COVID19" and not key.endswith("_ct"):
        return f"{key}_ct"
    return key


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
                stem = strip_id(f)
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
    listed = {strip_id(i) for i in listed_ids} if listed_ids is not None else None
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


def _canonical_geometry(affine: np.ndarray, shape: Sequence[int]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Spacing and shape in RAS axis order (x, y, z) for any stored orientation."""
    ornt = orientations.io_orientation(affine)
    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    out_sp, out_sh = [0.0] * 3, [0] * 3
    for i in range(3):
        j = int(ornt[i, 0])
        out_sp[j] = float(sp[i])
        out_sh[j] = int(shape[i])
    return tuple(out_sp), tuple(out_sh)


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
        sp, sh = _canonical_geometry(affine, arr.shape)
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


def count_by_source_split(assignment: Mapping[str, str], patterns: Mapping[str, Sequence[str]] | None = None
                          ) -> pd.DataFrame:
    """Per-source, per-split counts of a ``{release_id: split}`` map; unknown spellings are
    counted under ``unknown`` (and named by :func:`unknown_ids`)."""
    srcs = list(dict.fromkeys([*(patterns or BUILTIN_ID_PATTERNS), UNKNOWN]))
    tab = pd.DataFrame(0, index=srcs, columns=list(SPLITS), dtype=int)
    for rid, split in assignment.items():
        tab.loc[infer_source(rid, patterns), split] += 1
    tab = tab[(tab.sum(axis=1) > 0) | tab.index.isin(SOURCES)]
    tab.loc["total"] = tab.sum(axis=0)
    tab["all"] = tab[list(SPLITS)].sum(axis=1)
    tab.index.name = "source"
    return tab.reset_index()


def unknown_ids(ids: Iterable[str], patterns: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """IDs whose spelling matches no source pattern, sorted."""
    return sorted(strip_id(i) for i in ids if infer_source(i, patterns) == UNKNOWN)


def read_split_file(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """Read an official ``data_split.txt``: lines ``trainset:``, ``test_public:``,
    ``test_private:``, each followed by image file names.

    Tolerates blank lines, spaces, Windows line ends and a line where two file names ran
    together (``A.nii.gzB.nii.gz``, as in the published file), which is split and noted.

    Returns:
        ``({release_id: split}, notes)``.

    Raises:
        FileNotFoundError / ValueError: missing file; a name before any section header; an
        unknown section; an ID listed in two splits — naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: split file not found")
    out: dict[str, str] = {}
    notes: list[str] = []
    split = None
    for n, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.endswith(":"):
            name = line[:-1].strip()
            if name not in SPLITS:
                raise ValueError(f"{path}, line {n}: unknown section {line!r}; expected one of {[s + ':' for s in SPLITS]}")
            split = name
            continue
        if split is None:
            raise ValueError(f"{path}, line {n}: file name {line!r} before any 'trainset:' / 'test_public:' / 'test_private:' line")
        names = [x + ".nii.gz" for x in line.split(".nii.gz") if x] if line.count(".nii.gz") > 1 else [line]
        if len(names) > 1:
            notes.append(f"{path.name}, line {n}: {len(names)} file names ran together; read as {names}")
        for name in names:
            rid = strip_id(name)
            if rid in out and out[rid] != split:
                raise ValueError(f"{path}, line {n}: {rid} listed in both {out[rid]} and {split}")
            if rid in out:
                notes.append(f"{path.name}, line {n}: {rid} listed twice in {split}")
            out[rid] = split
    return out, notes


def write_split_file(path: str | Path, assignment: Mapping[str, str]) -> Path:
    """Write ``data_split.txt`` in the official format (sections in release order, names sorted
    within each, ``.nii.gz`` file names, a blank line between sections)."""
    blocks = []
    for s in SPLITS:
        names = sorted(f"{rid}.nii.gz" for rid, sp in assignment.items() if sp == s)
        blocks.append(f"{s}:\n" + "".join(n + "\n" for n in names))
    return write_text(path, "\n".join(blocks))


def paper_fractions(source: str) -> tuple[float, float, float]:
    """The paper's train/public/private proportions of a source (all sources pooled for an
    unknown one: 610/197/198)."""
    counts = PAPER_SPLIT_COUNTS.get(source)
    if counts is None:
        tot = [sum(PAPER_SPLIT_COUNTS[s][sp] for s in PAPER_SPLIT_COUNTS) for sp in SPLITS]
    else:
        tot = [counts[sp] for sp in SPLITS]
    return tuple(t / sum(tot) for t in tot)


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    raw = [n * f for f in fractions]
    base = [int(math.floor(r)) for r in raw]
    rest = n - sum(base)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base


def split_stratified(ids: Sequence[str], seed: int, patterns: Mapping[str, Sequence[str]] | None = None,
                     fractions: Mapping[str, Sequence[float]] | None = None) -> dict[str, str]:
    """Seeded split stratified by source with the paper's proportions per source.

    Within each source the IDs are sorted, permuted by a generator seeded with (seed, source)
    and cut by largest-remainder counts, so the same seed and IDs give the same split, and
    adding a source does not reshuffle the others. IDs of unknown spelling form their own
    stratum with the pooled proportions.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for rid in ids:
        groups[infer_source(rid, patterns)].append(rid)
    out: dict[str, str] = {}
    for src, members in groups.items():
        members = sorted(members)
        fr = (fractions or {}).get(src) or paper_fractions(src)
        counts = _largest_remainder(len(members), fr)
        perm = stable_rng(seed, "split", src, nbytes=6).permutation(len(members))
        k = 0
        for split, c in zip(SPLITS, counts, strict=True):
            for i in perm[k:k + c]:
                out[members[int(i)]] = split
            k += c
    return out


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


def _move(src: Path, dst: Path) -> None:
    """Move a file into place atomically (rename; across file systems: copy to a temporary
    file beside ``dst``, rename, then remove ``src``)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        src.unlink()


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
            rid = strip_id(f)
            if rid not in wanted:
                _move(f, cfg.work_dir / "orphans" / f"{s}__{f.name}")
                mask = cfg.release_dir / s / "gt" / f"{rid}_seg.nii.gz"
                if mask.exists():
                    _move(mask, cfg.work_dir / "orphans" / f"{s}__{mask.name}")
                manifest.pop(rid, None)
                _write_manifest(cfg, manifest)
                rep.stale.append(rid)
    for c in included:
        split = assignment[c.release_id]
        dst = cfg.release_dir / split / "data" / f"{c.release_id}.nii.gz"
        if c.staged.exists():
            _move(c.staged, dst)
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
                _move(cur, dst)
                rep.moved_between_splits.append(c.release_id)
            else:
                rep.already_in_place += 1
        for s in SPLITS:  # the mask follows the image
            mask = cfg.release_dir / s / "gt" / f"{c.release_id}_seg.nii.gz"
            if s != split and mask.exists():
                _move(mask, cfg.release_dir / split / "gt" / mask.name)
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


def find_special_cases(release_dir: str | Path, min_gap_mm: float = 20.0) -> dict[str, list[str]]:
    """Special cases from the release masks (``gt/<ID>_seg.nii.gz``).

    * ``L6``: sacral lumbarization, label 25 (L6) present.
    * ``lumbar_sacralization``: L4 present, L5 and L6 absent, and the scan reaches at least
      ``min_gap_mm`` below L4 (so L5 would have been in the field of view).

    Returns:
        ``{"L6": [...], "lumbar_sacralization": [...], "masks": [...all IDs with a mask]}``.
    """
    out: dict[str, list[str]] = {"L6": [], "lumbar_sacralization": [], "masks": []}
    for split in SPLITS:
        for m in sorted((Path(release_dir) / split / "gt").glob("*_seg.nii.gz")):
            rid = strip_id(m)[: -len("_seg")]
            st = _mask_stats(m, min_gap_mm)
            out["masks"].append(rid)
            if st["L6"]:
                out["L6"].append(rid)
            if st["sacralization"]:
                out["lumbar_sacralization"].append(rid)
    return {k: sorted(v) for k, v in out.items()}


def _mask_stats(mask_path: Path, min_gap_mm: float = 20.0) -> dict[str, Any]:
    v = load_volume(mask_path)
    arr = np.asarray(v.array)
    present = [int(x) for x in np.unique(arr) if x in L.LABELS]
    regions = Counter(L.region(x) for x in present)
    sacral = False
    if 23 in present and 24 not in present and 25 not in present:
        k_lowest = int(np.flatnonzero((arr == 23).any(axis=(0, 1)))[0])
        sacral = k_lowest * v.spacing[2] >= min_gap_mm
    return {"labels": present, "vertebrae": len(present), "cervical": regions.get("cervical", 0),
            "thoracic": regions.get("thoracic", 0), "lumbar": regions.get("lumbar", 0), "L6": 25 in present,
            "sacralization": sacral}


def write_readme(release_dir: str | Path, assignment: Mapping[str, str] | None = None,
                 patterns: Mapping[str, Sequence[str]] | None = None, special: Mapping[str, list[str]] | None = None
                 ) -> Path:
    """``readme.txt`` of the release: layout, sources and counts per split, special cases.

    The special cases (L6 / lumbar sacralization) are read from the masks when ``gt/`` holds
    any (or taken from ``special``); before annotation the section says they are pending.
    """
    release_dir = Path(release_dir)
    if assignment is None:
        assignment = {strip_id(f): s for s in SPLITS for f in (release_dir / s / "data").glob("*.nii.gz")}
    counts = count_by_source_split(assignment, patterns)
    special = dict(special) if special is not None else find_special_cases(release_dir)
    lines = [
        "CTSpine1K-style release (curated by the spine1k workspace, stage 01_curation)",
        "",
        "Layout:",
        "  {trainset,test_public,test_private}/data/<ID>.nii.gz   CT, int16 Hounsfield units",
        "  {trainset,test_public,test_private}/gt/<ID>_seg.nii.gz  vertebra labels 1-25 (C1-C7, T1-T12, L1-L6)",
        "  metadata_colonog.xlsx, metadata_neck.xlsx               non-identifying acquisition tags",
        "  data_split.txt                                          the split, official format",
        "",
        "IDs keep the sources' spellings: COLONOG 1.3.6.1.4.1.9328.50.4.0xxx (or CTC-xxxxxxxxxx),",
        "HNSCC HN_Pxxx, MSD T10 liver_xxx, COVID-19 volume-covid19-A-0xxx_ct.",
        "Images are de-identified: no names, dates, institutions or accession numbers in file",
        "names, NIfTI headers or sheets (checked by a byte-level audit of every output file).",
        "",
        "Cases per source and split:",
        counts.to_string(index=False),
        "",
        "Labels: " + ", ".join(f"{v}={L.name(v)}" for v in L.CTSPINE1K_LABELS),
        "",
        "Special cases:",
    ]
    if not special.get("masks"):
        lines.append("  pending: listed here once the annotation rounds have filled gt/")
    else:
        lines.append(f"  masks present for {len(special['masks'])} case(s)")
        lines.append(f"  sacral lumbarization (L6 labelled as 25): {len(special['L6'])}")
        lines += [f"    {r}" for r in special["L6"]]
        lines.append(f"  lumbar sacralization (no L5: L4 lowest, scan reaches below): {len(special['lumbar_sacralization'])}")
        lines += [f"    {r}" for r in special["lumbar_sacralization"]]
    return write_text(release_dir / "readme.txt", "\n".join(lines) + "\n")


# ============================================================================ Table 1


def _release_dir(paths_or_release_dir: ProfilePaths | str | Path) -> Path:
    return paths_or_release_dir.release if isinstance(paths_or_release_dir, ProfilePaths) else Path(paths_or_release_dir)


def release_inventory(paths_or_release_dir: ProfilePaths | str | Path, with_masks: bool = False,
                      patterns: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """One row per release image: ID, split, source, spacing and size in RAS order (from the
    NIfTI header only), and with ``with_masks`` the mask's vertebra counts."""
    rd = _release_dir(paths_or_release_dir)
    rows = []
    for split in SPLITS:
        for f in sorted((rd / split / "data").glob("*.nii.gz")):
            rid = strip_id(f)
            try:
                img = nib.load(str(f))
            except Exception as exc:
                raise NiftiReadError(f"{f}: unreadable NIfTI header ({exc})") from exc
            sp, sh = _canonical_geometry(img.affine, img.shape[:3])
            row = {"release_id": rid, "split": split, "source": infer_source(rid, patterns),
                   "spacing_x_mm": sp[0], "spacing_y_mm": sp[1], "spacing_z_mm": sp[2],
                   "size_x": sh[0], "size_y": sh[1], "size_z": sh[2]}
            if with_masks:
                m = rd / split / "gt" / f"{rid}_seg.nii.gz"
                row["has_mask"] = m.exists()
                if m.exists():
                    st = _mask_stats(m)
                    row.update({k: st[k] for k in ("vertebrae", "cervical", "thoracic", "lumbar")})
                    row["L6"], row["sacralization"] = st["L6"], st["sacralization"]
            rows.append(row)
    return pd.DataFrame(rows)


def has_masks(paths_or_release_dir: ProfilePaths | str | Path) -> bool:
    """True when any ``<split>/gt/*_seg.nii.gz`` exists in the release."""
    rd = _release_dir(paths_or_release_dir)
    return any(next((rd / s / "gt").glob("*_seg.nii.gz"), None) is not None for s in SPLITS)


def build_table1(paths_or_release_dir: ProfilePaths | str | Path, with_masks: bool = False,
                 patterns: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Table 1 of the release, side by side with the paper's.

    Rows: every source x split, the source over all splits (``split == "all"``), and
    ``total``. Columns: ``patients``; mean and SD of the spacing (x, y, z) mm; mean size;
    with ``with_masks``: cases with a mask, labelled vertebrae (all / cervical / thoracic /
    lumbar), L6 cases and lumbar sacralization cases (:func:`find_special_cases` rules); and the
    paper's values (``paper_patients``, ``paper_spacing_mm``, ``paper_size``, and with masks
    ``paper_vertebrae`` etc. on the total row).

    Args:
        paths_or_release_dir: a :class:`lib.paths.ProfilePaths` or the release folder.
        with_masks: read ``gt/`` masks (needs the annotation stage to have run).
        patterns: release-ID pattern table (default: built-in).
    """
    inv = release_inventory(paths_or_release_dir, with_masks, patterns)
    cols_sp = ["spacing_x_mm", "spacing_y_mm", "spacing_z_mm"]
    cols_sz = ["size_x", "size_y", "size_z"]
    srcs = [s for s in [*SOURCES, *sorted(set(inv.get("source", pd.Series(dtype=str))) - set(SOURCES))]]
    groups: list[tuple[str, str, pd.DataFrame]] = []
    for src in srcs:
        sub = inv[inv["source"] == src] if len(inv) else inv
        for split in SPLITS:
            groups.append((src, split, sub[sub["split"] == split] if len(sub) else sub))
        groups.append((src, "all", sub))
    for split in SPLITS:
        groups.append(("total", split, inv[inv["split"] == split] if len(inv) else inv))
    groups.append(("total", "all", inv))
    rows = []
    for src, split, g in groups:
        row: dict[str, Any] = {"source": src, "split": split, "patients": int(len(g))}
        for c in cols_sp:
            row[c] = round(float(g[c].mean()), 3) if len(g) else np.nan
            row[c.replace("spacing", "sd")] = round(float(g[c].std(ddof=0)), 3) if len(g) else np.nan
        for c in cols_sz:
            row[f"mean_{c}"] = round(float(g[c].mean()), 1) if len(g) else np.nan
        row["spacing_mm"] = (" x ".join(f"{row[c]:.2f}±{row[c.replace('spacing', 'sd')]:.2f}" for c in cols_sp)
                             if len(g) else "")
        row["size"] = " x ".join(f"{row[f'mean_{c}']:.0f}" for c in cols_sz) if len(g) else ""
        if with_masks:
            gm = g[g["has_mask"]] if len(g) and "has_mask" in g else g.iloc[0:0]
            row["cases_with_mask"] = int(len(gm))
            for k in ("vertebrae", "cervical", "thoracic", "lumbar"):
                row[k] = int(gm[k].sum()) if len(gm) else 0
            row["L6_cases"] = int(gm["L6"].sum()) if len(gm) else 0
            row["sacralization_cases"] = int(gm["sacralization"].sum()) if len(gm) else 0
        paper = PAPER_TABLE1.get(src)
        if src in PAPER_SPLIT_COUNTS:
            row["paper_patients"] = PAPER_SPLIT_COUNTS[src][split] if split in SPLITS else paper["patients"]
            row["paper_spacing_mm"] = " x ".join(f"{v:.2f}" for v in paper["spacing_mm"])
            row["paper_size"] = " x ".join(str(v) for v in paper["size"])
        elif src == "total":
            row["paper_patients"] = (sum(PAPER_SPLIT_COUNTS[s][split] for s in PAPER_SPLIT_COUNTS)
                                     if split in SPLITS else PAPER_TOTALS["patients"])
            row["paper_spacing_mm"] = row["paper_size"] = ""
            if with_masks and split == "all":
                for k in ("vertebrae", "cervical", "thoracic", "lumbar", "L6_cases", "sacralization_cases"):
                    row[f"paper_{k}"] = PAPER_TOTALS[k]
        else:
            row["paper_patients"] = np.nan
            row["paper_spacing_mm"] = row["paper_size"] = ""
        rows.append(row)
    df = pd.DataFrame(rows)
    keep = (df["patients"] > 0) | df["source"].isin([*SOURCES, "total"])
    return df[keep].reset_index(drop=True)


# ============================================================================ exports


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link ``src`` at ``dst`` (same file system), else an atomic copy; skip when ``dst``
    already holds the same bytes (same size and mtime, or the same inode)."""
    if dst.exists():
        a, b = src.stat(), dst.stat()
        if (a.st_ino == b.st_ino and a.st_dev == b.st_dev) or (a.st_size == b.st_size and int(a.st_mtime) <= int(b.st_mtime)):
            return
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)


def export_nnunet(release_dir: str | Path, out_dir: str | Path, dataset_id: int = 501, name: str = "CTSpine1K",
                  test_splits: Sequence[str] = ("test_public", "test_private"), check: bool = True) -> Path:
    """Export the release as an nnU-Net v2 raw dataset.

    ``<out_dir>/DatasetNNN_<name>/imagesTr/<ID>_0000.nii.gz`` + ``labelsTr/<ID>.nii.gz`` for
    every trainset case with a mask (``gt/<ID>_seg.nii.gz``), ``imagesTs/<ID>_0000.nii.gz``
    for the test splits, and ``dataset.json`` (``channel_names`` CT, ``labels`` background
    plus C1..L6 from :mod:`lib.labels`, ``numTraining``, ``file_ending``). Files are hard
    links where possible (else copies), written atomically; re-running skips what is there.
    Trainset cases without a mask, or whose mask fails :func:`lib.io.check_pair`, are
    skipped and listed in ``skipped.txt``; files of cases no longer in a split are removed.

    Returns:
        The dataset folder.
    """
    rd = Path(release_dir)
    ds = Path(out_dir) / f"Dataset{int(dataset_id):03d}_{name}"
    training, test, skipped = [], [], []
    for f in sorted((rd / "trainset" / "data").glob("*.nii.gz")):
        rid = strip_id(f)
        m = rd / "trainset" / "gt" / f"{rid}_seg.nii.gz"
        if not m.exists():
            skipped.append(f"{rid}: no mask in trainset/gt yet")
            continue
        if check:
            faults = check_pair(f, m, allowed_labels=L.CTSPINE1K_LABELS)
            if faults:
                skipped.append(f"{rid}: " + "; ".join(x.message for x in faults))
                continue
        _link_or_copy(f, ds / "imagesTr" / f"{rid}_0000.nii.gz")
        _link_or_copy(m, ds / "labelsTr" / f"{rid}.nii.gz")
        training.append(rid)
    for split in test_splits:
        for f in sorted((rd / split / "data").glob("*.nii.gz")):
            rid = strip_id(f)
            _link_or_copy(f, ds / "imagesTs" / f"{rid}_0000.nii.gz")
            test.append(rid)
    expected = {"imagesTr": {f"{r}_0000.nii.gz" for r in training}, "labelsTr": {f"{r}.nii.gz" for r in training},
                "imagesTs": {f"{r}_0000.nii.gz" for r in test}}
    for sub, names in expected.items():  # cases that left a split since the last export
        (ds / sub).mkdir(parents=True, exist_ok=True)
        for f in (ds / sub).glob("*.nii.gz"):
            if f.name not in names:
                f.unlink()
    body = {"channel_names": {"0": "CT"},
            "labels": {"background": 0, **{L.name(v): v for v in L.CTSPINE1K_LABELS}},
            "numTraining": len(training), "file_ending": ".nii.gz",
            "name": name, "description": "CTSpine1K-style release exported by the spine1k workspace",
            "reference": "Deng et al., CTSpine1K", "licence": "see the sources' licences",
            "test_splits": list(test_splits)}
    write_text(ds / "dataset.json", json.dumps(body, indent=2) + "\n")
    write_text(ds / "skipped.txt", "".join(s + "\n" for s in skipped))
    return ds


def export_verse_centroids(release_dir: str | Path, out_dir: str | Path,
                           direction: Sequence[str] = ("P", "I", "R")) -> list[Path]:
    """Write VerSe-style centroid files from the release masks.

    For every ``<split>/gt/<ID>_seg.nii.gz``: ``<out_dir>/<split>/<ID>_seg-subreg_ctd.json`` =
    ``[{"direction": [...]}, {"label": L, "X": .., "Y": .., "Z": ..}, ...]``: the centre of mass
    of each label in voxel coordinates of the image reoriented to ``direction`` (a reversed
    axis counts ``n - 1 - i``), labels in craniocaudal order. Atomic writes.
    """
    rd, out = Path(release_dir), Path(out_dir)
    written = []
    target = orientations.axcodes2ornt(tuple(direction))
    for split in SPLITS:
        for m in sorted((rd / split / "gt").glob("*_seg.nii.gz")):
            img = nib.load(str(m))
            arr = np.asarray(img.dataobj)
            tr = orientations.ornt_transform(orientations.io_orientation(img.affine), target)
            body: list[dict] = [{"direction": list(direction)}]
            present = [int(v) for v in np.unique(arr) if v in L.LABELS]
            from scipy import ndimage

            coms = ndimage.center_of_mass(np.ones_like(arr, dtype=np.uint8), arr, present) if present else []
            for lab, com in sorted(zip(present, coms, strict=True), key=lambda t: L.level_index(t[0])):
                xyz = [0.0, 0.0, 0.0]
                for i in range(3):
                    j, flip = int(tr[i, 0]), tr[i, 1]
                    xyz[j] = com[i] if flip > 0 else (arr.shape[i] - 1) - com[i]
                body.append({"label": lab, "X": round(xyz[0], 3), "Y": round(xyz[1], 3), "Z": round(xyz[2], 3)})
            rid = strip_id(m)[: -len("_seg")]
            written.append(write_text(out / split / f"{rid}_seg-subreg_ctd.json", json.dumps(body, indent=1) + "\n"))
    return written


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
        ax.set_title(f"{src}\n{strip_id(f)[:26]}", fontsize=8)
        ax.axis("off")
    fig.suptitle("Release images: mid-sagittal, bone window")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=100)
    return path


def table1_markdown(t1: pd.DataFrame) -> str:
    """Compact text rendering of Table 1 (ours vs paper) for notebooks and reports."""
    cols = [c for c in ("source", "split", "patients", "paper_patients", "spacing_mm", "paper_spacing_mm", "size",
                        "paper_size", "vertebrae", "L6_cases", "sacralization_cases") if c in t1]
    return t1[cols].to_string(index=False)
