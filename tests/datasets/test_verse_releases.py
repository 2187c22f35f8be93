"""lib.datasets.verse on VerSe as downloaded: several releases, the challenge layout, duplicates,
00's check, the selection, the hold-out by subject and the benchmark's VerSe sets."""

from __future__ import annotations

import pandas as pd
import pytest

from lib.core.cases import split_cases
from lib.datasets import downloads, verse
from tests.helpers.verse_tree import CROPPED, FULL, write_bids_scan, write_downloads


@pytest.fixture
def downloads_root(tmp_path):
    root = tmp_path / "VerSe"
    return root, write_downloads(root)


def test_discovery_reads_every_release_and_layout_and_keeps_one_copy_per_scan(downloads_root):
    root, ct = downloads_root
    found = verse.discover_verse(root)
    s = found.scans.set_index("case_id")
    assert sorted(s.index) == ["sub-gl003_dir-ax", "sub-gl003_dir-sag", "sub-verse004", "sub-verse012", "sub-verse020",
                               "sub-verse033", "verse040_CT-orient"]
    assert found.per_release() == {"verse19training": 1, "verse19validation": 1, "verse20training": 4,
                                   "verse20_miccai/training": 1}
    # the duplicate: three copies (2019 BIDS, 2020 BIDS, challenge), the 2020 BIDS one kept
    assert s.loc["sub-verse012", "image"] == str(ct["012_v20"])
    dups = found.duplicates
    assert set(dups["scan_key"]) == {"sub-verse012"}
    assert set(dups["image"]) == {str(ct["012_v19"]), str(ct["012_v20"]), str(ct["012_challenge"])}
    assert dups.loc[dups["kept"], "image"].tolist() == [str(ct["012_v20"])]
    # subjects, layouts, centroid frames
    assert s.loc["sub-gl003_dir-sag", "subject"] == "sub-gl003"
    assert s.loc["verse040_CT-orient", "subject"] == "sub-verse040"
    assert s.loc["verse040_CT-orient", "layout"] == "challenge"
    assert s.loc["verse040_CT-orient", "ctd_frame"] == "challenge_iso_asl"
    assert s.loc["verse040_CT-orient", "centroids"].endswith("verse040_CT-orient_iso-ctd.json")
    assert s.loc["verse040_CT-orient", "mask"].endswith("verse040_CT-orient_seg.nii.gz")
    assert s.loc["sub-verse004", "ctd_frame"] == "bids"
    assert s.loc["sub-verse004", "mask"].endswith("derivatives/sub-verse004/sub-verse004_seg-vert_msk.nii.gz")


def test_a_bare_bids_root_is_one_release_named_after_it(tmp_path):
    root = tmp_path / "VerSe"  # what 00_sources writes: data/<profile>/sources/VerSe/rawdata
    write_bids_scan(root, "sub-verse004_dir-ax", FULL)
    rows = verse.find_verse_cases(root)
    assert [(r["case_id"], r["subject"], r["release"], r["layout"]) for r in rows] == [
        ("sub-verse004_dir-ax", "sub-verse004", "VerSe", "bids")]


def test_a_root_without_verse_says_what_was_looked_for_and_what_is_there(tmp_path):
    (tmp_path / "downloads" / "verse.zip.part").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        verse.select_pretraining_cases(tmp_path, progress=False)
    text = str(err.value)
    for expected in ("rawdata/sub-*/**/sub-*_ct.nii.gz", "_seg-vert_msk.nii.gz", "_seg-subreg_ctd.json",
                     "verseNNN", "_seg.nii.gz", "_iso-ctd.json", "downloads/, notes/", "dataset-verse19"):
        assert expected in text, expected
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verse.find_verse_cases(tmp_path / "nowhere")


def test_00_check_counts_unique_scans_per_release_and_names_missing_files(downloads_root):
    root, ct = downloads_root
    rep = downloads.verify_sources(root.parent, {"VerSe": 8}, check_headers=False)
    row = rep.table.set_index("source").loc["VerSe"]
    assert row["found"] == 7  # 9 copies, sub-verse012 three times
    assert "verse19training: 1" in row["detail"]
    assert "verse20training: 4" in row["detail"]
    assert "1 scan(s) found in several releases" in row["detail"]
    problems = {(p.path, p.problem) for p in rep.issues if p.source == "VerSe"}
    der = root / "dataset-verse19validation" / "derivatives" / "sub-verse020"
    assert (str(der / "sub-verse020_seg-vert_msk.nii.gz"), "scan sub-verse020 (verse19validation) has no mask") in problems
    assert (str(der / "sub-verse020_seg-subreg_ctd.json"),
            "scan sub-verse020 (verse19validation) has no centroid file") in problems
    assert any("expected 8 CT scans, found 7 unique" in p for _, p in problems)
    assert len(problems) == 3


def test_selection_keeps_the_complete_scans_of_every_release_once(downloads_root):
    root, ct = downloads_root
    usable, table = verse.select_pretraining_cases(root, progress=False)
    assert sorted(u[0] for u in usable) == ["sub-gl003_dir-ax", "sub-gl003_dir-sag", "sub-verse004", "sub-verse012"]
    assert dict(usable_row[:2] for usable_row in usable)["sub-verse012"] == str(ct["012_v20"])
    why = table.set_index("case_id")["reason"]
    assert why["sub-verse020"].startswith("mask missing")
    assert why["sub-verse033"].startswith("cropped")
    assert why["verse040_CT-orient"].startswith("cropped")
    assert {"subject", "release", "layout", "ctd_frame"} <= set(table.columns)


def test_split_by_subject_never_puts_a_subject_on_both_sides():
    cases = [(c, f"/x/{c}.nii.gz", f"/x/{c}_msk.nii.gz") for c in
             ("sub-gl003_dir-ax", "sub-gl003_dir-sag", "sub-verse004", "sub-verse012", "verse040_CT-orient")]
    subjects = {"sub-gl003_dir-ax": "sub-gl003", "sub-gl003_dir-sag": "sub-gl003"}
    gl003_held = 0
    for seed in range(12):
        train, held = verse.split_by_subject(cases, subjects, 1, seed=seed)
        sides = {c[0]: "train" for c in train} | {c[0]: "held" for c in held}
        assert sides["sub-gl003_dir-ax"] == sides["sub-gl003_dir-sag"]
        assert 1 <= len(held) <= 2
        assert sorted(train + held) == sorted(cases)
        gl003_held += sides["sub-gl003_dir-ax"] == "held"
    assert 0 < gl003_held < 12
    # one scan per subject: the same split as lib.core.cases.split_cases
    single = cases[2:]
    assert verse.split_by_subject(single, {}, 2, seed=3) == split_cases(single, 2, seed=3)
    # at least one subject trains, however many are asked for
    train, held = verse.split_by_subject(cases, subjects, 10, seed=0)
    assert train
    assert verse.verse_subject("verse040_CT-orient") == "sub-verse040"
    assert verse.verse_subject("sub-verse407_split-verse262") == "sub-verse407"


def _tables(tmp_path, downloads_root, held_subjects):
    """02's selection and split of the test downloads with ``held_subjects`` held out."""
    _, table = verse.select_pretraining_cases(downloads_root[0], progress=False)
    sel = tmp_path / "verse_selection.csv"
    table.to_csv(sel, index=False)
    usable = table[table["usable"]]
    pd.DataFrame({"case_id": usable["case_id"], "subject": usable["subject"],
                  "split": ["heldout" if s in held_subjects else "train" for s in usable["subject"]]}).to_csv(
        tmp_path / "split.csv", index=False)
    return tmp_path / "split.csv", sel


def test_test_verse_is_every_usable_scan_from_scratch_and_the_held_out_ones_after_pretraining(tmp_path, downloads_root):
    split, sel = _tables(tmp_path, downloads_root, {"sub-gl003"})
    scratch = verse.verse_test_sets(split, sel, pretrained_on_verse=False).set_index("case_id")["set"]
    assert sorted(scratch[scratch == "Test_VerSe"].index) == ["sub-gl003_dir-ax", "sub-gl003_dir-sag", "sub-verse004",
                                                              "sub-verse012"]
    assert sorted(scratch[scratch == "VerSe_cropped"].index) == ["sub-verse033", "verse040_CT-orient"]
    assert scratch["sub-verse020"] == ""  # no mask: in neither set
    warm = verse.verse_test_sets(split, sel, pretrained_on_verse=True)
    sets = warm.set_index("case_id")["set"]
    assert sorted(sets[sets == "Test_VerSe"].index) == ["sub-gl003_dir-ax", "sub-gl003_dir-sag"]
    assert sorted(sets[sets == "VerSe_cropped"].index) == ["sub-verse033", "verse040_CT-orient"]
    assert warm.set_index("case_id").loc["sub-verse004", "why"].startswith("usable, but trained 02_pretraining")
    text = verse.test_verse_definition(warm, pretrained_on_verse=True)
    assert text.startswith("Test_VerSe: 2 usable VerSe scan(s) of 1 subject, those 02_pretraining held out")
    assert "the 2 usable scans 02 trained on are left out" in text
    assert "VerSe_cropped: 2 cropped scans" in text
    assert "the paper's definition" in verse.test_verse_definition(
        verse.verse_test_sets(split, sel, pretrained_on_verse=False), pretrained_on_verse=False)
    cases = verse.verse_cases(warm)
    assert {(c.split, c.case_id) for c in cases} == {("Test_VerSe", "sub-gl003_dir-ax"), ("Test_VerSe", "sub-gl003_dir-sag"),
                                                     ("VerSe_cropped", "sub-verse033"),
                                                     ("VerSe_cropped", "verse040_CT-orient")}


def test_a_cropped_scan_of_a_subject_02_trained_on_stays_out_after_pretraining(tmp_path, downloads_root):
    root, _ = downloads_root
    write_bids_scan(root / "dataset-verse20training", "sub-verse004_dir-sag", CROPPED)
    split, sel = _tables(tmp_path, downloads_root, {"sub-gl003"})
    warm = verse.verse_test_sets(split, sel, pretrained_on_verse=True).set_index("case_id")
    assert warm.loc["sub-verse004_dir-sag", "set"] == ""
    assert warm.loc["sub-verse004_dir-sag", "why"] == "cropped, but its subject trained 02_pretraining's model"
    scratch = verse.verse_test_sets(split, sel, pretrained_on_verse=False).set_index("case_id")
    assert scratch.loc["sub-verse004_dir-sag", "set"] == "VerSe_cropped"
