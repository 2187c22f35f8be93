"""lib.labels: the single table and its ITK-SNAP / Slicer exports."""

from __future__ import annotations

import pytest

from lib.core import labels
from lib.datasets import label_tables


def test_table_matches_ctspine1k_and_verse_conventions():
    assert [labels.name(v) for v in range(1, 8)] == [f"C{i}" for i in range(1, 8)]
    assert [labels.name(v) for v in range(8, 20)] == [f"T{i}" for i in range(1, 13)]
    assert [labels.name(v) for v in range(20, 26)] == [f"L{i}" for i in range(1, 7)]
    assert labels.name(28) == "T13" and labels.region(28) == "thoracic"
    assert 26 not in labels.LABELS and 27 not in labels.LABELS  # sacrum/coccyx not labelled
    assert labels.CTSPINE1K_LABELS == tuple(range(1, 26))
    assert {labels.region(v) for v in range(1, 8)} == {"cervical"}
    assert {labels.region(v) for v in range(20, 26)} == {"lumbar"}
    assert labels.ordered([25, 28, 19, 1]) == [1, 19, 28, 25]


def test_colours_distinct_for_neighbours():
    vals = labels.ordered()
    for a, b in zip(vals, vals[1:], strict=False):
        assert labels.LABELS[a].rgb != labels.LABELS[b].rgb


@pytest.mark.parametrize("text, expected", [
    ("1-25", list(range(1, 26))), ("L6", [25]), ("C1-C3,L5-L6", [1, 2, 3, 24, 25]), ("20,28", [20, 28]),
])
def test_parse_label_range(text, expected):
    assert labels.parse_label_range(text) == expected


def test_parse_label_range_rejects_unknown():
    with pytest.raises(ValueError, match="S1"):
        labels.parse_label_range("L5,S1")


def test_itksnap_file_round_trip(tmp_path):
    p = label_tables.write_itksnap_labels(tmp_path / "labels.txt")
    table = label_tables.read_itksnap_labels(p)
    assert table == {v: labels.name(v) for v in labels.ordered()}
    line = next(ln for ln in p.read_text().splitlines() if '"L6"' in ln)
    r, g, b = labels.LABELS[25].rgb
    assert line.split()[:7] == ["25", str(r), str(g), str(b), "1", "1", "1"]


def test_slicer_colour_table(tmp_path):
    p = label_tables.write_slicer_colortable(tmp_path / "spine.ctbl")
    rows = [ln.split() for ln in p.read_text().splitlines() if not ln.startswith("#")]
    assert rows[0][:2] == ["0", "background"]
    by_value = {int(r[0]): r for r in rows}
    assert by_value[28][1] == "T13" and len(by_value[28]) == 6
    assert set(by_value) == {0, *labels.LABELS}
