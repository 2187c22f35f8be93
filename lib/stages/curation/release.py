"""Split the included cases, place them in the release layout, write the stage tables and sheets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    ConversionOutcome,
    IncludedSeries,
    read_manifest,
    release_file,
    write_manifest,
)
from lib.stages.curation.select import Selection, SelectionResult

SPLIT_MISSING_TABLE = "split_ids_missing.csv"


@dataclass
class SplitResult:
    """Split assignment and what the split file did not cover."""

    assignment: dict[str, str]                 # release_id -> split
    origin: dict[str, str]                     # release_id -> "split file" | "seeded"
    unknown_ids: list[str]                     # IDs matching no source pattern (kept)
    listed_missing: list[str] = field(default_factory=list)  # in the split file, not available
    not_listed: list[str] = field(default_factory=list)      # available, not in the split file
    notes: list[str] = field(default_factory=list)
    listed_missing_split: dict[str, str] = field(default_factory=dict)  # listed_missing -> its split

    def missing_by_split(self) -> dict[str, list[str]]:
        """``{split: [IDs the split file lists that are not among the included cases]}``."""
        out: dict[str, list[str]] = {}
        for rid in self.listed_missing:
            out.setdefault(self.listed_missing_split.get(rid, ""), []).append(rid)
        return out

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
                     f"downloaded): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
                     + f" (every one, with the reason, in tables/{SPLIT_MISSING_TABLE})")
    return SplitResult(a, origin, unk, missing, not_listed, notes, {r: file_assignment[r] for r in missing})


@dataclass
class PlacementReport:
    """What :func:`place_release` moved."""

    placed: int = 0
    moved_between_splits: list[str] = field(default_factory=list)
    already_in_place: int = 0
    stale: list[str] = field(default_factory=list)


def place_release(included: Sequence[IncludedSeries], assignment: Mapping[str, str], cfg: CurationConfig
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
                write_manifest(cfg, manifest)
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
        manifest[c.release_id] = {"source_key": c.source_key, "split": split}
        write_manifest(cfg, manifest)
    return rep


def cases_table(included: Sequence[IncludedSeries], assignment: Mapping[str, str], cfg: CurationConfig) -> pd.DataFrame:
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
             "split_origin": split.origin[c.release_id]} for c in included]
    return pd.DataFrame(rows, columns=["release_id", "split", "source", "source_key", "patient_id", "position",
                                       "time_point", "rule", "selection", "split_origin"])


def _missing_reasons(sel: SelectionResult, conv: ConversionOutcome) -> dict[str, str]:
    """Why a release ID is not among the included cases, for the IDs curation saw."""
    why = {d["release_id"]: f"not selected: {d['reason']}" for d in sel.dropped}
    exc = pd.concat([sel.errors_table(), conv.exclusions]) if len(sel.errors) else conv.exclusions
    for rid, rows in exc[exc["action"] == "excluded"].groupby("release_id"):
        why[rid] = "excluded: " + ", ".join(dict.fromkeys(rows["check"].astype(str)))
    return why


def split_missing_table(split: SplitResult, sel: SelectionResult, conv: ConversionOutcome) -> pd.DataFrame:
    """``tables/split_ids_missing.csv``: every ID the split file lists that is not among the
    included cases, with its split and why (excluded by a check or a selection error, not
    selected, or not found in the sources at all)."""
    why = _missing_reasons(sel, conv)
    rows = []
    for rid in split.listed_missing:
        reason = why.get(rid) or ("found in the sources but not included" if rid in sel.discovered
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


def write_stage_tables(cfg: CurationConfig, sel: SelectionResult, conv: ConversionOutcome, split: SplitResult
                       ) -> dict[str, Path]:
    """Write ``tables/`` CSVs: cases, provenance, exclusions (the selection errors first, then the
    conversion's), selection, not_selected, split_counts, split_ids_missing, unknown_ids,
    conversion_times. Returns ``{name: path}``."""
    t = cfg.tables_dir
    exclusions = pd.concat([sel.errors_table(), conv.exclusions], ignore_index=True) if sel.errors else conv.exclusions
    out = {
        "cases": cases_table(conv.included, split.assignment, cfg),
        "provenance": provenance_table(conv.included, split, sel),
        "exclusions": exclusions,
        "selection": sel.table(),
        "not_selected": pd.DataFrame(sel.dropped, columns=["release_id", "source", "path", "reason"]),
        "split_counts": split.counts(cfg.id_patterns),
        SPLIT_MISSING_TABLE[: -len(".csv")]: split_missing_table(split, sel, conv),
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
