"""Select one series per patient as the paper did (seeded COLONOG position, HNSCC time point,
the release's ``Path.csv`` rows, seeded MSD / COVID-19 subsets)."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lib.core.seeding import stable_rng
from lib.datasets.ctspine1k.ids import (
    DICOM_SOURCES,
    NIFTI_SOURCES,
    release_id_for,
)
from lib.io import (
    strip_nifti_suffix,
)
from lib.stages.curation.config import CurationConfig
from lib.stages.curation.discover import Candidate


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


def _group_by_patient(cands: Sequence[Candidate], notes: list[str]) -> dict[tuple[str, str], list[Candidate]]:
    """``{(source, patient): candidates}`` of the selectable series: unreadable first files are
    noted in ``notes`` and skipped, non-CT DICOM series skipped."""
    by_patient: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for c in cands:
        if c._error:
            notes.append(f"{c.source}/{c.patient}: series {c.source_key}: first file unreadable as DICOM; skipped")
            continue
        if c.kind == "dicom" and c.modality != "CT":
            continue
        by_patient[(c.source, c.patient)].append(c)
    return by_patient


def _select_colonog(patient: str, cs: list[Candidate], cfg: CurationConfig) -> Selection:
    """One COLONOG position by a seeded random choice (seed, patient); the others as fallbacks."""
    cs = sorted(cs, key=lambda c: (c.position, c.source_key))
    order = stable_rng(cfg.seed, "position", patient, nbytes=6).permutation(len(cs))
    ranked = [cs[i] for i in order]
    positions = sorted({c.position for c in cs})
    reason = f"seeded random choice among {len(cs)} series ({'/'.join(positions)})"
    return Selection(ranked[0], reason, ranked[1:] if cfg.fallback_series else [])


def _select_hnscc(patient: str, cs: list[Candidate], cfg: CurationConfig, notes: list[str]) -> Selection:
    """The HNSCC time point ``cfg.hnscc_time_point`` in study-date order (clamped, with a note);
    the other time points as fallbacks, nearest first; per time point the largest series."""
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
    return Selection(series[0], f"time point {idx} of {n} by study date",
                     series[1:] if cfg.fallback_series else [], str(idx))


def _select_patient(src: str, patient: str, cs: list[Candidate], cfg: CurationConfig,
                    table_rows: dict[str, tuple[str, str, str]], notes: list[str]) -> list[Selection]:
    """The selection(s) of one patient: its ``Path.csv`` row when it matches a series, else the
    source's rule (NIfTI sources: every volume, the subset comes later)."""
    if src in DICOM_SOURCES and patient in table_rows:
        hit = _match_path_row(table_rows[patient], cs)
        if hit is not None:
            return [Selection(hit, "Path.csv row", [], "")]
        notes.append(f"{src}/{patient}: the Path.csv row matches no series on disk; seeded choice used instead")
    if src == "COLONOG":
        return [_select_colonog(patient, cs, cfg)]
    if src == "HNSCC":
        return [_select_hnscc(patient, cs, cfg, notes)]
    return [Selection(c, "all volumes of the source", []) for c in sorted(cs, key=lambda c: c.source_key)]


def _apply_subsets(selections: list[Selection], cfg: CurationConfig, dropped: list[dict]) -> list[Selection]:
    """Keep a seeded subset of ``cfg.subset_sizes[source]`` volumes per NIfTI source (0 = all);
    the others go to ``dropped`` with the reason."""
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
    return selections


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
    by_patient = _group_by_patient(cands, notes)
    selections: list[Selection] = []
    for (src, patient), cs in sorted(by_patient.items()):
        rid = release_id_for(src, patient)
        if listed is not None and rid not in listed:
            dropped.append({"release_id": rid, "source": src, "reason": "not listed in the split file"})
            continue
        selections += _select_patient(src, patient, cs, cfg, table_rows, notes)
    selections = _apply_subsets(selections, cfg, dropped)
    return SelectionResult(selections, notes, dropped)
