"""Split the included cases, place them in the release layout, write the stage tables and sheets."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from lib.core.paths import SPLITS
from lib.datasets.ctspine1k.ids import (
    UNKNOWN,
    count_by_source_split,
    infer_source,
    unknown_ids,
)
from lib.datasets.ctspine1k.release import write_readme
from lib.datasets.ctspine1k.split_file import split_stratified, write_split_file
from lib.io import (
    atomic_path,
    move_atomic,
    strip_nifti_suffix,
    write_text,
)
from lib.stages.curation.config import METADATA_SHEETS, CurationConfig
from lib.stages.curation.convert import (
    EXCLUSION_COLUMNS,
    ConversionOutcome,
    IncludedSeries,
    read_manifest,
    release_file,
    write_manifest,
)
from lib.stages.curation.select import Selection, SelectionResult

SPLIT_MISSING_TABLE = "split_ids_missing.csv"
SPLIT_PROBLEMS_TABLE = "split_problems.csv"
SPLIT_PROBLEM_COLUMNS = ["id", "problem", "split_file", "line", "suggestion", "split", "action", "message"]
"""Columns of ``tables/split_problems.csv``: the ID, the problem (:data:`PROBLEM_NO_CASE`,
:data:`PROBLEM_NOT_LISTED`), the split file (relative to the profile's data folder), the line
that lists the ID (empty for an unlisted case), the closest IDs (``;``-separated), the split the
file lists it in (for an unlisted case: the split it got, empty when none), what was done."""
PROBLEM_NO_CASE = "listed, matches no case"
PROBLEM_NOT_LISTED = "included, not listed"
SPLIT_EXCLUDED_CHECK = "split_file_unlisted"
"""The ``check`` of an ``exclusions.csv`` row for a case kept out of every split (``split_unlisted``)."""


@dataclass(frozen=True)
class SplitProblem:
    """One split-file ID that matches no case, or one included case the file does not list."""

    id: str
    problem: str
    split_file: Path | None
    line: int | None
    suggestions: tuple[str, ...]
    split: str
    action: str
    message: str

    def row(self, rel=str) -> dict:
        """The ``split_problems.csv`` row (``rel`` writes the split file's path, in the message too)."""
        where = rel(self.split_file) if self.split_file else ""
        return {"id": self.id, "problem": self.problem, "split_file": where,
                "line": self.line if self.line is not None else "", "suggestion": ";".join(self.suggestions),
                "split": self.split, "action": self.action,
                "message": self.message.replace(str(self.split_file), where) if where else self.message}


class SplitFileError(ValueError):
    """The split file and the cases disagree (``split_unlisted: error``); every problem is named.

    Attributes:
        problems: the :class:`SplitProblem` s, in split-file order.
    """

    def __init__(self, problems: Sequence[SplitProblem], limit: int = 20):
        self.problems = list(problems)
        where = next((str(p.split_file) for p in self.problems if p.split_file), "the split file")
        lines = [f"{where}: {len(self.problems)} problem(s) between the split file and the cases:"]
        lines += ["  " + p.message for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        lines.append("Fix the split file (or the sources), or set split_unlisted: exclude (kept out of every split) "
                     f"or seeded (the seeded rule) to go on; each is then listed in tables/{SPLIT_PROBLEMS_TABLE}.")
        super().__init__("\n".join(lines))


def split_file_lines(path: str | Path | None) -> dict[str, int]:
    """``{release_id: line number}`` of a split file (first line listing each ID; names that ran
    together on one line share it), read as :func:`lib.datasets.ctspine1k.split_file.read_split_file`
    reads it; ``{}`` without a readable file."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError:
        return {}
    out: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.endswith(":"):
            continue
        names = [x + ".nii.gz" for x in line.split(".nii.gz") if x] if line.count(".nii.gz") > 1 else [line]
        for name in names:
            out.setdefault(strip_nifti_suffix(name), n)
    return out


def _close(rid: str, pool: Sequence[str]) -> tuple[str, ...]:
    return tuple(difflib.get_close_matches(rid, pool, n=3, cutoff=0.85))


def _quoted(ids: Sequence[str]) -> str:
    return " or ".join(repr(i) for i in ids)


def listed_id_problems(cfg: CurationConfig, file_assignment: Mapping[str, str], discovered: Collection[str],
                       split_file: Path | None = None) -> list[SplitProblem]:
    """The split file's IDs that match no case in the sources (a typo, or not downloaded), each
    with its line and the closest unlisted IDs found in the sources. IDs of a source not being
    curated (parameter ``sources``) are not problems (``split_ids_missing.csv`` says why)."""
    split_file = split_file or cfg.split_file
    lines = split_file_lines(split_file)
    found = set(discovered)
    pool = sorted(found - set(file_assignment))
    action = "error" if cfg.split_unlisted == "error" else "recorded: no such case, nothing to split"
    out = []
    for rid, split in sorted(file_assignment.items(), key=lambda kv: (lines.get(kv[0], 0), kv[0])):
        src = infer_source(rid, cfg.id_patterns)
        if rid in found or (src != UNKNOWN and src not in cfg.sources):
            continue
        close = _close(rid, pool)
        hint = f"; did you mean {_quoted(close)}?" if close else " (not in the sources: not downloaded, or misspelled)"
        line = lines.get(rid)
        where = f"{split_file}, line {line}" if line else f"{split_file or 'split file'}"
        out.append(SplitProblem(rid, PROBLEM_NO_CASE, split_file, line, close, split, action,
                                f"{where}: {split} ID {rid!r} matches no case{hint}"))
    return out


def check_listed_ids(cfg: CurationConfig, file_assignment: Mapping[str, str], discovered: Collection[str],
                     split_file: Path | None = None) -> list[SplitProblem]:
    """:func:`listed_id_problems`, raising :class:`SplitFileError` with ``split_unlisted: error``."""
    problems = listed_id_problems(cfg, file_assignment, discovered, split_file)
    if problems and cfg.split_unlisted == "error":
        raise SplitFileError(problems)
    return problems


@dataclass
class SplitResult:
    """Split assignment and what the split file did not cover.

    ``problems``: the included cases the split file does not list (:data:`PROBLEM_NOT_LISTED`;
    the IDs matching no case are found earlier, by :func:`check_listed_ids`); ``excluded``: the
    cases kept out of every split because of them.
    """

    assignment: dict[str, str]                 # release_id -> split
    origin: dict[str, str]                     # release_id -> "split file" | "seeded"
    unknown_ids: list[str]                     # IDs matching no source pattern (kept)
    listed_missing: list[str] = field(default_factory=list)  # in the split file, not available
    not_listed: list[str] = field(default_factory=list)      # available, not in the split file
    notes: list[str] = field(default_factory=list)
    listed_missing_split: dict[str, str] = field(default_factory=dict)  # listed_missing -> its split
    problems: list[SplitProblem] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)        # kept out of every split (split_unlisted)

    def missing_by_split(self) -> dict[str, list[str]]:
        """``{split: [IDs the split file lists that are not among the included cases]}``."""
        out: dict[str, list[str]] = {}
        for rid in self.listed_missing:
            out.setdefault(self.listed_missing_split.get(rid, ""), []).append(rid)
        return out

    def counts(self, patterns: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
        """Cases per source and split (rows: sources incl. ``unknown``, then ``total``)."""
        return count_by_source_split(self.assignment, patterns)


def _unlisted(not_listed: Sequence[str], file_assignment: Mapping[str, str], missing: Sequence[str],
              cfg: CurationConfig) -> tuple[dict[str, str], list[SplitProblem]]:
    """Splits (``split_unlisted: seeded``) and problems of the included cases the split file
    does not list. A case resembling an ID the file lists for a test split is never seeded (it
    might be that test case misspelled) and is kept out of every split instead."""
    lines = split_file_lines(cfg.split_file)
    where = str(cfg.split_file or "split file")
    close_of = {rid: _close(rid, missing) for rid in not_listed}
    test_like = {rid for rid, close in close_of.items() if any(file_assignment[c] != "trainset" for c in close)}
    seeded = split_stratified([r for r in not_listed if r not in test_like], cfg.seed, cfg.id_patterns) \
        if cfg.split_unlisted == "seeded" else {}
    problems = []
    for rid in not_listed:
        close = close_of[rid]
        named = [f"{file_assignment[c]} {c!r}" + (f" (line {lines[c]})" if c in lines else "") for c in close]
        hint = f"; did you mean {' or '.join(named)}?" if named else ""
        if cfg.split_unlisted == "error":
            action = "error"
        elif rid in seeded:
            action = f"seeded: {seeded[rid]}"
        elif cfg.split_unlisted == "seeded":
            action = "excluded from every split: resembles a test-split ID, never seeded"
        else:
            action = "excluded from every split"
        problems.append(SplitProblem(rid, PROBLEM_NOT_LISTED, cfg.split_file, None, close, seeded.get(rid, ""),
                                     action, f"{where}: included case {rid!r} is not listed{hint}"))
    return seeded, problems


def assign_splits(release_ids: Sequence[str], cfg: CurationConfig,
                  file_assignment: Mapping[str, str] | None = None) -> SplitResult:
    """Splits for the included cases: from the split file when given, else seeded and
    stratified by source.

    With a split file, an included case it does not list is a :class:`SplitFileError`
    (``cfg.split_unlisted == "error"``) or a problem in ``problems`` (written to
    ``split_problems.csv``), kept out of every split (``"exclude"``) or split by the seeded rule
    (``"seeded"``; never when it resembles an ID listed for a test split). A case the file lists
    keeps its split: nothing listed for a test split ever lands in ``trainset``.
    """
    ids = list(release_ids)
    unk = unknown_ids(ids, cfg.id_patterns)
    notes = [f"release ID {u!r} matches no source pattern: kept, counted as '{UNKNOWN}' "
             f"(add a pattern in extra_id_patterns)" for u in unk]
    if file_assignment is None:
        a = split_stratified(ids, cfg.seed, cfg.id_patterns)
        return SplitResult(a, {r: "seeded" for r in a}, unk, notes=notes)
    idset = set(ids)
    listed = {r: s for r, s in file_assignment.items() if r in idset}
    missing = sorted(set(file_assignment) - idset)
    not_listed = sorted(idset - set(file_assignment))
    seeded, problems = _unlisted(not_listed, file_assignment, missing, cfg)
    if problems and cfg.split_unlisted == "error":
        raise SplitFileError(problems)
    a = {**listed, **seeded}
    origin = {r: ("split file" if r in listed else "seeded") for r in a}
    excluded = [r for r in not_listed if r not in seeded]
    if seeded:
        notes.append(f"{len(seeded)} included case(s) not in the split file, split by the seeded rule "
                     f"(split_unlisted: seeded; tables/{SPLIT_PROBLEMS_TABLE}): "
                     + ", ".join(sorted(seeded)[:10]) + (" ..." if len(seeded) > 10 else ""))
    if excluded:
        notes.append(f"{len(excluded)} included case(s) not in the split file, kept out of every split "
                     f"(tables/{SPLIT_PROBLEMS_TABLE}): " + ", ".join(excluded[:10])
                     + (" ..." if len(excluded) > 10 else ""))
    if missing:
        notes.append(f"{len(missing)} ID(s) in the split file are not among the included cases (excluded or not "
                     f"downloaded): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
                     + f" (every one, with the reason, in tables/{SPLIT_MISSING_TABLE})")
    return SplitResult(a, origin, unk, missing, not_listed, notes, {r: file_assignment[r] for r in missing},
                       problems, excluded)


SUPERSEDED_TABLE = "superseded.csv"
SUPERSEDED_COLUMNS = ["release_id", "old_series", "new_series", "removed_mask", "reason"]
"""Columns of ``tables/superseded.csv`` (kept across runs): a release case whose image was
replaced by another series (or another image), its old and new series, where its old mask went
(``runs:01_curation/superseded/...``, :func:`lib.core.paths.resolve_profile_path`) and why."""


@dataclass
class PlacementReport:
    """What :func:`place_release` moved."""

    placed: int = 0
    moved_between_splits: list[str] = field(default_factory=list)
    already_in_place: int = 0
    stale: list[str] = field(default_factory=list)
    superseded: list[dict] = field(default_factory=list)  # rows of tables/superseded.csv written now


def _find_mask(cfg: CurationConfig, rid: str) -> Path | None:
    return next((m for s in SPLITS if (m := cfg.release_dir / s / "gt" / f"{rid}_seg.nii.gz").exists()), None)


def _grid(path: Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    """Shape and affine from a NIfTI header (None when it cannot be read)."""
    try:
        img = nib.load(str(path))
        return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=float)
    except Exception:  # an unreadable mask is judged by the annotation checks, not here
        return None


def _stale_mask_reason(c: IncludedSeries, placed: Mapping[str, str], mask: Path) -> str:
    """Why the mask in the release no longer belongs to the image about to replace the old one
    ("" when it still does): another source series, the same series giving another image
    (same converter), or a mask grid that differs from the new image's."""
    old_key = placed.get("source_key", "")
    if old_key and old_key != c.source_key:
        return f"another series chosen: {old_key} -> {c.source_key}"
    old_digest, new_digest = placed.get("digest", ""), c.record.get("digest", "")
    if old_digest and new_digest and old_digest != new_digest and placed.get("converter") == c.record.get("converter"):
        return "the same series converts to another image (source files changed)"
    m, g = _grid(mask), _grid(c.staged)
    if m is not None and g is not None and (m[0] != g[0] or not np.allclose(m[1], g[1], atol=1e-3)):
        return f"mask grid {m[0]} differs from the new image's {g[0]} (or its affine)"
    return ""


def _append_superseded(cfg: CurationConfig, row: dict) -> None:
    """Add a row to ``tables/superseded.csv`` (kept across runs; a row repeated by a resumed run
    is kept once)."""
    path = cfg.tables_dir / SUPERSEDED_TABLE
    old = pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else pd.DataFrame(columns=SUPERSEDED_COLUMNS)
    df = pd.concat([old, pd.DataFrame([row], columns=SUPERSEDED_COLUMNS)], ignore_index=True)
    df = df.drop_duplicates(subset=["release_id", "old_series", "new_series", "removed_mask"], keep="first")
    write_text(path, df.to_csv(index=False))


def _supersede(cfg: CurationConfig, c: IncludedSeries, placed: Mapping[str, str], rep: PlacementReport) -> None:
    """Move a case's mask out of the release when the image replacing the old one is another
    series or image (``<stage>/superseded/``, listed in ``tables/superseded.csv`` first, so a
    run killed in between lists it anyway)."""
    mask = _find_mask(cfg, c.release_id)
    if mask is None:
        return
    why = _stale_mask_reason(c, placed, mask)
    if not why:
        return
    old_key = placed.get("source_key", "")
    safe_key = re.sub(r"[^\w.-]", "_", old_key or "unknown")
    base = cfg.stage_dir / "superseded" / f"{c.release_id}__{safe_key}"
    dst, k = Path(f"{base}_seg.nii.gz"), 1
    while dst.exists():
        dst, k = Path(f"{base}.{k}_seg.nii.gz"), k + 1
    row = {"release_id": c.release_id, "old_series": old_key, "new_series": c.source_key,
           "removed_mask": cfg.rel(dst), "reason": why}
    _append_superseded(cfg, row)
    move_atomic(mask, dst)
    rep.superseded.append(row)


def _move_out_stale(cfg: CurationConfig, wanted: set[str], manifest: dict, rep: PlacementReport) -> None:
    """Release images no longer selected (and their masks) -> ``work/orphans/``."""
    for s in SPLITS:
        for f in sorted((cfg.release_dir / s / "data").glob("*.nii.gz")):
            rid = strip_nifti_suffix(f)
            if rid not in wanted:
                move_atomic(f, cfg.work_dir / "orphans" / f"{s}__{f.name}")
                mask = cfg.release_dir / s / "gt" / f"{rid}_seg.nii.gz"
                if mask.exists():
                    move_atomic(mask, cfg.work_dir / "orphans" / f"{s}__{mask.name}")
                manifest.pop(rid, None)
                write_manifest(cfg, manifest)
                rep.stale.append(rid)


def place_release(included: Sequence[IncludedSeries], assignment: Mapping[str, str], cfg: CurationConfig
                  ) -> PlacementReport:
    """Put every included image at ``<release>/<split>/data/<ID>.nii.gz`` and create ``gt/``.

    Staged conversions are moved in (rename, atomic); an image already in the release from an
    earlier run with the same source series stays, or moves to its new split with its mask
    (``gt/<ID>_seg.nii.gz``). A staged image replacing another series of the case (or another
    image, or on another grid) sends the case's old mask to ``<stage>/superseded/``, listed in
    ``tables/superseded.csv``: a mask never stays beside an image it was not drawn on. Release
    images no longer selected are moved out to ``work/orphans/`` (never deleted) and reported.
    A manifest of placed files (series, image digest) is rewritten after every move, so a
    killed run resumes correctly.
    """
    rep = PlacementReport()
    manifest = read_manifest(cfg)
    for s in SPLITS:
        (cfg.release_dir / s / "data").mkdir(parents=True, exist_ok=True)
        (cfg.release_dir / s / "gt").mkdir(parents=True, exist_ok=True)
    _move_out_stale(cfg, {c.release_id for c in included}, manifest, rep)
    for c in included:
        split = assignment[c.release_id]
        dst = cfg.release_dir / split / "data" / f"{c.release_id}.nii.gz"
        if c.staged.exists():
            _supersede(cfg, c, manifest.get(c.release_id) or {}, rep)
            move_atomic(c.staged, dst)
            for s in SPLITS:  # an older file of this ID elsewhere is superseded
                old = cfg.release_dir / s / "data" / f"{c.release_id}.nii.gz"
                if s != split and old.exists():
                    old.unlink()
            rep.placed += 1
        else:
            cur = release_file(cfg, c.release_id)
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
        manifest[c.release_id] = {"source_key": c.source_key, "split": split,
                                  "digest": c.record.get("digest", ""), "converter": c.record.get("converter", "")}
        write_manifest(cfg, manifest)
    return rep


def cases_table(included: Sequence[IncludedSeries], assignment: Mapping[str, str], cfg: CurationConfig) -> pd.DataFrame:
    """``tables/cases.csv``: release_id, split, source, spacing, shape, path (+ measures), one row
    per case in the release (a case kept out of every split has none). ``path`` is relative to
    the profile's data folder (:meth:`CurationConfig.rel`; read it back with
    :func:`lib.core.paths.resolve_profile_path`)."""
    rows = []
    for c in included:
        if c.release_id not in assignment:
            continue
        m = c.record["measures"]
        split = assignment[c.release_id]
        rows.append({"release_id": c.release_id, "split": split, "source": infer_source(c.release_id, cfg.id_patterns),
                     "spacing": "x".join(f"{s:g}" for s in m["spacing_mm"]), "shape": "x".join(str(n) for n in m["shape"]),
                     "path": cfg.rel(cfg.release_dir / split / "data" / f"{c.release_id}.nii.gz"),
                     "spacing_x_mm": m["spacing_mm"][0], "spacing_y_mm": m["spacing_mm"][1], "spacing_z_mm": m["spacing_mm"][2],
                     "n_slices": m["n_slices"], "z_extent_mm": m["z_extent_mm"], "noise_hu": m["noise_hu"],
                     "border_fraction": m["border_fraction"]})
    return pd.DataFrame(rows, columns=["release_id", "split", "source", "spacing", "shape", "path", "spacing_x_mm",
                                       "spacing_y_mm", "spacing_z_mm", "n_slices", "z_extent_mm", "noise_hu",
                                       "border_fraction"])


def _rule(c: IncludedSeries, chosen: Selection | None) -> str:
    """The selection rule of an included series (a fallback series says whose rule it replaced)."""
    if chosen is None:
        return ""
    if chosen.candidate.source_key == c.source_key:
        return chosen.rule
    return f"fallback series ({chosen.rule} series failed a check)"


def provenance_table(included: Sequence[IncludedSeries], split: SplitResult, sel: SelectionResult | None = None
                     ) -> pd.DataFrame:
    """``tables/provenance.csv``: release_id, split, source, source_key (SeriesInstanceUID for
    DICOM, file stem for NIfTI), the rule that chose the series (with ``sel``; see
    :data:`lib.stages.curation.select.RULES`) and why. No identifying values."""
    by_rid = {s.release_id: s for s in sel.selections} if sel is not None else {}
    rows = [{"release_id": c.release_id, "split": split.assignment[c.release_id], "source": c.source,
             "source_key": c.source_key, "patient_id": c.patient, "position": c.position, "time_point": c.time_point,
             "rule": _rule(c, by_rid.get(c.release_id)), "selection": c.selection,
             "split_origin": split.origin[c.release_id]} for c in included if c.release_id in split.assignment]
    return pd.DataFrame(rows, columns=["release_id", "split", "source", "source_key", "patient_id", "position",
                                       "time_point", "rule", "selection", "split_origin"])


def _missing_reasons(sel: SelectionResult, conv: ConversionOutcome) -> dict[str, str]:
    """Why a release ID is not among the included cases, for the IDs curation saw."""
    why = {d["release_id"]: f"not selected: {d['reason']}" for d in sel.dropped}
    exc = pd.concat([sel.errors_table(), conv.exclusions]) if len(sel.errors) else conv.exclusions
    for rid, rows in exc[exc["action"] == "excluded"].groupby("release_id"):
        why[rid] = "excluded: " + ", ".join(dict.fromkeys(rows["check"].astype(str)))
    return why


def split_missing_table(split: SplitResult, sel: SelectionResult, conv: ConversionOutcome,
                        cfg: CurationConfig | None = None) -> pd.DataFrame:
    """``tables/split_ids_missing.csv``: every ID the split file lists that is not among the
    included cases, with its split and why (excluded by a check or a selection error, not
    selected, its source not curated (with ``cfg``), or not found in the sources at all: then
    also in ``split_problems.csv``)."""
    why = _missing_reasons(sel, conv)
    rows = []
    for rid in split.listed_missing:
        src = infer_source(rid, cfg.id_patterns) if cfg is not None else UNKNOWN
        reason = why.get(rid) or ("found in the sources but not included" if rid in sel.discovered
                                  else f"its source {src} is not curated (parameter sources)"
                                  if cfg is not None and src != UNKNOWN and src not in cfg.sources
                                  else "not found in the sources (not downloaded, or spelled differently)")
        rows.append({"release_id": rid, "split": split.listed_missing_split.get(rid, ""), "reason": reason})
    return pd.DataFrame(rows, columns=["release_id", "split", "reason"])


def write_metadata_sheets(included: Sequence[IncludedSeries], assignment: Mapping[str, str], release_dir: Path
                          ) -> list[Path]:
    """``metadata_colonog.xlsx`` and ``metadata_neck.xlsx``: one row per release case with the
    non-identifying tags (:data:`METADATA_TAGS`, age band, contrast, patient position) plus
    spacing and size. With de-identification off, the records carry identifying tags and they
    end up here (and the PHI audit fails)."""
    written = []
    for src, fname in METADATA_SHEETS.items():
        rows = []
        for c in included:
            if c.source != src or c.release_id not in assignment:
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


def split_problems(sel: SelectionResult, split: SplitResult) -> list[SplitProblem]:
    """Every split-file problem of the run: IDs matching no case (found at selection,
    ``sel.split_problems``), then included cases the file does not list (``split.problems``)."""
    return [*getattr(sel, "split_problems", []), *split.problems]


def split_problems_table(cfg: CurationConfig, problems: Sequence[SplitProblem]) -> pd.DataFrame:
    """``tables/split_problems.csv`` (:data:`SPLIT_PROBLEM_COLUMNS`)."""
    return pd.DataFrame([p.row(cfg.rel) for p in problems], columns=SPLIT_PROBLEM_COLUMNS)


def _split_exclusions(conv: ConversionOutcome, split: SplitResult) -> pd.DataFrame:
    """``exclusions.csv`` rows of the cases kept out of every split (``split_unlisted``)."""
    out = set(split.excluded)
    why = {p.id: p.message for p in split.problems}
    rows = [{"release_id": c.release_id, "source": c.source, "source_key": c.source_key, "check": SPLIT_EXCLUDED_CHECK,
             "measured": "", "threshold": "", "message": f"{why.get(c.release_id, 'not in the split file')}; kept out "
                                                         f"of every split (split_unlisted)", "action": "excluded"}
            for c in conv.included if c.release_id in out]
    return pd.DataFrame(rows, columns=EXCLUSION_COLUMNS)


def write_stage_tables(cfg: CurationConfig, sel: SelectionResult, conv: ConversionOutcome, split: SplitResult
                       ) -> dict[str, Path]:
    """Write ``tables/`` CSVs: cases, provenance, exclusions (the selection errors first, then the
    conversion's, then the cases kept out of every split), selection, not_selected,
    split_counts, split_ids_missing, split_problems, unknown_ids, conversion_times. Returns
    ``{name: path}`` (with ``superseded`` when that table exists: :func:`place_release` keeps it)."""
    t = cfg.tables_dir
    parts = [sel.errors_table()] if sel.errors else []
    parts += [conv.exclusions] + ([_split_exclusions(conv, split)] if split.excluded else [])
    exclusions = pd.concat(parts, ignore_index=True) if len(parts) > 1 else conv.exclusions
    out = {
        "cases": cases_table(conv.included, split.assignment, cfg),
        "provenance": provenance_table(conv.included, split, sel),
        "exclusions": exclusions,
        "selection": sel.table(),
        "not_selected": pd.DataFrame(sel.dropped, columns=["release_id", "source", "path", "reason"]),
        "split_counts": split.counts(cfg.id_patterns),
        SPLIT_MISSING_TABLE[: -len(".csv")]: split_missing_table(split, sel, conv, cfg),
        SPLIT_PROBLEMS_TABLE[: -len(".csv")]: split_problems_table(cfg, split_problems(sel, split)),
        "unknown_ids": pd.DataFrame({"release_id": split.unknown_ids}),
        "conversion_times": conv.times_table(),
    }
    paths = {}
    for name, df in out.items():
        paths[name] = write_text(t / f"{name}.csv", df.to_csv(index=False))
    if (t / SUPERSEDED_TABLE).exists():
        paths[SUPERSEDED_TABLE[: -len(".csv")]] = t / SUPERSEDED_TABLE
    return paths


def write_release(cfg: CurationConfig, conv: ConversionOutcome, split: SplitResult) -> PlacementReport:
    """Place the images, write ``data_split.txt``, the metadata sheets and ``readme.txt`` (the
    cases of ``split.assignment``: one kept out of every split is not placed)."""
    rep = place_release([c for c in conv.included if c.release_id in split.assignment], split.assignment, cfg)
    write_split_file(cfg.release_dir / "data_split.txt", split.assignment)
    write_metadata_sheets(conv.included, split.assignment, cfg.release_dir)
    write_readme(cfg.release_dir, split.assignment, cfg.id_patterns)
    return rep
