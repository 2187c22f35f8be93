"""lib.datasets.ctspine1k: release IDs by source, the split file, the stratified split."""

from __future__ import annotations

import pandas as pd
import pytest

from lib.core import paths
from lib.datasets import paper_facts
from lib.datasets.ctspine1k import ids as release_ids
from lib.datasets.ctspine1k import split_file
from lib.stages.curation import release
from tests.helpers.curation_sources import _cfg


def test_release_ids_and_source_patterns():
    assert release_ids.release_id_for("COVID19", "volume-covid19-A-0014") == "volume-covid19-A-0014_ct"
    assert release_ids.release_id_for("MSD_T10", "liver_3") == "liver_3"
    pat = release_ids.merge_id_patterns({"VerSe": r"sub-verse\d{3}", "COLONOG": r"COLO-\d+"})
    cases = {"1.3.6.1.4.1.9328.50.4.0001.nii.gz": "COLONOG", "CTC-1018399231": "COLONOG", "COLO-7": "COLONOG",
             "HN_P031_seg.nii.gz": "HNSCC", "liver_199": "MSD_T10", "volume-covid19-A-0202_0_ct": "COVID19",
             "sub-verse004": "VerSe", "HN_P1": release_ids.UNKNOWN}
    for rid, src in cases.items():
        assert release_ids.infer_source(rid, pat) == src, rid
    assert release_ids.infer_source("COLO-7") == release_ids.UNKNOWN  # built-in table only
    with pytest.raises(ValueError, match="extra_id_patterns"):
        release_ids.merge_id_patterns({"X": "("})


def test_split_file_gives_per_source_counts_and_reports_unknown_ids(tmp_path):
    f = tmp_path / "data_split.txt"
    f.write_text("trainset:\n1.3.6.1.4.1.9328.50.4.0001.nii.gz\n1.3.6.1.4.1.9328.50.4.0002.nii.gz\nHN_P001.nii.gz\n"
                 "liver_0.nii.gz\nweird-scan-7.nii.gz\n\ntest_public:\r\nCTC-1018399231.nii.gz\nliver_1.nii.gz\n"
                 "volume-covid19-A-0003_ct.nii.gz\n\ntest_private:\nHN_P002.nii.gz\n"
                 "volume-covid19-A-0319_ct.nii.gzvolume-covid19-A-0320_ct.nii.gz\n")
    assignment, notes = split_file.read_split_file(f)
    assert assignment["weird-scan-7"] == "trainset"
    assert assignment["volume-covid19-A-0320_ct"] == "test_private"
    assert any("ran together" in n for n in notes)
    counts = release_ids.count_by_source_split(assignment).set_index("source")
    assert counts.loc["COLONOG", ["trainset", "test_public", "test_private"]].tolist() == [2, 1, 0]
    assert counts.loc["HNSCC", "all"] == 2
    assert counts.loc["COVID19", "test_private"] == 2
    assert counts.loc["unknown", "trainset"] == 1
    assert counts.loc["total", "all"] == 11
    assert release_ids.unknown_ids(assignment) == ["weird-scan-7"]
    # used for a release: a case not in the file is an error by default (split_unlisted: error) ...
    ids = ["HN_P001", "liver_0", "weird-scan-7", "liver_5"]
    with pytest.raises(release.SplitFileError, match="included case 'liver_5' is not listed; did you mean "
                                                     "test_public 'liver_1'"):
        release.assign_splits(ids, _cfg(), assignment)
    # ... or reported: liver_5 resembles test_public liver_1 (not on disk), so it is never seeded
    res = release.assign_splits(ids, _cfg(split_unlisted="seeded"), assignment)
    assert res.assignment["HN_P001"] == "trainset"
    assert "liver_5" not in res.assignment
    assert res.excluded == ["liver_5"]
    assert [p.id for p in res.problems] == ["liver_5"]
    assert res.unknown_ids == ["weird-scan-7"]
    assert "weird-scan-7" in " ".join(res.notes)
    assert res.not_listed == ["liver_5"]
    assert "HN_P002" in res.listed_missing
    # written back in the official format, read back identically
    out = split_file.write_split_file(tmp_path / "again.txt", assignment)
    assert split_file.read_split_file(out)[0] == assignment
    (tmp_path / "bad.txt").write_text("liver_0.nii.gz\n")
    with pytest.raises(ValueError, match="before any"):
        split_file.read_split_file(tmp_path / "bad.txt")


def test_stratified_split_has_the_paper_proportions_and_is_seeded():
    ids = ([f"1.3.6.1.4.1.9328.50.4.{i:04d}" for i in range(1, 785)] + [f"HN_P{i:03d}" for i in range(1, 32)]
           + [f"liver_{i}" for i in range(150)] + [f"volume-covid19-A-{i:04d}_ct" for i in range(40)])
    a = split_file.split_stratified(ids, seed=3)
    counts = release_ids.count_by_source_split(a).set_index("source")
    for src, want in paper_facts.PAPER_SPLIT_COUNTS.items():
        assert counts.loc[src, list(paths.SPLITS)].tolist() == [want[s] for s in paths.SPLITS], src
    assert split_file.split_stratified(ids, seed=3) == a
    assert split_file.split_stratified(ids, seed=4) != a
    small = split_file.split_stratified([f"liver_{i}" for i in range(10)], seed=0)
    assert sorted(pd.Series(small).value_counts().tolist()) == [2, 2, 6]
