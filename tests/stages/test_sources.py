"""lib.stages.sources: what 00 shows (the closing note on generation time)."""

from __future__ import annotations

import json

from lib.stages import sources as stage_sources
from lib.synthetic import source_plan


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
