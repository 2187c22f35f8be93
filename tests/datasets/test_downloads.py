"""lib.datasets.downloads: what a download lacks is listed precisely, one row per path; the
archives are read as they unpack (Task03_Liver, COVID-19 masks, macOS ._ files, TCIA names)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from lib.datasets import downloads
from lib.datasets.ctspine1k import source_layout
from tests.helpers.curation_sources import write_covid, write_task03_liver, write_tcia_dicom


def test_verify_sources_lists_what_is_missing(generated, tmp_path):
    p, _ = generated
    root = tmp_path / "copy"
    shutil.copytree(p.sources, root)
    counts = {"COLONOG": 5, "HNSCC": 1, "MSD_T10": 2, "COVID19": 1, "VerSe": 4}
    rep = downloads.verify_sources(root, counts)
    assert rep.ok, rep.summary()
    assert set(rep.table["status"]) == {"ok"}
    # remove one VerSe mask, empty one COLONOG patient, truncate an MSD file, ask for more
    msk = next((root / "VerSe" / "derivatives").rglob("*_seg-vert_msk.nii.gz"))
    msk.unlink()
    pat = sorted((root / "COLONOG").iterdir())[0]
    shutil.rmtree(pat)
    pat.mkdir()
    liver = next((root / "MSD_T10" / "imagesTr").glob("*.nii.gz"))
    liver.write_bytes(liver.read_bytes()[:50])
    rep = downloads.verify_sources(root, dict(counts, COVID19=40))
    text = rep.summary()
    assert not rep.ok
    assert msk.name.replace("_seg-vert_msk.nii.gz", "") in text
    assert pat.name in text
    assert "without DICOM files" in text
    assert liver.name in text
    assert "expected 40 CT volumes, found" in text
    problems = rep.problems_table()
    assert (problems["path"] == str(pat)).sum() == 1
    assert (problems["path"] == str(liver)).sum() == 1
    rep = downloads.verify_sources(tmp_path / "nowhere", counts)
    assert "does not exist" in rep.summary()


def _rows(table: pd.DataFrame, path) -> pd.DataFrame:
    return table[table["path"] == str(path)]


def test_archives_as_they_unpack_are_accepted_and_what_is_skipped_is_listed(tmp_path):
    root = tmp_path / "sources"
    liver = write_task03_liver(root)
    covid = write_covid(root)
    write_tcia_dicom(root)
    # planted problems: a truncated imagesTs volume, an empty patient folder; planted junk: a
    # macOS companion inside a DICOM series folder, TCIA's LICENSE beside the patient folders
    broken = liver["task"] / "imagesTs" / "liver_133.nii.gz"
    broken.write_bytes(b"\x1f\x8b" + b"\x00" * 30)
    empty = root / "COLONOG" / "1.3.6.1.4.1.9328.50.4.0009"
    empty.mkdir()
    series = root / "COLONOG" / "1.3.6.1.4.1.9328.50.4.0001" / "01-01-2000-1-Abdomen-12345" / "2.000000-Supine 1.0 B30f-67890"
    (series / "._1-001.dcm").write_bytes(b"\x00\x05\x16\x07junk")
    (root / "COLONOG" / "LICENSE").write_text("CC BY 3.0\n")
    rep = downloads.verify_sources(root, {"COLONOG": 2, "HNSCC": 1, "MSD_T10": 4, "COVID19": 3})
    table = rep.table.set_index("source")
    assert table.loc["MSD_T10", "folder"] == "Task03_Liver"
    assert table.loc["MSD_T10", "found"] == 4  # liver_0, liver_1 (imagesTr), liver_132, liver_133 (imagesTs)
    assert table.loc["COVID19", "found"] == 2  # the two _seg masks are not CTs
    assert table.loc["COLONOG", "found"] == 2
    assert table.loc["HNSCC", "found"] == 1
    problems = rep.problems_table()
    assert list(problems.columns) == ["source", "path", "problem"]
    mine = problems[problems["source"] != "VerSe"]  # VerSe is not part of this tree
    # each planted problem exactly once, with its path; nothing else (no ._ file called unreadable)
    assert len(_rows(mine, broken)) == 1
    assert "unreadable NIfTI header" in _rows(mine, broken)["problem"].iloc[0]
    assert len(_rows(mine, empty)) == 1
    assert "without DICOM files" in _rows(mine, empty)["problem"].iloc[0]
    shortfall = _rows(mine, root / "COVID19")
    assert len(shortfall) == 1
    assert "expected 3 CT volumes, found 2" in shortfall["problem"].iloc[0]
    assert len(mine) == 3, mine.to_string()
    ignored = rep.ignored_table()
    for f in liver["appledouble"] + covid["appledouble"]:
        assert len(_rows(ignored, f)) == 1, f
        assert "AppleDouble" in _rows(ignored, f)["reason"].iloc[0]
    for f in covid["masks"]:
        assert "lesion mask" in _rows(ignored, f)["reason"].iloc[0]
    assert _rows(ignored, liver["labels"])["files"].iloc[0] == 3  # two label maps and a ._ file
    assert "label maps" in _rows(ignored, liver["labels"])["reason"].iloc[0]
    assert len(_rows(ignored, liver["dataset_json"])) == 1
    assert "AppleDouble" in _rows(ignored, series)["reason"].iloc[0]
    assert "patient folders are expected" in _rows(ignored, root / "COLONOG" / "LICENSE")["reason"].iloc[0]
    assert "source images" in rep.summary()


def test_msd_folder_under_its_other_name_and_both_names_at_once(tmp_path):
    root = tmp_path / "sources"
    write_task03_liver(root, folder="MSD_T10")
    rep = downloads.verify_sources(root, {"MSD_T10": 3})
    row = rep.table.set_index("source").loc["MSD_T10"]
    assert (row["folder"], row["found"], row["status"]) == ("MSD_T10", 3, "ok")
    assert not [p for p in rep.issues if p.source == "MSD_T10"]
    write_task03_liver(root)
    rep = downloads.verify_sources(root, {"MSD_T10": 3})
    msd = [p for p in rep.issues if p.source == "MSD_T10"]
    assert len(msd) == 1
    assert str(root / "Task03_Liver") in msd[0].problem
    assert str(root / "MSD_T10") in msd[0].problem
    with pytest.raises(source_layout.SourceLayoutError, match="Task03_Liver.*MSD_T10.*both exist"):
        source_layout.list_nifti_volumes(root, "MSD_T10")


def test_missing_images_folder_and_duplicate_volumes_are_named(tmp_path):
    root = tmp_path / "sources"
    liver = write_task03_liver(root)
    shutil.rmtree(liver["task"] / "imagesTs")
    dup = liver["task"] / "imagesTr" / "liver_1.nii"
    dup.write_bytes(b"")  # liver_1 twice (.nii beside .nii.gz)
    rep = downloads.verify_sources(root, {"MSD_T10": 150}, check_headers=False)
    msd = rep.problems_table().query("source == 'MSD_T10'")
    assert len(msd) == 2
    assert "imagesTs/ is missing" in _rows(msd, liver["task"])["problem"].iloc[0]
    twice = msd[msd["problem"].str.contains("two copies")].iloc[0]
    assert {twice["path"], twice["problem"].split(" as ")[1].split(":")[0]} == {str(dup), str(dup) + ".gz"}
    assert rep.table.set_index("source").loc["MSD_T10", "found"] == 2
