"""Table 1 of a release (patients, spacing, size, vertebra counts), beside the paper's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib.core.paths import SPLITS, ProfilePaths
from lib.datasets.ctspine1k.ids import SOURCES
from lib.datasets.ctspine1k.release import release_inventory
from lib.datasets.paper_facts import PAPER_SPLIT_COUNTS, PAPER_TABLE1, PAPER_TOTALS


def build_table1(paths_or_release_dir: ProfilePaths | str | Path, with_masks: bool = False,
                 patterns: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Table 1 of the release, side by side with the paper's.

    Rows: every source x split, the source over all splits (``split == "all"``), and
    ``total``. Columns: ``patients``; mean and SD of the spacing (x, y, z) mm; mean size;
    with ``with_masks``: cases with a mask, labelled vertebrae (all / cervical / thoracic /
    lumbar), L6 cases and lumbar sacralization cases (:func:`find_special_cases` rules); and the
    paper's values (``paper_patients``, ``paper_spacing_mm``, ``paper_size``, and with masks
    ``paper_vertebrae`` etc. on the total row).

    Args:
        paths_or_release_dir: a :class:`lib.core.paths.ProfilePaths` or the release folder.
        with_masks: read ``gt/`` masks (needs the annotation stage to have run).
        patterns: release-ID pattern table (default: built-in).
    """
    inv = release_inventory(paths_or_release_dir, with_masks, patterns)
    cols_sp = ["spacing_x_mm", "spacing_y_mm", "spacing_z_mm"]
    cols_sz = ["size_x", "size_y", "size_z"]
    srcs = [s for s in [*SOURCES, *sorted(set(inv.get("source", pd.Series(dtype=str))) - set(SOURCES))]]
    groups: list[tuple[str, str, pd.DataFrame]] = []
    for src in srcs:
        sub = inv[inv["source"] == src] if len(inv) else inv
        for split in SPLITS:
            groups.append((src, split, sub[sub["split"] == split] if len(sub) else sub))
        groups.append((src, "all", sub))
    for split in SPLITS:
        groups.append(("total", split, inv[inv["split"] == split] if len(inv) else inv))
    groups.append(("total", "all", inv))
    rows = []
    for src, split, g in groups:
        row: dict[str, Any] = {"source": src, "split": split, "patients": int(len(g))}
        for c in cols_sp:
            row[c] = round(float(g[c].mean()), 3) if len(g) else np.nan
            row[c.replace("spacing", "sd")] = round(float(g[c].std(ddof=0)), 3) if len(g) else np.nan
        for c in cols_sz:
            row[f"mean_{c}"] = round(float(g[c].mean()), 1) if len(g) else np.nan
        row["spacing_mm"] = (" x ".join(f"{row[c]:.2f}±{row[c.replace('spacing', 'sd')]:.2f}" for c in cols_sp)
                             if len(g) else "")
        row["size"] = " x ".join(f"{row[f'mean_{c}']:.0f}" for c in cols_sz) if len(g) else ""
        if with_masks:
            gm = g[g["has_mask"]] if len(g) and "has_mask" in g else g.iloc[0:0]
            row["cases_with_mask"] = int(len(gm))
            for k in ("vertebrae", "cervical", "thoracic", "lumbar"):
                row[k] = int(gm[k].sum()) if len(gm) else 0
            row["L6_cases"] = int(gm["L6"].sum()) if len(gm) else 0
            row["sacralization_cases"] = int(gm["sacralization"].sum()) if len(gm) else 0
        paper = PAPER_TABLE1.get(src)
        if src in PAPER_SPLIT_COUNTS:
            row["paper_patients"] = PAPER_SPLIT_COUNTS[src][split] if split in SPLITS else paper["patients"]
            row["paper_spacing_mm"] = " x ".join(f"{v:.2f}" for v in paper["spacing_mm"])
            row["paper_size"] = " x ".join(str(v) for v in paper["size"])
        elif src == "total":
            row["paper_patients"] = (sum(PAPER_SPLIT_COUNTS[s][split] for s in PAPER_SPLIT_COUNTS)
                                     if split in SPLITS else PAPER_TOTALS["patients"])
            row["paper_spacing_mm"] = row["paper_size"] = ""
            if with_masks and split == "all":
                for k in ("vertebrae", "cervical", "thoracic", "lumbar", "L6_cases", "sacralization_cases"):
                    row[f"paper_{k}"] = PAPER_TOTALS[k]
        else:
            row["paper_patients"] = np.nan
            row["paper_spacing_mm"] = row["paper_size"] = ""
        rows.append(row)
    df = pd.DataFrame(rows)
    keep = (df["patients"] > 0) | df["source"].isin([*SOURCES, "total"])
    return df[keep].reset_index(drop=True)


def table1_markdown(t1: pd.DataFrame) -> str:
    """Compact text rendering of Table 1 (ours vs paper) for notebooks and reports."""
    cols = [c for c in ("source", "split", "patients", "paper_patients", "spacing_mm", "paper_spacing_mm", "size",
                        "paper_size", "vertebrae", "L6_cases", "sacralization_cases") if c in t1]
    return t1[cols].to_string(index=False)
