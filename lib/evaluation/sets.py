"""Evaluate several test sets at once: one folder of results per set, all rows in one table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lib.core import labels as L
from lib.core.cases import Case
from lib.datasets.verse import TEST_VERSE, VERSE_CROPPED
from lib.evaluation.folders import evaluate_pairs, write_results

VERSE_SET_NAMES = (TEST_VERSE, VERSE_CROPPED)
"""The sets of VerSe scans: their masks label T13."""


def set_labels(set_name: str) -> list[int]:
    """Labels evaluated per vertebra in a set: C1..L6, and T13 for the VerSe sets (Test_VerSe,
    VerSe_cropped: VerSe labels it)."""
    return list(L.CTSPINE1K_LABELS) + ([L.T13] if set_name in VERSE_SET_NAMES else [])


def evaluate_sets(cases: Sequence[Case], out_dir: str | Path, hd95: str = "pooled", workers: int = 0,
                  ) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Evaluate each case's ``prediction`` against its ``mask``, set by set (``case.split``);
    writes ``<out_dir>/<set>/`` (per-case CSV, summary JSON, Table 2 of the set).

    Returns:
        (all per-case rows with a ``set`` column, ``{set: summary}``).
    """
    frames, summaries = [], {}
    for set_name in dict.fromkeys(c.split for c in cases):
        pairs = [(c.case_id, c.mask, c.prediction) for c in cases if c.split == set_name]
        df, summary = evaluate_pairs(pairs, labels=set_labels(set_name), hd95=hd95, workers=workers, progress=False)
        summary["set_name"] = set_name
        write_results(df, summary, Path(out_dir) / set_name, set_name=set_name)
        frames.append(df.assign(set=set_name))
        summaries[set_name] = summary
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), summaries
