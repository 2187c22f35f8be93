"""Select one series per patient as the paper did (seeded COLONOG position, HNSCC time point,
the release's ``Path.csv`` rows, seeded MSD / COVID-19 subsets).

Every selection names the rule that chose it (:data:`RULES`). A ``Path.csv`` row that matches no
series on disk is an error: the patient is excluded (its masks in the release belong to the
row's series, so no other series may stand in) unless ``path_csv_fallback`` lets the source's
rule choose, and the rule then says so.
"""

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

RULE_PATH_CSV = "Path.csv row"
RULE_POSITION = "seeded position"
RULE_TIME_POINT = "time point"
RULE_ALL = "all volumes"
RULE_SUBSET = "seeded subset"
UNMATCHED = "Path.csv row unmatched"
RULE_POSITION_UNMATCHED = f"seeded choice: {UNMATCHED}"
RULE_TIME_POINT_UNMATCHED = f"{RULE_TIME_POINT}: {UNMATCHED}"
RULES = (RULE_PATH_CSV, RULE_POSITION, RULE_TIME_POINT, RULE_ALL, RULE_SUBSET, RULE_POSITION_UNMATCHED,
         RULE_TIME_POINT_UNMATCHED)
"""Which rule chose a series (the ``rule`` column of ``selection.csv`` and ``provenance.csv``):
the patient's ``Path.csv`` row; the seeded COLONOG position; the HNSCC time point; every volume of a
NIfTI source; the seeded NIfTI subset; and, with ``path_csv_fallback``, the source's rule standing
in for an unmatched ``Path.csv`` row."""

ERROR_COLUMNS = ["release_id", "source", "source_key", "check", "measured", "threshold", "message", "action"]
"""Columns of a selection error (those of ``exclusions.csv``, where the errors are written)."""


@dataclass
class Selection:
    """The series chosen for one patient, with its ordered fallbacks, the rule and why."""

    candidate: Candidate
    reason: str
    fallbacks: list[Candidate] = field(default_factory=list)
    time_point: str = ""
    rule: str = ""

    @property
    def release_id(self) -> str:
        return self.candidate.release_id


@dataclass(frozen=True)
class PathRow:
    """One row of ``Path.csv``: its line number and the ``patient/study/series`` it names."""

    line: int
    patient: str
    study: str
    series: str


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def read_path_table(path: str | Path) -> list[PathRow]:
    """Read a ``Path.csv`` as released: one ``patient/study/series`` per row (folder names or
    UIDs), no header; a header row or extra columns are tolerated (the first cell holding two
    ``/`` is used).

    Raises:
        FileNotFoundError / ValueError: naming the file and the bad row.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: Path.csv not found")
    rows: list[PathRow] = []
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
        rows.append(PathRow(n, parts[0].strip(), parts[1], "/".join(parts[2:])))
    return rows


def _in_study(text: str, c: Candidate, exact: bool) -> bool:
    if exact:
        return text in (c._study_folder, c.study_key)
    return _norm(text) in (_norm(c._study_folder), _norm(c.study_key))


def _in_series(text: str, c: Candidate, exact: bool) -> bool:
    if exact:
        return text in (c._series_folder, c.source_key)
    return _norm(text) in (_norm(c._series_folder), _norm(c.source_key))


def _match_path_row(row: PathRow, cands: Sequence[Candidate]) -> Candidate | None:
    """The patient's series the row names: exact folder names (or UIDs), then ignoring case and
    runs of white space (downloaders differ there); None when none matches."""
    for exact in (True, False):
        for c in cands:
            if c.patient == row.patient and _in_study(row.study, c, exact) and _in_series(row.series, c, exact):
                return c
    return None


def _unmatched_reason(row: PathRow, cs: Sequence[Candidate], path_csv: Path) -> str:
    """Why a ``Path.csv`` row matches none of the patient's series, with the series on disk.

    The folder names are not quoted (they carry dates and descriptions and 01's outputs are
    audited for them): the series are named by location (folder ordinals), UID, position and
    file count, so the line can be compared with the patient folder by hand.
    """
    study = any(_in_study(row.study, c, False) for c in cs)
    series = any(_in_series(row.series, c, False) for c in cs)
    what = {(False, False): "neither its study folder nor its series folder is on disk",
            (True, False): "its study folder is on disk, its series folder is not in it",
            (False, True): "its series folder is on disk, but in a study folder spelled differently",
            (True, True): "its study and series folders are on disk, but not one inside the other"}[(study, series)]
    disk = "; ".join(f"{c.location}: series {c.source_key}, {c.position or c.modality}, {c.n_files} files"
                     for c in sorted(cs, key=lambda c: c.location))
    return (f"{path_csv}, line {row.line}: the row matches none of the patient's {len(cs)} CT series on disk "
            f"({what}); on disk: {disk}")


@dataclass
class SelectionResult:
    """Selections (one per patient), notes, what was not selected, and the selection errors.

    Attributes:
        selections: one per selected patient.
        notes: what could not be followed as asked (printed by the notebook).
        dropped: patients/volumes not selected by rule (subset, split-file restriction, no
            readable CT series), each with ``release_id``, ``source``, ``path``, ``reason``.
        errors: patients excluded at selection (an unmatched ``Path.csv`` row), in the
            columns of ``exclusions.csv`` (:data:`ERROR_COLUMNS`).
        discovered: release IDs of every patient/volume discovery found.
        split_problems: the split file's IDs that match no discovered case
            (:class:`lib.stages.curation.release.SplitProblem`, set by
            :func:`lib.stages.curation.stage.choose_series`).
    """

    selections: list[Selection]
    notes: list[str]
    dropped: list[dict]
    errors: list[dict] = field(default_factory=list)
    discovered: set[str] = field(default_factory=set)
    split_problems: list = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One row per selected patient (no identifying values; DICOM series by UID and location)."""
        cols = ["release_id", "source", "source_key", "location", "position", "time_point", "fallbacks", "rule",
                "reason"]
        rows = [{"release_id": s.release_id, "source": s.candidate.source, "source_key": s.candidate.source_key,
                 "location": s.candidate.location, "position": s.candidate.position, "time_point": s.time_point,
                 "fallbacks": len(s.fallbacks), "rule": s.rule, "reason": s.reason} for s in self.selections]
        return pd.DataFrame(rows, columns=cols)

    def errors_table(self) -> pd.DataFrame:
        """The selection errors (:data:`ERROR_COLUMNS`)."""
        return pd.DataFrame(self.errors, columns=ERROR_COLUMNS)


def _patient_location(cs: Sequence[Candidate]) -> str:
    """The patient folder (DICOM) or the file (NIfTI) of a patient's candidates."""
    return cs[0].location if cs[0].kind == "nifti" else cs[0].location.split(" (", 1)[0]


def _group_by_patient(cands: Sequence[Candidate], notes: list[str], dropped: list[dict]
                      ) -> dict[tuple[str, str], list[Candidate]]:
    """``{(source, patient): candidates}`` of the selectable series: unreadable first files are
    noted in ``notes`` and skipped, non-CT DICOM series skipped; a patient left without a
    series goes to ``dropped`` with the reason."""
    by_patient: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    every: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for c in cands:
        every[(c.source, c.patient)].append(c)
        if c._error:
            notes.append(f"{c.location}: series {c.source_key}: first file unreadable as DICOM; skipped")
            continue
        if c.kind == "dicom" and c.modality != "CT":
            continue
        by_patient[(c.source, c.patient)].append(c)
    for (src, patient), cs in sorted(every.items()):
        if (src, patient) not in by_patient:
            kinds = ", ".join(sorted({"unreadable" if c._error else (c.modality or "no modality") for c in cs}))
            dropped.append({"release_id": release_id_for(src, patient), "source": src,
                            "path": _patient_location(cs), "reason": f"no readable CT series ({len(cs)} series: {kinds})"})
    return by_patient


def _time_points(cs: Sequence[Candidate]) -> list[list[Candidate]]:
    """The patient's studies (time points) in study-date order (then folder, study UID)."""
    studies: dict[str, list[Candidate]] = defaultdict(list)
    for c in cs:
        studies[c.study_key].append(c)
    return sorted(studies.values(), key=lambda g: (g[0]._order, g[0]._study_folder, g[0].study_key))


def _select_colonog(patient: str, cs: list[Candidate], cfg: CurationConfig) -> Selection:
    """One COLONOG position by a seeded random choice (seed, patient); the others as fallbacks."""
    cs = sorted(cs, key=lambda c: (c.position, c.source_key))
    order = stable_rng(cfg.seed, "position", patient, nbytes=6).permutation(len(cs))
    ranked = [cs[i] for i in order]
    positions = sorted({c.position for c in cs})
    reason = f"seeded random choice among {len(cs)} series ({'/'.join(positions)})"
    return Selection(ranked[0], reason, ranked[1:] if cfg.fallback_series else [], "", RULE_POSITION)


def _select_hnscc(patient: str, cs: list[Candidate], cfg: CurationConfig, notes: list[str]) -> Selection:
    """The HNSCC time point ``cfg.hnscc_time_point`` in study-date order (clamped, with a note);
    the other time points as fallbacks, nearest first; per time point the largest series."""
    ordered = _time_points(cs)
    n = len(ordered)
    want = cfg.hnscc_time_point if cfg.hnscc_time_point >= 0 else n + cfg.hnscc_time_point
    idx = min(max(want, 0), n - 1)
    if idx != want:
        notes.append(f"HNSCC/{patient}: time point {cfg.hnscc_time_point} not available ({n} time points); used {idx}")
    rank = sorted(range(n), key=lambda i: (abs(i - idx), i))
    series = [max(ordered[i], key=lambda c: (c.n_files, c.source_key)) for i in rank]
    return Selection(series[0], f"time point {idx} of {n} by study date",
                     series[1:] if cfg.fallback_series else [], str(idx), RULE_TIME_POINT)


def _by_rule(src: str, patient: str, cs: list[Candidate], cfg: CurationConfig, notes: list[str]) -> list[Selection]:
    """The source's own rule (NIfTI sources: every volume, the subset comes later)."""
    if src == "COLONOG":
        return [_select_colonog(patient, cs, cfg)]
    if src == "HNSCC":
        return [_select_hnscc(patient, cs, cfg, notes)]
    return [Selection(c, "all volumes of the source", [], "", RULE_ALL) for c in sorted(cs, key=lambda c: c.source_key)]


def _path_csv_selection(src: str, hit: Candidate, cs: Sequence[Candidate]) -> Selection:
    """The series a ``Path.csv`` row names (no fallback); HNSCC with its time point by study date."""
    if src != "HNSCC":
        return Selection(hit, RULE_PATH_CSV, [], "", RULE_PATH_CSV)
    ordered = _time_points(cs)
    idx = next(i for i, g in enumerate(ordered) if any(c is hit for c in g))
    return Selection(hit, f"{RULE_PATH_CSV} (time point {idx} of {len(ordered)} by study date)", [], str(idx),
                     RULE_PATH_CSV)


def _unmatched(src: str, patient: str, cs: list[Candidate], cfg: CurationConfig, row: PathRow,
               result: SelectionResult) -> list[Selection]:
    """An unmatched ``Path.csv`` row: an error excluding the patient, or (``path_csv_fallback``)
    the source's rule, labelled so."""
    why = _unmatched_reason(row, cs, cfg.path_csv)
    if not cfg.path_csv_fallback:
        result.errors.append({"release_id": release_id_for(src, patient), "source": src, "source_key": "",
                              "check": "path_csv_unmatched", "measured": "", "threshold": "",
                              "message": f"{why}; patient excluded: Path.csv is authoritative (the released mask "
                                         f"belongs to the row's series; path_csv_fallback: false)",
                              "action": "excluded"})
        result.notes.append(f"ERROR {src}/{patient}: {why}; patient excluded (path_csv_fallback: false)")
        return []
    result.notes.append(f"{src}/{patient}: {why}; path_csv_fallback: the source's rule chose instead")
    chosen = _by_rule(src, patient, cs, cfg, result.notes)
    for s in chosen:
        s.rule = RULE_POSITION_UNMATCHED if src == "COLONOG" else RULE_TIME_POINT_UNMATCHED
        s.reason = f"{UNMATCHED} (line {row.line}); {s.reason}"
    return chosen


def _select_patient(src: str, patient: str, cs: list[Candidate], cfg: CurationConfig,
                    table_rows: dict[str, PathRow], result: SelectionResult) -> list[Selection]:
    """The selection(s) of one patient: its ``Path.csv`` row when it has one, else the source's rule."""
    row = table_rows.get(patient) if src in DICOM_SOURCES else None
    if row is None:
        return _by_rule(src, patient, cs, cfg, result.notes)
    hit = _match_path_row(row, cs)
    if hit is not None:
        return [_path_csv_selection(src, hit, cs)]
    return _unmatched(src, patient, cs, cfg, row, result)


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
                    s.rule = RULE_SUBSET
                else:
                    dropped.append({"release_id": s.release_id, "source": src, "path": s.candidate.location,
                                    "reason": f"not in the seeded subset of {k}"})
            drop_ids = {group[i].release_id for i in range(len(group)) if i not in keep_idx}
            selections = [s for s in selections if not (s.candidate.source == src and s.release_id in drop_ids)]
    return selections


def _path_rows(cfg: CurationConfig, notes: list[str]) -> dict[str, PathRow]:
    """``{patient: row}`` of ``cfg.path_csv`` (none without one); a patient's second row is noted
    and not used."""
    rows: dict[str, PathRow] = {}
    for row in read_path_table(cfg.path_csv) if cfg.path_csv is not None else []:
        if row.patient in rows:
            notes.append(f"{cfg.path_csv}, line {row.line}: a second row for patient {row.patient} "
                         f"(first on line {rows[row.patient].line}); the first is used")
            continue
        rows[row.patient] = row
    return rows


def select_series(cands: Sequence[Candidate], cfg: CurationConfig,
                  listed_ids: Iterable[str] | None = None) -> SelectionResult:
    """Choose one series per patient as the paper did.

    * COLONOG: one position per patient by a seeded random choice (seed, patient); the other
      position is the fallback when ``cfg.fallback_series``.
    * HNSCC: the time point ``cfg.hnscc_time_point`` in study-date order (0 = first,
      -1 = last); the other time points are fallbacks, nearest first.
    * A ``Path.csv`` row for a patient fixes its series (no fallback: the table is the truth).
      A row matching no series on disk excludes the patient (an error in ``errors``, with the
      line and the patient's series on disk), unless ``cfg.path_csv_fallback`` lets the
      source's rule choose (rule ``seeded choice: Path.csv row unmatched`` /
      ``time point: Path.csv row unmatched``). Rows of patients not in the sources are noted.
    * MSD T10 / COVID-19: a seeded subset of ``cfg.subset_sizes[source]`` volumes (0 = all).
    * ``listed_ids``: when given (``restrict_to_split_file``), only these release IDs are kept.

    Non-CT series and series whose first file could not be read are never selected; a patient
    left without any is listed in ``dropped``.
    """
    result = SelectionResult([], [], [], discovered={c.release_id for c in cands})
    table_rows = _path_rows(cfg, result.notes)
    listed = {strip_nifti_suffix(i) for i in listed_ids} if listed_ids is not None else None
    by_patient = _group_by_patient(cands, result.notes, result.dropped)
    for (src, patient), cs in sorted(by_patient.items()):
        rid = release_id_for(src, patient)
        if listed is not None and rid not in listed:
            result.dropped.append({"release_id": rid, "source": src, "path": _patient_location(cs),
                                   "reason": "not listed in the split file"})
            continue
        result.selections += _select_patient(src, patient, cs, cfg, table_rows, result)
    on_disk = {p for (src, p) in by_patient if src in DICOM_SOURCES}
    for patient, row in sorted(table_rows.items()):
        if patient not in on_disk:
            result.notes.append(f"{cfg.path_csv}, line {row.line}: patient {patient} has no CT series in the "
                                f"sources: nothing to select")
    result.selections = _apply_subsets(result.selections, cfg, result.dropped)
    return result
