"""lib.core.labels: the one label table."""

from __future__ import annotations

import pytest

from lib.core import labels


def test_table_matches_ctspine1k_and_verse_conventions():
    assert [labels.name(v) for v in range(1, 8)] == [f"C{i}" for i in range(1, 8)]
    assert [labels.name(v) for v in range(8, 20)] == [f"T{i}" for i in range(1, 13)]
    assert [labels.name(v) for v in range(20, 26)] == [f"L{i}" for i in range(1, 7)]
    assert labels.name(28) == "T13"
    assert labels.region(28) == "thoracic"
    assert 26 not in labels.LABELS
    assert 27 not in labels.LABELS
    assert tuple(range(1, 26)) == labels.CTSPINE1K_LABELS
    assert {labels.region(v) for v in range(1, 8)} == {"cervical"}
    assert {labels.region(v) for v in range(20, 26)} == {"lumbar"}
    assert labels.ordered([25, 28, 19, 1]) == [1, 19, 28, 25]


def test_colours_distinct_for_neighbours():
    vals = labels.ordered()
    for a, b in zip(vals, vals[1:], strict=False):
        assert labels.LABELS[a].rgb != labels.LABELS[b].rgb


@pytest.mark.parametrize(("text", "expected"), [
    ("1-25", list(range(1, 26))), ("L6", [25]), ("C1-C3,L5-L6", [1, 2, 3, 24, 25]), ("20,28", [20, 28]),
])
def test_parse_label_range(text, expected):
    assert labels.parse_label_range(text) == expected


def test_parse_label_range_rejects_unknown():
    with pytest.raises(ValueError, match="S1"):
        labels.parse_label_range("L5,S1")
