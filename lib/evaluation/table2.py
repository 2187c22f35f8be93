"""Table 2 in the paper's layout: per-vertebra DSC / HD95 (mm), ASSD, NSD, ID rate, paper beside run.

Above the vertebrae, per set: how many cases, how many failed (scored Dice 0) and how many
predictions were missing; the Markdown flags every set with failed cases in a marker line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import pandas as pd

from lib.core import labels as lab
from lib.datasets.paper_facts import (
    MEAN_OF_SPINE,
    MEAN_OF_VERTEBRAE,
    PAPER_TABLE2,
    VERSE_CHALLENGE_BEST,
)


def paper_set_name(set_name: str) -> str | None:
    """The paper's test-set name for ``set_name`` (``"test_public"`` -> ``"Test_public"``), or None."""
    key = re.sub(r"[^a-z]", "", set_name.lower())
    key = key[4:] if key.startswith("test") else key
    return {"public": "Test_public", "private": "Test_private", "verse": "Test_VerSe"}.get(key)


COUNT_ROWS = ("Cases", "Failed", "Missing")
"""Rows above the vertebrae: per set, its cases, failed cases (scored Dice 0) and missing predictions."""

_COLUMNS = ("DSC", "DSC (paper)", "HD95", "HD95 (paper)", "ASSD", "NSD", "ID rate", "Loc. (mm)")


def _counts(s: Mapping) -> dict[str, float]:
    """Cases / Failed / Missing of one summary (older summaries: the ``*_cases`` keys)."""
    failed = s.get("n_failed", s.get("n_failed_cases", len(s.get("failed_cases", []))))
    missing = s.get("n_missing", s.get("n_missing_cases", len(s.get("missing_cases", []))))
    return {"Cases": s.get("n_cases", math.nan), "Failed": failed, "Missing": missing}


def _cell(entry: Mapping | None, metric: str) -> float:
    return entry.get(metric, {}).get("mean", math.nan) if entry else math.nan


def _set_columns(s: Mapping, index: list[str], paper: Mapping | None) -> dict[str, list]:
    """The columns of one set: counts in the count rows (run columns), means in the others."""
    counts = _counts(s)
    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    for row in index:
        if row in COUNT_ROWS:
            for c in _COLUMNS:
                cols[c].append(math.nan if "(paper)" in c else counts[row])
            continue
        if row == MEAN_OF_VERTEBRAE:
            entry = s.get("mean_of_vertebrae", {})
        elif row == MEAN_OF_SPINE:
            entry = s.get("mean_of_spine", {})
        else:
            entry = s.get("mean", {}).get(row, {})
        cols["DSC"].append(_cell(entry, "dice"))
        cols["HD95"].append(_cell(entry, "hd95"))
        cols["ASSD"].append(_cell(entry, "assd"))
        cols["NSD"].append(_cell(entry, "nsd"))
        cols["ID rate"].append(_cell(entry, "identification_rate") if row != MEAN_OF_SPINE else math.nan)
        cols["Loc. (mm)"].append(_cell(entry, "localisation_mm") if row != MEAN_OF_SPINE else math.nan)
        ref = (paper or {}).get(row, {})
        cols["DSC (paper)"].append(ref.get("DSC", math.nan))
        cols["HD95 (paper)"].append(ref.get("HD95", math.nan))
    return cols


def build_table2(summaries: Mapping[str, Mapping], with_paper: bool = True) -> pd.DataFrame:
    """Table 2 in the paper's layout from one summary per test set.

    Rows: "Cases", "Failed", "Missing" (:data:`COUNT_ROWS`: per set, the count in each of its
    run columns; failed cases are scored Dice 0, missing predictions as empty ones), then C1..L6
    (plus T13 when a summary evaluates it), "Mean of Vertebrae", "Mean of Spine".
    Columns per set: ``<set> DSC``, ``<set> DSC (paper)``, ``<set> HD95``, ``<set> HD95 (paper)``,
    ``<set> ASSD``, ``<set> NSD``, ``<set> ID rate``, ``<set> Loc. (mm)`` (VerSe's localisation
    error: distance between true and predicted centroid of the labels in both, mm). Paper cells come from
    :data:`PAPER_TABLE2` only (DESIGN §6); every other paper cell is empty (NaN), as are the
    paper columns of a set the paper does not have. Means are over cases (per label) and over
    labels (Mean of Vertebrae); HD95 in mm under the definition each summary states
    (``df.attrs["hd95_definition"]``); ``df.attrs["failed_cases"]`` lists each set's failed cases.
    """
    row_labels = list(lab.CTSPINE1K_LABELS)
    for s in summaries.values():
        row_labels += [v for v in s.get("labels", []) if v in lab.LABELS and v not in row_labels]
    index = [*COUNT_ROWS, *[lab.name(v) for v in lab.ordered(row_labels)], MEAN_OF_VERTEBRAE, MEAN_OF_SPINE]
    table = pd.DataFrame(index=index)
    table.index.name = "Vertebra"
    defs = {}
    for set_name, s in summaries.items():
        defs[set_name] = s.get("hd95_definition")
        paper = PAPER_TABLE2.get(paper_set_name(set_name) or "", {}) if with_paper else None
        for c, vals in _set_columns(s, index, paper).items():
            if "(paper)" in c and not with_paper:
                continue
            table[f"{set_name} {c}"] = pd.to_numeric(pd.Series(vals, index=index), errors="coerce")
    table.attrs["hd95_definition"] = defs
    table.attrs["identification"] = {k: s["identification"]["text"] for k, s in summaries.items()
                                     if isinstance(s.get("identification"), Mapping) and "text" in s["identification"]}
    table.attrs["failed_cases"] = {k: [{"case_id": str(f.get("case_id", "")), "message": str(f.get("message", ""))}
                                       for f in s.get("failed_cases", [])] for k, s in summaries.items()}
    return table


def _first_line(text: str, limit: int = 300) -> str:
    text = str(text).strip()
    return text.splitlines()[0][:limit] if text else ""


def failure_lines(table: pd.DataFrame, max_cases: int = 10) -> list[str]:
    """One visible marker line per set with failed cases (from ``table.attrs["failed_cases"]``, or
    the "Failed" row when the attrs are lost, e.g. a table read back from CSV)."""
    lines = []
    listed = table.attrs.get("failed_cases") or {}
    sets = list(dict.fromkeys(str(c).rsplit(" DSC", 1)[0] for c in table.columns if str(c).endswith(" DSC")))
    for set_name in sets:
        cases = listed.get(set_name, [])
        n = len(cases)
        if not n and "Failed" in table.index:
            v = table.loc["Failed", f"{set_name} DSC"]
            n = 0 if pd.isna(v) else int(v)
        if not n:
            continue
        shown = "; ".join(f"{f['case_id']} — {_first_line(f['message'])}" for f in cases[:max_cases])
        more = f"; and {n - max_cases} more" if n > max_cases else ""
        lines.append(f"⚠ {set_name}: {n} failed case{'s' if n != 1 else ''} (scored Dice 0)"
                     + (f": {shown}{more}" if shown else ""))
    return lines


def table2_markdown(table: pd.DataFrame) -> str:
    """Markdown of :func:`build_table2`: counts as integers, DSC/NSD/ID rate to 3 decimals, mm to 2,
    NaN left empty; a marker line above the table for each set with failed cases
    (:func:`failure_lines`)."""
    cols = list(table.columns)
    marks = failure_lines(table)
    lines = [*marks, ""] if marks else []
    lines += ["| " + " | ".join([table.index.name or ""] + cols) + " |",
              "|" + "---|" * (len(cols) + 1)]
    for name, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif name in COUNT_ROWS:
                cells.append(f"{int(v)}")
            elif "HD95" in c or "ASSD" in c or "(mm)" in c:
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{v:.3f}")
        lines.append("| " + " | ".join([str(name)] + cells) + " |")
    defs = table.attrs.get("hd95_definition", {})
    if defs:
        lines.append("")
        lines.append("HD95 definition: " + "; ".join(f"{k}: {v}" for k, v in defs.items())
                     + ". Paper columns: CTSpine1K Table 2 (nnU-Net 3d_fullres), only the cells quoted in DESIGN §6.")
    idents = table.attrs.get("identification", {})
    if idents:
        lines.append("")
        lines.append("ID rate: " + "; ".join(f"{k}: {v}" for k, v in idents.items()) + ".")
    if any(paper_set_name(str(c).split(" ")[0]) == "Test_VerSe" for c in cols):
        b = VERSE_CHALLENGE_BEST
        lines.append("")
        lines.append(f"VerSe 2020's best challenge entry, for comparison: ID rate {b['identification_rate']:.3f}, "
                     f"localisation error < {b['localisation_mm_below']:g} mm, Dice {b['dice']:.3f}.")
    return "\n".join(lines)
