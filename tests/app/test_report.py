"""lib.app.report: the index page holds the tables, figures, run record and notebook links."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
from PIL import Image

from lib.app import report
from lib.core import paths
from lib.stages.context import write_run_record


def test_report_lists_tables_figures_and_notebooks(tmp_path):
    p = paths.for_profile("ci")
    st = p.stage("04_benchmark")
    (st / "tables").mkdir(parents=True)
    (st / "figures").mkdir()
    pd.DataFrame({"vertebra": ["L6", "Mean of Vertebrae"], "Test_public DSC": [0.0, 0.81],
                  "paper Test_public DSC": [0.0, 0.869]}).to_csv(st / "tables" / "table2.csv", index=False)
    (st / "tables" / "table2.md").write_text("| Vertebra | DSC |\n|---|---|\n| L6 | 0.000 |\n\n"
                                             "ID rate: Test_public: verse_get_hits rule within 20 mm\n")
    Image.new("RGB", (20, 20), (200, 10, 10)).save(st / "figures" / "dice_by_vertebra.png")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Benchmark"), nbformat.v4.new_code_cell("1+1")])
    nbformat.write(nb, str(st / "04_benchmark.ipynb"))
    write_run_record(st, {"profile": "ci", "seed": 0}, timings={"train": 12.5})
    out = report.build_report("ci")
    page = out.read_text()
    assert out == p.runs / "report.html"
    assert "Table 2" in page
    assert "Mean of Vertebrae" in page
    assert "0.869" in page
    assert "<p class=meta>ID rate: Test_public: verse_get_hits rule within 20 mm</p>" in page
    assert 'src="04_benchmark/figures/dice_by_vertebra.png"' in page
    assert 'href="04_benchmark/04_benchmark.html"' in page
    assert (st / "04_benchmark.html").exists()
    assert "01_curation</td><td><span class=missing>not run" in page
    assert json.loads((st / "run_record.json").read_text())["timings_s"]["train"] == 12.5
    assert "12.5" in page
