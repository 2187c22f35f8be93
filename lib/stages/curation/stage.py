"""Stage 01_curation: raw sources -> the CTSpine1K release, de-identified, split, with Table 1.

Notebook ``notebooks/01_curation.ipynb``; parameters ``params/<profile>/01_curation.yaml``.
The steps, in the paper's order: discover (:mod:`.discover`), select (:mod:`.select`), convert,
measure and exclude (:mod:`.convert`), split and write the release (:mod:`.release`), Table 1,
exports (nnU-Net v2, VerSe-style centroids), and the PHI audit (:mod:`.phi`).
Nothing in this stage reads the synthetic oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lib.datasets.ctspine1k.release import has_masks
from lib.datasets.ctspine1k.split_file import read_split_file
from lib.datasets.ctspine1k.table1 import build_table1, table1_markdown
from lib.datasets.nnunet import export_nnunet
from lib.datasets.verse import export_verse_centroids
from lib.io.atomic import write_text
from lib.ml import nnunet
from lib.stages.context import StageContext
from lib.stages.curation.config import CurationConfig
from lib.stages.curation.convert import ConversionOutcome, convert_selected, quality_faults
from lib.stages.curation.discover import candidates_table, discover_sources
from lib.stages.curation.phi import AuditReport, collect_identifiers, require_no_phi
from lib.stages.curation.release import (
    SPLIT_MISSING_TABLE,
    SPLIT_PROBLEMS_TABLE,
    SUPERSEDED_TABLE,
    SplitResult,
    assign_splits,
    check_listed_ids,
    split_problems,
    write_release,
    write_stage_tables,
)
from lib.stages.curation.select import SelectionResult, select_series
from lib.viz.charts import plot_quality
from lib.viz.gallery import plot_release_previews

STAGE = "01_curation"


def start(namespace: dict) -> tuple[StageContext, CurationConfig]:
    """Validate the parameters, seed with ``P.seed``, and build the curation configuration."""
    ctx = StageContext.start(STAGE, namespace, seed=True)
    return ctx, CurationConfig.from_params(ctx.P, ctx.paths)


IGNORED_TABLE = "ignored_files.csv"


def find_candidates(cfg: CurationConfig) -> tuple[list, pd.DataFrame]:
    """Every candidate series / volume and the counts per source. What discovery did not read
    (macOS ``._*`` files, lesion masks, ``labelsTr/``, ...) is written, with the reason, to
    ``tables/ignored_files.csv`` and counted in the printout, with the discovery notes."""
    found = discover_sources(cfg.sources_dir, cfg.sources)
    ignored = found.ignored_table()
    write_text(cfg.tables_dir / IGNORED_TABLE, ignored.to_csv(index=False))
    for note in found.notes:
        print(note)
    if len(ignored):
        print(f"{len(ignored)} entries not read as source images (tables/{IGNORED_TABLE}):")
        for (src, why), n in ignored.groupby(["source", "reason"]).size().items():
            print(f"  {src}: {why} x{n}")
    return found.candidates, candidates_table(found.candidates)


def choose_series(cfg: CurationConfig, candidates: list) -> tuple[SelectionResult, dict | None, list[str]]:
    """One series per patient; with an official split file, its assignment (and the notes on what
    it spelled oddly), which also restricts the selection when ``restrict_to_split_file``.

    A split-file ID matching no case in the sources stops here, before any conversion
    (:class:`~lib.stages.curation.release.SplitFileError` naming the file, line, ID and the
    closest IDs found), unless ``split_unlisted`` allows it: then it is in
    ``selection.split_problems`` (``tables/split_problems.csv``) and in the notes.
    """
    split_ids, notes = read_split_file(cfg.split_file) if cfg.split_file else (None, [])
    listed = split_ids if cfg.restrict_to_split_file else None
    selection = select_series(candidates, cfg, listed_ids=listed)
    if split_ids is not None:
        selection.split_problems = check_listed_ids(cfg, split_ids, selection.discovered)
        notes = [*notes, *(f"SPLIT FILE: {p.message} ({p.action})" for p in selection.split_problems)]
    return selection, split_ids, notes


def convert_series(cfg: CurationConfig, selection: SelectionResult) -> ConversionOutcome:
    """Convert and measure the selected series, exclude by the criteria, try the fallbacks; prints
    what was done and every unexpected failure."""
    conversion = convert_selected(selection, cfg)
    print(conversion.summary())
    for failure in conversion.failures:
        print("FAILED", failure)
    return conversion


def save_quality_figure(ctx: StageContext, cfg: CurationConfig, conversion: ConversionOutcome) -> Path:
    """The measured criteria per converted series, thresholds drawn, failures marked."""
    recs = [r for r in conversion.records.values() if r.get("status") == "converted"]
    q = cfg.quality
    thresholds = {"max_noise_hu": q.max_noise_hu, "min_z_extent_mm": q.min_z_extent_mm,
                  "max_slice_spacing_mm": q.max_slice_spacing_mm, "max_border_fraction": q.max_border_fraction,
                  "min_slices": q.min_slices}
    fig = plot_quality(recs, [bool(quality_faults(r, q)) for r in recs], thresholds, cfg.sources)
    return ctx.save_figure(fig, "quality_criteria.png")


def assign_split(cfg: CurationConfig, conversion: ConversionOutcome, split_ids: dict | None) -> SplitResult:
    """Splits of the included cases (from the split file when given, else seeded and stratified).

    An included case the split file does not list is a
    :class:`~lib.stages.curation.release.SplitFileError` unless ``split_unlisted`` allows it
    (:func:`lib.stages.curation.release.assign_splits`)."""
    return assign_splits([c.release_id for c in conversion.included], cfg, split_ids)


def write_outputs(cfg: CurationConfig, selection: SelectionResult, conversion: ConversionOutcome, splits: SplitResult):
    """Place the release (images, ``data_split.txt``, sheets, readme) and write the stage tables."""
    placement = write_release(cfg, conversion, splits)
    return placement, write_stage_tables(cfg, selection, conversion, splits)


def write_table1(cfg: CurationConfig) -> tuple[pd.DataFrame, str]:
    """Table 1 of the release beside the paper's (``tables/table1.csv``) and its text rendering."""
    table1 = build_table1(cfg.release_dir, with_masks=has_masks(cfg.release_dir), patterns=cfg.id_patterns)
    write_text(cfg.tables_dir / "table1.csv", table1.to_csv(index=False))
    return table1, table1_markdown(table1)


def export(ctx: StageContext, cfg: CurationConfig) -> tuple[Path | None, list[Path]]:
    """The nnU-Net v2 raw dataset (when ``export_nnunet``; checked by nnU-Net itself when it is
    installed, :func:`verify_export`) and VerSe-style centroid files."""
    P = ctx.P
    nnunet_dir = export_nnunet(cfg.release_dir, cfg.stage_dir / "nnunet", P.nnunet_dataset_id, P.nnunet_name) \
        if P.export_nnunet else None
    if nnunet_dir is not None:
        verify_export(ctx, nnunet_dir)
    return nnunet_dir, export_verse_centroids(cfg.release_dir, cfg.stage_dir / "centroids")


def verify_export(ctx: StageContext, dataset: Path) -> dict:
    """nnU-Net v2's ``verify_dataset_integrity`` on the export, recorded as ``nnunet_integrity`` in
    the run record; when nnU-Net is not installed or the export holds no training case yet (the
    masks come from 03), the record says the check was not run and why.

    Raises:
        lib.ml.nnunet.NnunetIntegrityError: nnU-Net refused the export (its messages).
    """
    n = json.loads((dataset / "dataset.json").read_text())["numTraining"]
    reason = nnunet.missing_reason() or (None if n else "no training case with a mask yet (03 fills trainset/gt)")
    if reason:
        fact = {"dataset": str(dataset), "passed": None, "not_run": reason}
    else:
        fact = nnunet.verify_dataset(dataset, nnunet.NnunetFolders(dataset.parent), log=dataset.parent / "nnunet.log").to_json()
    ctx.facts["nnunet_integrity"] = fact
    print("nnU-Net v2 integrity check:", "passed" if fact["passed"] else f"not run: {fact.get('not_run')}")
    return fact


def save_previews(ctx: StageContext, cfg: CurationConfig) -> Path:
    """Mid-sagittal preview of the first case of each source."""
    return ctx.save_figure(plot_release_previews(cfg.release_dir, cfg.id_patterns), "release_previews.png", dpi=100)


def audit(ctx: StageContext, cfg: CurationConfig) -> tuple[list, AuditReport]:
    """Collect the sources' identifying values and search every output for them (raises on a leak)."""
    identifiers = collect_identifiers(cfg.sources_dir, cfg.sources, every_file=ctx.P.audit_every_file)
    return identifiers, require_no_phi([cfg.release_dir, cfg.stage_dir], identifiers)


def _superseded_record(cfg: CurationConfig) -> dict:
    """``tables/superseded.csv`` (every run's) for the run record."""
    path = cfg.tables_dir / SUPERSEDED_TABLE
    table = pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else pd.DataFrame()
    return {"count": len(table), "table": f"tables/{SUPERSEDED_TABLE}",
            "rows": table.to_dict(orient="records") if len(table) else []}


def split_record(cfg: CurationConfig, splits: SplitResult, selection: SelectionResult | None = None) -> dict:
    """The split-file problems for the run record: how many, the policy, the table, each problem."""
    problems = split_problems(selection, splits) if selection is not None else list(splits.problems)
    return {"count": len(problems), "split_unlisted": cfg.split_unlisted, "table": f"tables/{SPLIT_PROBLEMS_TABLE}",
            "excluded_from_splits": list(splits.excluded),
            "rows": [{k: v for k, v in p.row(cfg.rel).items() if k != "message"} for p in problems]}


def record(ctx: StageContext, cfg: CurationConfig, conversion: ConversionOutcome, splits: SplitResult,
           report: AuditReport, identifiers: list, selection: SelectionResult | None = None) -> Path:
    """The run record (counts, split, what was converted now, the selection errors, the IDs of
    the split file missing from the release, the split-file problems and the masks superseded
    by a new series), itself audited for identifiers. ``included`` counts the release's cases."""
    excluded = set(conversion.exclusions.query("action == 'excluded'")["release_id"]) | set(splits.excluded)
    errors = selection.errors if selection is not None else []
    path = ctx.write_record({
        "included": len(splits.assignment),
        "excluded_patients": len(excluded | {e["release_id"] for e in errors}),
        "selection_errors": [{k: e[k] for k in ("release_id", "source", "check", "message")} for e in errors],
        "split_counts": splits.counts(cfg.id_patterns).set_index("source")["all"].to_dict(),
        "split_ids_missing": {"count": len(splits.listed_missing), "table": f"tables/{SPLIT_MISSING_TABLE}",
                              "by_split": splits.missing_by_split()},
        "split_problems": split_record(cfg, splits, selection), "superseded": _superseded_record(cfg),
        "unknown_ids": splits.unknown_ids, "converted_now": conversion.converted, "reused": conversion.reused,
        "phi_audit": report.summary()})
    print(require_no_phi([path], identifiers).summary())
    return path
