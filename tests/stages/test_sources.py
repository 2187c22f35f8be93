"""lib.stages.sources: what 00 shows (the closing note on generation time) and the tables of the paper check."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lib.core import params
from lib.stages import sources as stage_sources
from lib.synthetic import source_plan
from tests.helpers.curation_sources import write_covid, write_task03_liver


def test_closing_note_states_time_per_case_at_both_scales(generated, tmp_path):
    _, report = generated
    probe = stage_sources.probe_paper_scale(slices=2)
    assert probe["shape"] == "512x512x2"
    assert probe["full_case_s_estimate"] > 0
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"when": "now", "cases": [dict(scale="paper", fov="abdomen", shape="512x512x518",
                                                                spacing_mm="0.75, 0.75, 0.8", generate_s=15.7,
                                                                mvox_per_s=8.6)]}))
    table = stage_sources.timing_table(report.timings)
    assert set(table["source"]) == set(source_plan.RAW_SOURCES)
    note = stage_sources.timing_note(table, bench, probe)
    assert "s per volume" in note
    assert "512 x 512 x 542" in note
    assert "15.70 s per case" in note


def test_paper_check_writes_problems_and_ignored_entries_to_tables(tmp_path):
    root = tmp_path / "downloads"
    liver = write_task03_liver(root)
    covid = write_covid(root)
    values = params.load_params(params.params_file("paper", "00_sources"), "00_sources")
    values.update(sources_dir=str(root), expected_msd=3, expected_covid=2)
    ctx = stage_sources.start(values)
    report = stage_sources.verify(ctx)
    tables = {k: pd.read_csv(ctx.tables / v) for k, v in stage_sources.VERIFY_TABLES.items()}
    problems, ignored = tables["problems"], tables["ignored"]
    assert list(problems.columns) == ["source", "path", "problem"]
    assert len(problems) == len(report.issues) > 0  # COLONOG, HNSCC and VerSe are absent here
    assert set(problems.loc[problems["source"] == "HNSCC", "path"]) == {str(root / "HNSCC")}
    assert not (problems["source"].isin(["MSD_T10", "COVID19"])).any()
    for f in liver["appledouble"] + covid["appledouble"] + covid["masks"]:
        assert (ignored["path"] == str(f)).sum() == 1, f
    counts = tables["counts"].set_index("source")
    assert (counts.loc["MSD_T10", "found"], counts.loc["COVID19", "found"]) == (3, 2)
    with pytest.raises(SystemExit, match="source_problems.csv"):
        stage_sources.record(ctx, None, report)
    rec = json.loads((ctx.dir / "run_record.json").read_text())["extra"]
    assert rec["problems"] == report.problems
    assert rec["ignored"] == len(ignored)
    assert rec["tables"]["ignored"] == "tables/source_ignored.csv"
