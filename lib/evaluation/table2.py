"""Table 2 in the paper's layout: per-vertebra DSC / HD95 (mm), ASSD, NSD, ID rate, paper beside run."""

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


def build_table2(summaries: Mapping[str, Mapping], with_paper: bool = True) -> pd.DataFrame:
    """Table 2 in the paper's layout from one summary per test set.

    Rows: C1..L6 (plus T13 when a summary evaluates it), "Mean of Vertebrae", "Mean of Spine".
    Columns per set: ``<set> DSC``, ``<set> DSC (paper)``, ``<set> HD95``, ``<set> HD95 (paper)``,
    ``<set> ASSD``, ``<set> NSD``, ``<set> ID rate``, ``<set> Loc. (mm)`` (VerSe's localisation
    error: distance between true and predicted centroid of the labels in both, mm). Paper cells come from
    :data:`PAPER_TABLE2` only (DESIGN §6); every other paper cell is empty (NaN), as are the
    paper columns of a set the paper does not have. Means are over cases (per label) and over
    labels (Mean of Vertebrae); HD95 in mm under the definition each summary states
    (``df.attrs["hd95_definition"]``).
    """
    row_labels = list(lab.CTSPINE1K_LABELS)
    for s in summaries.values():
        row_labels += [v for v in s.get("labels", []) if v in lab.LABELS and v not in row_labels]
    index = [lab.name(v) for v in lab.ordered(row_labels)] + [MEAN_OF_VERTEBRAE, MEAN_OF_SPINE]
    table = pd.DataFrame(index=index)
    table.index.name = "Vertebra"
    defs = {}
    for set_name, s in summaries.items():
        defs[set_name] = s.get("hd95_definition")
        paper = PAPER_TABLE2.get(paper_set_name(set_name) or "", {}) if with_paper else None

        def cell(entry, metric):
            return entry.get(metric, {}).get("mean", math.nan) if entry else math.nan

        cols: dict[str, list] = {c: [] for c in ("DSC", "DSC (paper)", "HD95", "HD95 (paper)",
                                                 "ASSD", "NSD", "ID rate", "Loc. (mm)")}
        for row in index:
            if row == MEAN_OF_VERTEBRAE:
                entry = s.get("mean_of_vertebrae", {})
            elif row == MEAN_OF_SPINE:
                entry = s.get("mean_of_spine", {})
            else:
                entry = s.get("mean", {}).get(row, {})
            cols["DSC"].append(cell(entry, "dice"))
            cols["HD95"].append(cell(entry, "hd95"))
            cols["ASSD"].append(cell(entry, "assd"))
            cols["NSD"].append(cell(entry, "nsd"))
            cols["ID rate"].append(cell(entry, "identification_rate") if row != MEAN_OF_SPINE else math.nan)
            cols["Loc. (mm)"].append(cell(entry, "localisation_mm") if row != MEAN_OF_SPINE else math.nan)
            ref = (paper or {}).get(row, {})
            cols["DSC (paper)"].append(ref.get("DSC", math.nan))
            cols["HD95 (paper)"].append(ref.get("HD95", math.nan))
        for c, vals in cols.items():
            if "(paper)" in c and not with_paper:
                continue
            table[f"{set_name} {c}"] = pd.to_numeric(pd.Series(vals, index=index), errors="coerce")
    table.attrs["hd95_definition"] = defs
    table.attrs["identification"] = {k: s["identification"]["text"] for k, s in summaries.items()
                                     if isinstance(s.get("identification"), Mapping) and "text" in s["identification"]}
    return table


def table2_markdown(table: pd.DataFrame) -> str:
    """Markdown of :func:`build_table2`: DSC/NSD/ID rate to 3 decimals, mm to 2, NaN left empty."""
    cols = list(table.columns)
    lines = ["| " + " | ".join([table.index.name or ""] + cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for name, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
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
