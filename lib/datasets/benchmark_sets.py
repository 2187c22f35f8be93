"""The benchmark's test sets: Test_public and Test_private (the release) and Test_VerSe.

Test_VerSe holds the VerSe scans the pretraining did not train on (02_pretraining's split and
selection tables, :func:`lib.datasets.verse.test_verse_cases`).
"""

from __future__ import annotations

from lib.core.cases import Case
from lib.core.paths import ProfilePaths
from lib.datasets.ctspine1k.release import annotated_cases
from lib.datasets.verse import test_verse_cases


def benchmark_test_cases(paths: ProfilePaths, include_verse: bool = True) -> list[Case]:
    """Test_public and Test_private with their accepted masks (a missing mask is an error) and,
    with ``include_verse``, Test_VerSe; ``case.split`` names the set."""
    cases = annotated_cases(paths, ["test_public", "test_private"])
    if include_verse:
        tab = paths.tables("02_pretraining")
        cases += test_verse_cases(tab / "split.csv", tab / "verse_selection.csv")
    return cases
