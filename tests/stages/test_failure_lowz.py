"""lib.stages.failure_lowz helpers that need no model."""

from __future__ import annotations

from pathlib import Path

from lib.core.cases import Case
from lib.datasets.ctspine1k.ids import infer_source
from lib.stages.failure_lowz import pick_per_source


def _case(cid: str, split: str) -> Case:
    return Case(cid, Path(f"{cid}.nii.gz"), Path(f"{cid}_seg.nii.gz"), split)


def test_pick_per_source_takes_each_source_in_turn():
    ids = ["1.3.6.1.4.1.9328.50.4.0002", "1.3.6.1.4.1.9328.50.4.0004", "1.3.6.1.4.1.9328.50.4.0009",
           "HN_P003", "liver_49", "volume-covid19-A-0014_ct"]
    cases = [_case(i, "test_public") for i in ids] + [_case(i + "x", "test_private") for i in ids[:2]]
    picked = pick_per_source(cases, 3, infer_source)
    public = [c.case_id for c in picked if c.split == "test_public"]
    # listed order kept; the first three by ID would all be COLONOG and miss the thick-slice COVID-19 scans
    assert public == ["1.3.6.1.4.1.9328.50.4.0002", "HN_P003", "volume-covid19-A-0014_ct"]
    assert sorted(infer_source(c) for c in public) == ["COLONOG", "COVID19", "HNSCC"]
    assert [c.case_id for c in picked if c.split == "test_private"] == [ids[0] + "x", ids[1] + "x"]
    assert pick_per_source(cases, 0, infer_source) == cases
