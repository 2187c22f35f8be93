"""Discover the candidate series / volumes of each source (one header read per DICOM folder)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lib.datasets.ctspine1k.ids import (
    DICOM_SOURCES,
    SOURCES,
    release_id_for,
)
from lib.io import dicom_read as dicom
from lib.io import (
    strip_nifti_suffix,
)


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
