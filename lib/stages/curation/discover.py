"""Discover the candidate series / volumes of each source (one header read per DICOM folder).

The folders and which files are CTs follow :mod:`lib.datasets.ctspine1k.source_layout`, as 00's
source check does; what is not read is listed (:class:`Discovery`), never skipped silently.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lib.datasets.ctspine1k.ids import (
    DICOM_SOURCES,
    SOURCES,
    release_id_for,
)
from lib.datasets.ctspine1k.source_layout import (
    folder_names,
    list_nifti_volumes,
    scan_dicom_source,
    source_folder,
)
from lib.io import dicom_read as dicom
from lib.io import (
    strip_nifti_suffix,
)


@dataclass
class Candidate:
    """One series (DICOM) or volume (NIfTI) that curation may use.

    ``source_key`` is the SeriesInstanceUID (DICOM; a hash of the folder path when a series has
    none) or the file stem (NIfTI). ``location`` says where it is in words safe to write: the
    NIfTI file relative to the sources folder, or the DICOM patient folder with the study and
    series folders as ordinals (``COLONOG/<PatientID> (study folder 1 of 1, series folder 2 of 2,
    by name)``). The private fields (``_order``, folder names) may hold dates or descriptions
    from the source: they are used for selection in memory and never written out.
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
    location: str = ""  # NIfTI: path relative to sources_dir; DICOM: patient folder + folder ordinals
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


IGNORED_COLUMNS = ["source", "path", "files", "reason"]


@dataclass
class Discovery:
    """What discovery found: the candidates, every entry it did not read (with why) and notes.

    ``ignored`` rows name paths relative to the sources folder. Below a DICOM patient folder
    they are grouped per patient (``COLONOG/<PatientID>``, how many files, why): study and
    series folder names carry dates and descriptions, and 01's outputs are audited for them
    (00's source check lists each folder).
    """

    candidates: list[Candidate]
    ignored: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ignored_table(self) -> pd.DataFrame:
        """One row per entry not read: source, path (relative to the sources folder), files, reason."""
        return pd.DataFrame(self.ignored, columns=IGNORED_COLUMNS)


def _safe_key(rel: Sequence[str]) -> str:
    """A series key for a folder without a SeriesInstanceUID that does not spell its folder
    names (they may hold dates): a hash of the relative folder path."""
    return "folder-" + hashlib.sha1("/".join(rel).encode("utf-8")).hexdigest()[:12]


def _ordinal_locations(base: str, rels: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """``COLONOG/<patient> (study folder 1 of 2, series folder 2 of 3, by name)`` per series
    folder: where it is without writing the folder names (they carry dates, descriptions)."""
    children: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for rel in rels:
        for k in range(1, len(rel)):
            children[rel[:k]].add(rel[k])
    out = {}
    for rel in rels:
        parts = []
        for k in range(1, len(rel)):
            sib = sorted(children[rel[:k]])
            kind = "series folder" if k == len(rel) - 1 else ("study folder" if k == 1 else "folder")
            parts.append(f"{kind} {sib.index(rel[k]) + 1} of {len(sib)}")
        out[rel] = f"{base}/{rel[0]}" + (f" ({', '.join(parts)}, by name)" if parts else "")
    return out


def _dicom_ignored(root: Path, src: str) -> list[dict]:
    """Entries of a DICOM source not read, grouped per patient folder (no study/series names)."""
    tree = scan_dicom_source(root, src)
    rows, per_patient = [], defaultdict(list)
    for ign in tree.ignored:
        rel = ign.path.relative_to(tree.folder).parts
        if len(rel) == 1:
            rows.append({"source": src, "path": f"{tree.folder.name}/{rel[0]}", "files": ign.files, "reason": ign.reason})
        else:
            per_patient[rel[0]].append(ign)
    for patient, items in sorted(per_patient.items()):
        why = sorted({i.reason.split(": ", 1)[-1] for i in items})
        rows.append({"source": src, "path": f"{tree.folder.name}/{patient}", "files": sum(i.files for i in items),
                     "reason": f"in {len(items)} of its folders: " + "; ".join(why)})
    return rows


def _discover_dicom(root: Path, src: str, found: Discovery) -> None:
    base = source_folder(root, src)
    if base is None:
        found.notes.append(f"{src}: no folder {folder_names(src)} under {root}: source skipped")
        return
    refs = dicom.discover_series(base)
    rels = [ref.folder.relative_to(base).parts for ref in refs]
    where = _ordinal_locations(base.name, rels)
    for ref, rel in zip(refs, rels, strict=True):
        s = ref.summary
        found.candidates.append(Candidate(
            source=src, patient=rel[0], source_key=s.get("SeriesInstanceUID") or _safe_key(rel),
            kind="dicom", files=[str(f) for f in ref.files], study_key=s.get("StudyInstanceUID", ""),
            position=_position(s) if src == "COLONOG" else "", modality=s.get("Modality", ""),
            n_files=len(ref.files), location=where[rel], _order=f"{s.get('StudyDate', '')}{s.get('StudyTime', '')}",
            _study_folder=rel[1] if len(rel) > 2 else "", _series_folder=rel[-1] if len(rel) > 1 else "",
            _error=s.get("_error", "")))
    found.ignored += _dicom_ignored(root, src)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _discover_nifti(root: Path, src: str, found: Discovery) -> None:
    listing = list_nifti_volumes(root, src)
    if listing.folder is None:
        found.notes.append(f"{src}: no folder {folder_names(src)} under {root}: source skipped")
        return
    for miss in listing.missing:
        found.notes.append(f"{src}: {_rel(miss, root)}/ is missing: its volumes cannot be curated")
    for f in listing.volumes:
        stem = strip_nifti_suffix(f)
        found.candidates.append(Candidate(source=src, patient=stem, source_key=stem, kind="nifti", files=[str(f)],
                                          n_files=1, location=_rel(f, root)))
    found.ignored += [{"source": i.source, "path": _rel(i.path, root), "files": i.files,
                       "reason": i.reason.replace(str(root) + "/", "")} for i in listing.ignored]


def discover_sources(sources_dir: str | Path, sources: Sequence[str] = SOURCES) -> Discovery:
    """Find every candidate series/volume of the given sources, and list what is not read.

    DICOM sources: each folder of DICOM files below ``<source>/<patient>/`` is a series (one
    header read per folder). NIfTI sources (:func:`lib.datasets.ctspine1k.source_layout.list_nifti_volumes`):
    the MSD task's ``imagesTr/`` and ``imagesTs/`` (folder ``Task03_Liver/`` as the archive
    unpacks, or ``MSD_T10/``), ``COVID19/**/*.nii*`` without the lesion masks. Hidden files
    (macOS ``._*``), masks, label folders and other files are listed in ``ignored``; an absent
    source or image folder is a note.

    Raises:
        FileNotFoundError: the sources folder does not exist (naming it).
        SourceLayoutError: ``Task03_Liver/`` and ``MSD_T10/`` both exist (naming both).
    """
    root = Path(sources_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: sources folder not found (run 00_sources, or set sources_dir)")
    found = Discovery([])
    for src in sources:
        if src in DICOM_SOURCES:
            _discover_dicom(root, src, found)
        else:
            _discover_nifti(root, src, found)
    return found


def discover_candidates(sources_dir: str | Path, sources: Sequence[str] = SOURCES) -> list[Candidate]:
    """The candidates of :func:`discover_sources` (what it ignored is in its ``ignored``)."""
    return discover_sources(sources_dir, sources).candidates


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
