"""The real notebooks 00-06, run end to end with the ci profile through the pipeline (slow: ~7 min).

What the other tests check function by function, this one checks as a user meets it: every
notebook executes top to bottom with its ``params/ci`` file, writes its tables and run record,
a second run skips every stage, and the report is written.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lib.app import pipeline
from lib.core.paths import STAGES, for_profile

pytestmark = pytest.mark.slow

EXPECTED_TABLES = {
    "00_sources": ["sources_summary.csv"],
    "01_curation": ["cases.csv", "provenance.csv", "exclusions.csv", "table1.csv"],
    "02_pretraining": ["verse_selection.csv", "split.csv"],
    "03_annotation": ["rounds.csv", "ledger_entries.csv", "accepted_vs_truth.csv"],
    "04_benchmark": ["table2.csv", "table1.csv", "case_scores.csv"],
    "05_failure_l6": ["label_shift.csv", "correction_summary.csv", "l6_before_after.csv"],
    "06_failure_lowz": ["dice_vs_z.csv", "lowz_per_case.csv"],
}


def test_the_seven_notebooks_run_on_the_ci_profile_then_skip():
    log: list[str] = []
    assert pipeline.run("ci", log=log.append) == {s: "ran" for s in STAGES}, "\n".join(log)
    paths = for_profile("ci")
    for stage, tables in EXPECTED_TABLES.items():
        folder = paths.stage(stage)
        rec = json.loads((folder / "run_record.json").read_text())
        assert rec["parameters"]["profile"] == "ci", stage
        assert rec["environment"]["git_sha"], stage
        assert (folder / f"{stage}.ipynb").exists()
        for name in tables:
            assert (folder / "tables" / name).exists(), f"{stage}: tables/{name}"
    table2 = pd.read_csv(paths.tables("04_benchmark") / "table2.csv", index_col=0)
    dsc = table2.loc[["Mean of Vertebrae", "Mean of Spine"], [c for c in table2 if c.endswith(" DSC")]]
    assert ((dsc >= 0) & (dsc <= 1)).all().all()
    assert dsc.loc["Mean of Spine"].max() > 0.3
    rounds = pd.read_csv(paths.tables("03_annotation") / "rounds.csv")
    assert len(rounds) >= 2
    assert rounds["cases"].sum() == len(list(paths.release.glob("*/gt/*_seg.nii.gz")))
    assert (paths.runs / "report.html").exists()
    assert set(pipeline.run("ci", report=False, log=log.append).values()) == {"skipped"}
