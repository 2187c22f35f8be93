"""lib.datasets.label_tables: ITK-SNAP and 3D Slicer label files."""

from __future__ import annotations

from lib.core import labels
from lib.datasets import label_tables


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
    assert by_value[28][1] == "T13"
    assert len(by_value[28]) == 6
    assert set(by_value) == {0, *labels.LABELS}
