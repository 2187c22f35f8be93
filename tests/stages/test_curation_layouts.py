"""Stage 01 on tiny trees laid out like the real downloads: Task03_Liver with imagesTr + imagesTs
and macOS ._ files, COVID-19-20 CTs with lesion masks, TCIA folder names, the released Path.csv
(one row spelled differently from the disk) and data_split.txt (IDs not on disk)."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from lib.core import params
from lib.datasets.ctspine1k.source_layout import SourceLayoutError
from lib.stages import curation
from lib.stages.curation import convert, discover, release, select
from tests.helpers.curation_sources import (
    write_covid,
    write_path_csv,
    write_task03_liver,
    write_tcia_dicom,
)

P1, P2 = "1.3.6.1.4.1.9328.50.4.0001", "1.3.6.1.4.1.9328.50.4.0002"
SPLIT = {"trainset": [P1, P2, "liver_0", "liver_132", "volume-covid19-A-0003_ct", "1.3.6.1.4.1.9328.50.4.0003"],
         "test_public": ["HN_P001", "liver_1", "liver_140"], "test_private": ["volume-covid19-A-0011_ct"]}
MISSING = {P2: "trainset", "1.3.6.1.4.1.9328.50.4.0003": "trainset", "liver_140": "test_public"}


@pytest.fixture
def downloads(tmp_path):
    """The sources folder of the paper profile, as the archives unpack, with Path.csv and the split file."""
    root = tmp_path / "sources"
    planted = {"liver": write_task03_liver(root), "covid": write_covid(root), "dicom": write_tcia_dicom(root),
               "lines": write_path_csv(root)}
    (root / "data_split.txt").write_text("".join(f"{s}:\n" + "".join(f"{r}.nii.gz\n" for r in ids) + "\n"
                                                 for s, ids in SPLIT.items()))
    return root, planted


def _start(root, tmp_path, **overrides):
    values = params.load_params(params.params_file("paper", "01_curation"), "01_curation")
    values.update(sources_dir=str(root), release_dir=str(tmp_path / "release"), min_slices=5, min_z_extent_mm=10.0,
                  workers=0, export_nnunet=False, figures=False, **overrides)
    return curation.start(values)


def test_paper_curation_on_the_downloads_as_they_unpack(downloads, tmp_path):
    root, planted = downloads
    series = next((root / "COLONOG" / P1).glob("*/2.000000-Supine*"))
    (series / "._1-001.dcm").write_bytes(b"\x00\x05\x16\x07junk")  # copied through a Mac
    ctx, cfg = _start(root, tmp_path)
    candidates, counts = curation.find_candidates(cfg)
    by_src = counts.set_index("source")
    assert by_src.loc["MSD_T10", "candidates"] == 3  # liver_0, liver_1 (imagesTr) + liver_132 (imagesTs)
    assert by_src.loc["COVID19", "candidates"] == 2  # the lesion masks are not CTs
    assert (by_src.loc["COLONOG", "patients"], by_src.loc["COLONOG", "candidates"]) == (2, 4)
    assert by_src.loc["HNSCC", "candidates"] == 3
    ignored = pd.read_csv(cfg.tables_dir / "ignored_files.csv")
    for f in planted["liver"]["appledouble"] + planted["covid"]["appledouble"] + planted["covid"]["masks"]:
        assert (ignored["path"] == f.relative_to(root).as_posix()).sum() == 1, f
    assert (ignored["path"] == "Task03_Liver/labelsTr").sum() == 1
    dicom = ignored[ignored["path"] == f"COLONOG/{P1}"]  # grouped per patient: no dated folder names
    assert (len(dicom), dicom["files"].iloc[0]) == (1, 1)
    assert "AppleDouble" in dicom["reason"].iloc[0]
    assert not ignored["path"].str.contains("Abdomen").any()

    # the split file lists two IDs the downloads lack: an error by default (split_unlisted: error)
    with pytest.raises(curation.SplitFileError, match=r"data_split.txt, line 12: test_public ID 'liver_140' "
                                                      r"matches no case") as err:
        curation.choose_series(cfg, candidates)
    assert [(p.id, p.line) for p in err.value.problems] == [("1.3.6.1.4.1.9328.50.4.0003", 7), ("liver_140", 12)]
    cfg = dataclasses.replace(cfg, split_unlisted="exclude")
    selection, split_ids, _ = curation.choose_series(cfg, candidates)
    conversion = curation.convert_series(cfg, selection)
    splits = curation.assign_split(cfg, conversion, split_ids)
    curation.write_outputs(cfg, selection, conversion, splits)
    identifiers, audit = curation.audit(ctx, cfg)  # raises on a leak: the error rows name no folder
    assert audit.passed
    curation.record(ctx, cfg, conversion, splits, audit, identifiers, selection)

    tables = {n: pd.read_csv(cfg.tables_dir / f"{n}.csv", dtype=str, keep_default_na=False)
              for n in ("selection", "exclusions", "provenance", "split_ids_missing", "not_selected", "split_problems")}
    sel = tables["selection"].set_index("release_id")
    assert sel.loc[P1, "rule"] == "Path.csv row"
    assert sel.loc[P1, "position"] == "prone"
    assert (sel.loc["HN_P001", "rule"], sel.loc["HN_P001", "time_point"]) == ("Path.csv row", "1")
    assert sel.loc["liver_132", "location"] == "Task03_Liver/imagesTs/liver_132.nii.gz"
    assert sel.loc["liver_132", "rule"] == "all volumes"
    # the unmatched Path.csv row: the patient is excluded, not given another series
    assert P2 not in sel.index
    err = tables["exclusions"][tables["exclusions"]["release_id"] == P2]
    assert len(err) == 1
    assert (err["check"].iloc[0], err["action"].iloc[0]) == ("path_csv_unmatched", "excluded")
    msg = err["message"].iloc[0]
    assert f"{root / 'Path.csv'}, line {planted['lines'][P2]}" in msg
    assert "in a study folder spelled differently" in msg
    assert f"COLONOG/{P2} (study folder 1 of 1, series folder 1 of 2, by name)" in msg
    assert "series folder 2 of 2" in msg
    assert any(n.startswith(f"ERROR COLONOG/{P2}") for n in selection.notes)
    prov = tables["provenance"].set_index("release_id")
    assert prov.loc[P1, "rule"] == "Path.csv row"
    assert prov.loc["HN_P001", "time_point"] == "1"
    included = set(prov.index)
    assert included == {P1, "HN_P001", "liver_0", "liver_1", "liver_132", "volume-covid19-A-0003_ct",
                        "volume-covid19-A-0011_ct"}
    # nothing dropped silently: every patient / volume found is included, excluded or not selected
    excluded = set(tables["exclusions"].query("action == 'excluded'")["release_id"])
    assert included | excluded | set(tables["not_selected"]["release_id"]) == selection.discovered
    missing = tables["split_ids_missing"]
    assert dict(zip(missing["release_id"], missing["split"], strict=True)) == MISSING
    why = dict(zip(missing["release_id"], missing["reason"], strict=True))
    assert why[P2] == "excluded: path_csv_unmatched"
    assert why["liver_140"].startswith("not found in the sources")
    problems = tables["split_problems"]
    assert list(zip(problems["id"], problems["line"], problems["split"], strict=True)) == [
        ("1.3.6.1.4.1.9328.50.4.0003", "7", "trainset"), ("liver_140", "12", "test_public")]
    assert set(problems["problem"]) == {"listed, matches no case"}
    assert set(problems["split_file"]) == {str(root / "data_split.txt")}  # outside the profile's folders: absolute
    rec = json.loads((ctx.dir / "run_record.json").read_text())["extra"]
    assert rec["split_ids_missing"]["count"] == 3
    assert sorted(rec["split_ids_missing"]["by_split"]["trainset"]) == sorted(r for r, s in MISSING.items()
                                                                                if s == "trainset")
    assert [e["release_id"] for e in rec["selection_errors"]] == [P2]
    assert rec["excluded_patients"] == 1
    assert rec["split_problems"]["count"] == 2
    assert rec["split_problems"]["split_unlisted"] == "exclude"


def test_path_csv_fallback_is_used_only_when_allowed_and_labelled(downloads, tmp_path):
    root, planted = downloads
    _, cfg = _start(root, tmp_path, path_csv_fallback=True, fallback_series=True)
    cands = discover.discover_candidates(cfg.sources_dir, cfg.sources)
    result = select.select_series(cands, cfg)
    chosen = {s.release_id: s for s in result.selections}
    assert not result.errors
    s2 = chosen[P2]
    assert s2.rule == "seeded choice: Path.csv row unmatched"
    assert s2.reason.startswith(f"Path.csv row unmatched (line {planted['lines'][P2]})")
    assert len(s2.fallbacks) == 1  # the seeded rule, with its fallback, stands in
    assert chosen[P1].rule == "Path.csv row"
    assert not chosen[P1].fallbacks
    assert any("path_csv_fallback" in n for n in result.notes)
    table = result.table().set_index("release_id")
    assert table.loc[P2, "rule"] == "seeded choice: Path.csv row unmatched"
    split = release.assign_splits([s.release_id for s in result.selections], cfg)
    inc = [convert.IncludedSeries(s.release_id, s.candidate.source, s.candidate.patient,
                                           s.candidate.source_key, s.reason, s.candidate.position, s.time_point,
                                           {}, root) for s in result.selections]
    prov = release.provenance_table(inc, split, result).set_index("release_id")
    assert prov.loc[P2, "rule"] == "seeded choice: Path.csv row unmatched"
    # had the chosen series failed a check, its fallback says whose rule it replaced
    other = s2.fallbacks[0]
    inc = [convert.IncludedSeries(P2, "COLONOG", P2, other.source_key, "fallback", other.position, "", {}, root)]
    prov = release.provenance_table(inc, release.assign_splits([P2], cfg), result)
    assert prov["rule"].iloc[0] == "fallback series (seeded choice: Path.csv row unmatched series failed a check)"


def test_both_msd_folder_names_stop_discovery_naming_both(downloads):
    root, _ = downloads
    write_task03_liver(root, folder="MSD_T10")
    with pytest.raises(SourceLayoutError, match="Task03_Liver and .*MSD_T10 both exist"):
        discover.discover_sources(root)
    found = discover.discover_sources(root, ("COVID19",))
    assert [c.release_id for c in found.candidates] == ["volume-covid19-A-0003_ct", "volume-covid19-A-0011_ct"]
