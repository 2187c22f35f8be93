"""The run report: ``runs/<profile>/report.html``, one page to open after ``make reproduce``.

It holds Table 1 and Table 2 (the paper's numbers beside the run's), the key figures of every
stage, the run record (git SHA, versions, parameters, timings) and links to every executed
notebook rendered as HTML next to it. Figures are linked by relative path, so the folder can
be zipped and sent as it is.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
from pathlib import Path

import pandas as pd

from lib.core.paths import STAGES, for_profile
from lib.io import write_text

# Tables shown on the index page, in order: (stage, file, title)
KEY_TABLES = (
    ("01_curation", "table1.csv", "Table 1 — data set (curation; vertebra counts once masks exist)"),
    ("04_benchmark", "table1.csv", "Table 1 — data set with vertebra counts from the annotated masks"),
    ("02_pretraining", "heldout_summary.csv", "Pretrained model on held-out VerSe cases"),
    ("03_annotation", "rounds.csv", "Annotation rounds"),
    ("04_benchmark", "table2.csv", "Table 2 — per-vertebra DSC / HD95 (mm), paper beside run"),
    ("05_failure_l6", "label_shift.csv", "Label shifts (dislocations) before / after correction"),
    ("06_failure_lowz", "dice_vs_z.csv", "Dice vs z-spacing, baseline and thick-slice-augmented model"),
)
MAX_FIGURES_PER_STAGE = 8

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0} td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:1rem} .figs figure{margin:0;width:360px} .figs img{width:100%;border:1px solid #ddd}
figcaption{font-size:.8rem;color:#555} .meta{color:#555;font-size:.9rem} code{background:#f5f5f5;padding:0 .2rem}
.missing{color:#a00}
"""


def render_notebook_html(ipynb: Path) -> Path:
    """Render an executed notebook to HTML beside it (images embedded)."""
    import nbformat  # optional heavy dependency: only rendering notebooks needs it
    from nbconvert import HTMLExporter  # optional heavy dependency (see above)

    nb = nbformat.read(str(ipynb), as_version=4)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return write_text(ipynb.with_suffix(".html"), body)


def _table_html(path: Path) -> str:
    df = pd.read_csv(path)
    return df.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.3f}", classes="table", border=0)


def _table_notes(md: Path) -> list[str]:
    """The notes under a Markdown table (definitions: HD95, identification rule and centroids)."""
    if not md.exists():
        return []
    return [ln.strip() for ln in md.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("|")]


def build_report(profile: str, render_notebooks: bool = True) -> Path:
    """Write ``runs/<profile>/report.html`` from what the stages left in ``runs/<profile>/``.

    Args:
        profile: the profile whose runs to report.
        render_notebooks: render executed notebooks to HTML where the HTML is missing or older.

    Returns:
        The report's path. Stages that have not run are listed as such.
    """
    paths = for_profile(profile)
    root = paths.runs
    parts: list[str] = []
    pipe = root / "pipeline.json"
    pipeline = json.loads(pipe.read_text()) if pipe.exists() else {}
    parts.append(f"<h1>spine1k — run report ({html.escape(profile)})</h1>")
    if pipeline:
        parts.append(f"<p class=meta>last pipeline run: total {pipeline.get('total_seconds', '?')} s; "
                     + ", ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in pipeline.get("stages", {}).items())
                     + "</p>")

    # notebooks and run records
    rows = []
    for stage in STAGES:
        sdir = root / stage
        nb = sdir / f"{stage}.ipynb"
        rec_path = sdir / "run_record.json"
        rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
        link = "<span class=missing>not run</span>"
        if nb.exists():
            out = nb.with_suffix(".html")
            if render_notebooks and (not out.exists() or out.stat().st_mtime < nb.stat().st_mtime):
                render_notebook_html(nb)
            link = f'<a href="{stage}/{stage}.html">{stage}.html</a>'
        env = rec.get("environment", {})
        timings = rec.get("timings_s", {})
        total = sum(v for v in timings.values() if isinstance(v, int | float))
        rows.append(f"<tr><td>{stage}</td><td>{link}</td><td>{html.escape(str(env.get('git_sha', '')))}</td>"
                    f"<td>{html.escape(str(env.get('time_utc', '')))}</td><td>{f'{total:.1f}' if rec else ''}</td></tr>")
    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>executed notebook</th><th>git SHA</th>"
                 "<th>finished (UTC)</th><th>timed steps (s)</th></tr>" + "".join(rows) + "</table>")

    # key tables
    parts.append("<h2>Tables</h2>")
    for stage, name, title in KEY_TABLES:
        p = root / stage / "tables" / name
        if p.exists():
            parts.append(f"<h3>{html.escape(title)}</h3><p class=meta><code>{stage}/tables/{name}</code></p>{_table_html(p)}"
                         + "".join(f"<p class=meta>{html.escape(line)}</p>" for line in _table_notes(p.with_suffix(".md"))))

    # figures
    parts.append("<h2>Figures</h2>")
    for stage in STAGES:
        figs = sorted((root / stage / "figures").glob("*.png"))
        if not figs:
            continue
        shown = figs[:MAX_FIGURES_PER_STAGE]
        parts.append(f"<h3>{stage}</h3><div class=figs>")
        for f in shown:
            rel = f.relative_to(root).as_posix()
            parts.append(f'<figure><a href="{rel}"><img src="{rel}" alt="{html.escape(f.stem)}"></a>'
                         f"<figcaption>{html.escape(f.stem)}</figcaption></figure>")
        parts.append("</div>")
        if len(figs) > len(shown):
            parts.append(f"<p class=meta>{len(figs) - len(shown)} more in <code>{stage}/figures/</code></p>")

    # run record
    parts.append("<h2>Run record</h2>")
    for stage in STAGES:
        rec_path = root / stage / "run_record.json"
        if rec_path.exists():
            rec = json.loads(rec_path.read_text())
            parts.append(f"<details><summary>{stage}</summary><pre>{html.escape(json.dumps(rec, indent=1)[:20000])}</pre></details>")

    page = (f"<!doctype html><html><head><meta charset=utf-8><title>spine1k report ({html.escape(profile)})</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    return write_text(root / "report.html", page)


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
"""Flags for Debian's ``chromium`` driven by playwright (never a browser playwright downloads)."""


def screenshot(html_path: Path, png: Path, width: int = 1400, full_page: bool = True) -> Path:
    """Save what a person sees when opening ``html_path`` in Chromium (Debian's ``chromium``
    through playwright, offline) as ``png``; raises when ``chromium`` is not installed."""
    from playwright.sync_api import sync_playwright  # optional: screenshots only (dev extra)

    exe = shutil.which("chromium")
    if exe is None:
        raise RuntimeError("screenshot: Debian's chromium is not installed (apt-get install chromium)")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(Path(html_path).resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(png), full_page=full_page)
        browser.close()
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="spine1k report", description="Build runs/<profile>/report.html")
    ap.add_argument("--profile", default="synthetic")
    ap.add_argument("--no-notebooks", action="store_true", help="do not render executed notebooks")
    ap.add_argument("--screenshot", type=Path, default=None,
                    help="also save the report as a browser shows it (PNG; needs Debian's chromium)")
    args = ap.parse_args(argv)
    out = build_report(args.profile, render_notebooks=not args.no_notebooks)
    print(out)
    if args.screenshot:
        print(screenshot(out, args.screenshot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
