"""Stage 00_sources: the four CTSpine1K sources and VerSe, generated (synthetic) or verified (paper).

Notebook ``notebooks/00_sources.ipynb``; parameters ``params/<profile>/00_sources.yaml``.
Generation: :mod:`lib.synthetic.generate`; checks of real downloads: :mod:`lib.datasets.downloads`.
This module holds what the notebook shows: what was generated beside the paper's Table 1, one
figure per source, variant and low-quality kind, and the generation times.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lib.datasets.downloads import VerifyReport, verify_sources
from lib.datasets.paper_facts import PAPER_TABLE1
from lib.io.dicom_read import read_source_volume
from lib.stages.context import StageContext, print_environment  # noqa: F401  (notebook API)
from lib.synthetic import oracle
from lib.synthetic.generate import GenerationReport, generate_sources
from lib.synthetic.phantom import CaseSpec, build_anatomy, generate_case
from lib.synthetic.source_plan import RAW_SOURCES
from lib.viz.ortho import plot_ortho
from lib.viz.style import save_figure

STAGE = "00_sources"


def start(namespace: dict) -> StageContext:
    """Validate the notebook's parameters and create the stage folders."""
    return StageContext.start(STAGE, namespace)


def sources_root(ctx: StageContext) -> Path:
    """Where the sources are: ``sources_dir`` (paper downloads), else ``data/<profile>/sources``."""
    return Path(ctx.P.sources_dir) if ctx.P.sources_dir else ctx.paths.sources


def generate(ctx: StageContext) -> GenerationReport:
    """Generate every synthetic source and the oracle (re-runs skip finished volumes)."""
    return generate_sources(ctx.paths, ctx.P.as_dict(), workers=ctx.P.workers, force=ctx.P.force)


VERIFY_TABLES = {"counts": "source_check.csv", "problems": "source_problems.csv", "ignored": "source_ignored.csv"}
"""The tables the check of the downloads writes: counts per source, one row per problem
(source, path, problem), one row per entry not read as a source image (source, path, files, reason)."""


def verify(ctx: StageContext) -> VerifyReport:
    """Check the downloads against the expected layout and counts (paper profile); writes
    :data:`VERIFY_TABLES` to ``tables/`` (problems and ignored entries, each with its path)."""
    P = ctx.P
    expected = {"COLONOG": P.expected_colonog, "HNSCC": P.expected_hnscc, "MSD_T10": P.expected_msd,
                "COVID19": P.expected_covid, "VerSe": P.expected_verse}
    report = verify_sources(sources_root(ctx), expected, check_headers=P.check_headers)
    ctx.save_table(report.table, VERIFY_TABLES["counts"])
    ctx.save_table(report.problems_table(), VERIFY_TABLES["problems"])
    ctx.save_table(report.ignored_table(), VERIFY_TABLES["ignored"])
    return report


def write_summary(ctx: StageContext) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What was generated beside the paper's Table 1 (``tables/sources_summary.csv``) and the
    oracle index."""
    index = oracle.read_index(ctx.paths)
    summary = summarize_sources(index)
    ctx.save_table(summary, "sources_summary.csv")
    return summary, index


def write_figures(ctx: StageContext, index: pd.DataFrame) -> pd.DataFrame:
    """One ortho figure per source, variant and low-quality kind (``tables/figures.csv`` lists them)."""
    shown = save_showcase_figures(ctx.paths, index, ctx.figures)
    ctx.save_table(shown, "figures.csv")
    return shown


def write_timing(ctx: StageContext, report: GenerationReport) -> str:
    """Generation time per source (``tables/generation_time.csv``) and the note on paper scale."""
    timing = timing_table(report.timings)
    if not timing.empty:
        ctx.save_table(timing, "generation_time.csv")
    probe = probe_paper_scale(ctx.P.paper_probe_slices, seed=ctx.P.seed) if ctx.P.paper_probe_slices > 0 else None
    bench = ctx.paths.runs.parent / "bench" / "bench_phantom.json"
    return timing_note(timing, bench, probe)


def record(ctx: StageContext, report: GenerationReport | None, verified: VerifyReport | None) -> Path:
    """The run record; a verification with problems then stops the stage, listing them."""
    extra: dict = {}
    if report is not None:
        extra = {"volumes": int(len(report.index)), "skipped": report.skipped,
                 "failures": [str(f) for f in report.failures],
                 "variants": report.index.groupby("variant").size().to_dict()}
    if verified is not None:
        extra = {"problems": verified.problems, "table": verified.table.to_dict(orient="records"),
                 "ignored": int(len(verified.ignored)),
                 "tables": {k: f"tables/{v}" for k, v in VERIFY_TABLES.items()}}
    path = ctx.write_record(extra)
    if verified is not None and not verified.ok:
        raise SystemExit(f"sources incomplete (tables/{VERIFY_TABLES['problems']} lists each problem): "
                         + verified.summary())
    return path



def showcase_rows(index: pd.DataFrame) -> pd.DataFrame:
    """One good-quality row per source and one row per variant / special kind, for figures.

    Kinds: each source; variants L6, L5_missing, transitional, T11, T13; metal; stump-free
    low-quality kinds (noise, truncated, missing_slices); VerSe cropped and mask-on-other-grid.
    """
    picks: list[tuple[str, pd.Series]] = []
    ok = index[index["quality"] == "ok"]
    for src in RAW_SOURCES:
        sub = ok[(ok["source"] == src) & (ok["variant"] == "normal")]
        if sub.empty:
            sub = ok[ok["source"] == src]
        if not sub.empty:
            picks.append((f"source_{src}", sub.iloc[0]))
    for var in ("L6", "L5_missing", "transitional", "T11", "T13"):
        sub = ok[ok["variant"].astype(str).str.split("+").apply(lambda v, var=var: var in v or (var == "L5_missing" and "L4" in v))]
        if not sub.empty:
            picks.append((f"variant_{var}", sub.iloc[0]))
    sub = ok[ok["metal"].astype(bool)]
    if not sub.empty:
        picks.append(("metal", sub.iloc[0]))
    low = index[index["quality"] == "low"]
    for reason in sorted(low["quality_reason"].dropna().unique()):
        picks.append((f"lowq_{reason}", low[low["quality_reason"] == reason].iloc[0]))
    rows = []
    for kind, row in picks:
        r = row.copy()
        r["kind"] = kind
        rows.append(r)
    return pd.DataFrame(rows).reset_index(drop=True)


def summarize_sources(index: pd.DataFrame) -> pd.DataFrame:
    """Per-source counts, spacing and size of the generated set beside the paper's Table 1."""
    rows = []
    for src in RAW_SOURCES:
        sub = index[index["source"] == src]
        if sub.empty:
            continue
        shapes = np.array([[int(v) for v in s.split("x")] for s in sub["shape"]])
        paper = PAPER_TABLE1[src]
        rows.append(dict(
            source=src, patients=sub["patient_id"].nunique(), volumes=len(sub),
            low_quality=int((sub["quality"] == "low").sum()),
            L6_patients=int(sub.loc[sub["variant"].str.contains("L6"), "patient_id"].nunique()),
            L5_missing_patients=int(sub.loc[sub["variant"].str.contains("L5_missing|L4", regex=True), "patient_id"].nunique()),
            mean_spacing_mm="({:.2f}, {:.2f}, {:.2f})".format(sub["spacing_x_mm"].mean(), sub["spacing_y_mm"].mean(),
                                                              sub["spacing_z_mm"].mean()),
            mean_size="x".join(str(int(round(v))) for v in shapes.mean(0)),
            paper_patients=paper["patients"], paper_spacing_mm=str(paper["spacing_mm"]),
            paper_size="x".join(str(v) for v in paper["size"]) if paper["size"] else "varies"))
    return pd.DataFrame(rows)


def save_showcase_figures(paths, index: pd.DataFrame, out_dir: Path, progress: bool = True) -> pd.DataFrame:
    """Save an orthogonal-view figure (bone window, truth overlay) per showcase row.

    Reads each volume back from the written source (DICOM through SimpleITK, NIfTI through
    :mod:`lib.io`) and its truth through :func:`lib.synthetic.oracle.load_truth`, so the pictures show
    what a pipeline will read, not the generator's arrays.

    Returns:
        Table with kind, source, patient_id, source_key, variant and the PNG path.
    """
    rows = []
    picks = showcase_rows(index)
    for _, r in tqdm(list(picks.iterrows()), desc="figures", disable=not progress, leave=False):
        vol = read_source_volume(Path(paths.sources), r["image_path"])
        truth = oracle.load_truth(paths, r["source"], r["source_key"], vol)
        cents = oracle.load_centroids(paths, r["source"], r["source_key"])
        title = (f"{r['kind']}: {r['source']} {r['patient_id']} ({r['variant']}, {r['fov']}, "
                 f"z {float(r['spacing_z_mm']):.2f} mm{', ' + r['quality_reason'] if r['quality'] == 'low' else ''})")
        slices = None
        lumbar = [lab for lab in cents if 20 <= lab <= 25]
        if r["kind"].startswith("variant_") and lumbar and r["kind"] not in ("variant_T11", "variant_T13"):
            # variants of the lumbosacral junction: cut through the last lumbar vertebra
            ijk = np.linalg.inv(vol.affine) @ np.array([*cents[max(lumbar)], 1.0])
            fg = np.nonzero(truth)
            slices = (int(np.median(fg[0])), int(round(ijk[1])), int(round(ijk[2])))
        fig = plot_ortho(vol.array, truth, vol.spacing, centroids=cents, affine=vol.affine, title=title,
                             slices=slices)
        png = Path(out_dir) / f"{r['kind']}.png"
        save_figure(fig, png)
        rows.append(dict(kind=r["kind"], source=r["source"], patient_id=r["patient_id"], source_key=r["source_key"],
                         variant=r["variant"], png=str(png)))
    return pd.DataFrame(rows)


def timing_table(timings: pd.DataFrame) -> pd.DataFrame:
    """Seconds per volume (render, write) and megavoxels per second, by source."""
    t = timings[~timings["skipped"].astype(bool)] if "skipped" in timings else timings
    if t.empty:
        return pd.DataFrame()
    g = t.groupby("source")
    out = pd.DataFrame({
        "volumes": g.size(),
        "mean_voxels_M": g["voxels"].mean() / 1e6,
        "generate_s_per_volume": g["generate_s"].mean(),
        "write_s_per_volume": g["write_s"].mean(),
        "total_s": g["generate_s"].sum() + g["write_s"].sum(),
    })
    out["Mvox_per_s"] = out["mean_voxels_M"] / out["generate_s_per_volume"]
    return out.round(3).reset_index()


def probe_paper_scale(slices: int = 40, seed: int = 0, full_slices: int = 542) -> dict:
    """Time a slab of a paper-scale COLONOG-like case (512 x 512, 0.75 mm, 0.8 mm slices).

    Renders ``slices`` slices around L3 and extrapolates linearly to ``full_slices`` (the
    paper's mean COLONOG size, 512 x 512 x 542). A quick estimate for the notebook; the
    benchmark renders whole cases.
    """
    base = CaseSpec(seed=seed, fov="abdomen", spacing_mm=(0.75, 0.75, 0.8), fov_xy_mm=384.0, colon_gas=True)
    z_l3 = [sg for sg in build_anatomy(base).segments if sg.name == "L3"][0].center[2]
    spec = replace(base, z_range_mm=(z_l3 - 0.4 * slices, z_l3 + 0.4 * (slices - 1)))
    t0 = time.perf_counter()
    case = generate_case(spec)
    dt = time.perf_counter() - t0
    n = case.ct.shape[2]
    return dict(shape="x".join(map(str, case.ct.shape)), slab_s=round(dt, 3), s_per_slice=round(dt / n, 4),
                full_slices=full_slices, full_case_s_estimate=round(dt / n * full_slices, 1))


def timing_note(timing: pd.DataFrame, bench_json: Path | None = None, probe: dict | None = None) -> str:
    """Closing note: generation time per volume on this grid and at paper scale (probe, bench)."""
    lines = []
    if timing is not None and not timing.empty:
        n = int(timing["volumes"].sum())
        per = (timing["total_s"].sum()) / max(n, 1)
        worst = timing.loc[timing["generate_s_per_volume"].idxmax()]
        lines.append(f"**This grid:** {n} volumes rendered and written, {per:.2f} s per volume on average "
                     f"(slowest source {worst['source']}: {worst['generate_s_per_volume']:.2f} s render + "
                     f"{worst['write_s_per_volume']:.2f} s write per volume).")
    else:
        lines.append("**This grid:** nothing was rendered in this run (all volumes already existed).")
    if probe:
        lines.append(f"**Paper scale, estimated here:** a {probe['shape']} slab of a COLONOG-like case "
                     f"(0.75 mm, 0.8 mm slices) took {probe['slab_s']:.2f} s = {probe['s_per_slice']:.3f} s per "
                     f"slice, so about {probe['full_case_s_estimate']:.0f} s for a 512 x 512 x {probe['full_slices']} case.")
    if bench_json is not None and Path(bench_json).exists():
        b = json.loads(Path(bench_json).read_text())
        for row in b.get("cases", []):
            lines.append(f"**{row['scale']} scale** ({row['fov']}, {row['shape']}, {row['spacing_mm']} mm): "
                         f"{row['generate_s']:.2f} s per case ({row['mvox_per_s']:.1f} Mvoxel/s; bench run {b.get('when', '')}).")
    else:
        lines.append("**Paper scale, whole cases:** run `make bench` (bench/bench_phantom.py).")
    return "\n\n".join(lines)
