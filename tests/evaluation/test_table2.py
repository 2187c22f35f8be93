"""lib.evaluation.table2: the paper's layout with the paper's cells only."""

from __future__ import annotations

import math

import pytest

from lib import evaluation as evaluate


def test_build_table2_layout_and_paper_cells(folders):
    gt_dir, pred_dir = folders
    _, s = evaluate.evaluate_folders(gt_dir, pred_dir, None, workers=0, progress=False)
    t = evaluate.build_table2({"test_public": s, "mine": s})
    assert list(t.index[:5]) == ["Cases", "Failed", "Missing", "C1", "C2"]
    assert list(t.index[-3:]) == ["L6", "Mean of Vertebrae", "Mean of Spine"]
    assert len(t) == 30
    assert t.loc["Cases", "test_public DSC"] == 3
    assert t.loc["Missing", "mine HD95"] == 1
    assert t.loc["Failed", "test_public DSC"] == 0
    assert math.isnan(t.loc["Cases", "test_public DSC (paper)"])
    assert t.loc["Mean of Vertebrae", "test_public DSC (paper)"] == 0.869
    assert t.loc["Mean of Vertebrae", "test_public HD95 (paper)"] == 5.40
    assert t.loc["Mean of Spine", "test_public HD95 (paper)"] == 1.0
    assert t.loc["L6", "test_public HD95 (paper)"] == 66.21
    assert t.loc["C5", "test_public DSC (paper)"] == 0.573
    assert math.isnan(t.loc["C5", "test_public HD95 (paper)"])  # not given: empty
    assert math.isnan(t.loc["C2", "test_public DSC (paper)"])
    assert t["mine DSC (paper)"].isna().all()  # a set the paper does not have
    assert t.loc["C1", "test_public DSC"] == pytest.approx(s["mean"]["C1"]["dice"]["mean"])
    assert math.isnan(t.loc["L6", "test_public DSC"])  # not in these truths
    assert t.loc["Mean of Vertebrae", "mine HD95"] == pytest.approx(s["mean_of_vertebrae"]["hd95"]["mean"])
    for col in ("ASSD", "NSD", "ID rate", "Loc. (mm)"):
        assert f"test_public {col}" in t.columns
    assert t.loc["Mean of Vertebrae", "mine Loc. (mm)"] == pytest.approx(s["mean_of_vertebrae"]["localisation_mm"]["mean"])
    assert math.isnan(t.loc["Mean of Spine", "mine Loc. (mm)"])
    assert "(paper)" not in " ".join(evaluate.build_table2({"test_public": s}, with_paper=False).columns)
    md = evaluate.table2_markdown(t)
    assert "| Mean of Vertebrae | " in md
    assert "| Cases | 3 | " in md  # counts as integers
    assert "⚠" not in md  # no failed case, no marker
    assert "pooled" in md
    assert evaluate.paper_set_name("Test_VerSe") == "Test_VerSe"
    assert evaluate.paper_set_name("test_private") == "Test_private"
