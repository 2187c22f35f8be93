"""Evaluate several test sets at once: one folder of results per set, all rows in one table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lib.core import labels as L
from lib.core.cases import Case
from lib.core.parallel import CaseFailure, CaseFailuresError
from lib.datasets.verse import TEST_VERSE, VERSE_CROPPED
from lib.evaluation.folders import evaluate_pairs, write_results

VERSE_SET_NAMES = (TEST_VERSE, VERSE_CROPPED)
"""The sets of VerSe scans: their masks label T13."""


def set_labels(set_name: str) -> list[int]:
    """Labels evaluated per vertebra in a set: C1..L6, and T13 for the VerSe sets (Test_VerSe,
    VerSe_cropped: VerSe labels it)."""
    return list(L.CTSPINE1K_LABELS) + ([L.T13] if set_name in VERSE_SET_NAMES else [])


def evaluate_sets(cases: Sequence[Case], out_dir: str | Path, hd95: str = "pooled", workers: int = 0,
                  on_error: str = "collect") -> tuple[pd.DataFrame, dict[str, dict]]:
    """Evaluate each case's ``prediction`` against its ``mask``, set by set (``case.split``);
    writes ``<out_dir>/<set>/`` (per-case CSV, summary JSON, Table 2 of the set).

    A case that cannot be scored (unreadable or invalid truth or prediction) is a failed case:
    scored as missed (Dice 0) with ``status`` failed, listed in its set's
    ``summary["failed_cases"]`` (:func:`lib.evaluation.folders.evaluate_pairs`); ``on_error="raise"``
    raises after every set was evaluated and written.

    Returns:
        (all per-case rows with a ``set`` column, ``{set: summary}``).
    """
    frames, summaries = [], {}
    for set_name in dict.fromkeys(c.split for c in cases):
        pairs = [(c.case_id, c.mask, c.prediction) for c in cases if c.split == set_name]
        df, summary = evaluate_pairs(pairs, labels=set_labels(set_name), hd95=hd95, workers=workers, progress=False,
                                     on_error="collect")
        summary["set_name"] = set_name
        write_results(df, summary, Path(out_dir) / set_name, set_name=set_name)
        frames.append(df.assign(set=set_name))
        summaries[set_name] = summary
    failed = [CaseFailure(f"{s}/{f['case_id']}", f["message"]) for s, sm in summaries.items()
              for f in sm.get("failed_cases", [])]
    if failed and on_error == "raise":
        raise CaseFailuresError(failed)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), summaries
