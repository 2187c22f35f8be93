"""The benchmark's test sets: Test_public and Test_private (the release), Test_VerSe and, for
information, VerSe_cropped.

Which VerSe scans form Test_VerSe depends on what the benchmark model has seen
(:func:`lib.datasets.verse.verse_test_sets`): trained from scratch (``init_from: scratch``, the
paper's nnU-Net), every usable VerSe scan -- the paper's definition; warm-started from a
VerSe-pretrained model (``annotation``: the rounds fine-tune 02's model on the CTSpine1K trainset
only; ``pretrained``: 02's model), only the usable scans 02 held out. 04 writes the sets it
evaluated to ``tables/test_verse_cases.csv``; 05 reads them back from there.
"""

from __future__ import annotations

import pandas as pd

from lib.core.cases import Case
from lib.core.paths import ProfilePaths
from lib.datasets.ctspine1k.release import annotated_cases
from lib.datasets.verse import test_verse_definition, verse_cases, verse_test_sets

VERSE_SETS_TABLE = "test_verse_cases.csv"
"""04_benchmark's table of the VerSe scans, the set each is in (or "") and why."""

INIT_FROM_SEEN_VERSE = {"annotation": True, "pretrained": True, "scratch": False}
"""Whether a benchmark model started from ``init_from`` has seen 02's VerSe training scans."""


def pretrained_on_verse(init_from: str) -> bool:
    """True when 04's model starts from a VerSe-pretrained model (``annotation``, ``pretrained``)."""
    if init_from not in INIT_FROM_SEEN_VERSE:
        raise ValueError(f"init_from {init_from!r}: expected one of {sorted(INIT_FROM_SEEN_VERSE)}")
    return INIT_FROM_SEEN_VERSE[init_from]


def verse_sets(paths: ProfilePaths, init_from: str) -> tuple[pd.DataFrame, str]:
    """Every VerSe scan with its benchmark set and why, and the definition of Test_VerSe that
    applies to a model started from ``init_from`` (from 02_pretraining's tables)."""
    seen = pretrained_on_verse(init_from)
    tab = paths.tables("02_pretraining")
    table = verse_test_sets(tab / "split.csv", tab / "verse_selection.csv", pretrained_on_verse=seen)
    return table, test_verse_definition(table, seen)


def evaluated_verse_sets(paths: ProfilePaths) -> pd.DataFrame:
    """The VerSe sets as 04_benchmark evaluated them (its ``tables/test_verse_cases.csv``).

    Raises:
        FileNotFoundError: 04 has not written the table (not run, or run without VerSe).
    """
    f = paths.tables("04_benchmark") / VERSE_SETS_TABLE
    if not f.exists():
        raise FileNotFoundError(f"{f}: missing; run 04_benchmark with include_verse: true first")
    return pd.read_csv(f, dtype={"case_id": str}, keep_default_na=False)


def benchmark_test_cases(paths: ProfilePaths, include_verse: bool = True, init_from: str | None = None) -> list[Case]:
    """Test_public and Test_private with their accepted masks (a missing mask is an error) and,
    with ``include_verse``, Test_VerSe and VerSe_cropped: for a model started from ``init_from``
    (:func:`verse_sets`), or, with ``init_from`` None, as 04 evaluated them
    (:func:`evaluated_verse_sets`). ``case.split`` names the set."""
    cases = annotated_cases(paths, ["test_public", "test_private"])
    if include_verse:
        table = verse_sets(paths, init_from)[0] if init_from else evaluated_verse_sets(paths)
        cases += verse_cases(table)
    return cases
