"""lib.stages.curation: the split file never leaks a case, re-curation drops a stale mask, and the
stage tables store paths that survive a moved workspace (tiny trees laid out like the downloads)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from lib import io
from lib.core import paths
from lib.stages.curation import config, release, stage
from tests.helpers.curation_sources import _cfg, write_covid, write_task03_liver, write_tcia_dicom

TINY_Q = config.QualityThresholds(min_slices=5, min_z_extent_mm=10.0)
TYPO, REAL = "volume-covid19-A-0O11_ct", "volume-covid19-A-0011_ct"  # letter O for digit 0
SPLIT = {"trainset": ["liver_0", "liver_132", "volume-covid19-A-0003_ct"], "test_public": [TYPO],
         "test_private": ["liver_1"]}


def _write_split(path, split=SPLIT):
    path.write_text("".join(f"{s}:\n" + "".join(f"{r}.nii.gz\n" for r in ids) + "\n" for s, ids in split.items()))
    return path


@pytest.fixture
def nifti_sources():
    """MSD (liver_0, liver_1, liver_132) and COVID-19 (A-0003, A-0011) as the archives unpack,
    under the ci profile's sources folder, with a split file whose test_public ID has a typo."""
    root = paths.for_profile("ci").sources
    write_task03_liver(root)
    write_covid(root)
    _write_split(root / "data_split.txt")
    return root


def _curate(cfg):
    """The notebook's steps up to the stage tables."""
    candidates, _ = stage.find_candidates(cfg)
    selection, split_ids, notes = stage.choose_series(cfg, candidates)
    conversion = stage.convert_series(cfg, selection)
    splits = stage.assign_split(cfg, conversion, split_ids)
    placement, tables = stage.write_outputs(cfg, selection, conversion, splits)
    return selection, splits, placement, tables, notes


def _split_cfg(root, **kw):
    return _cfg(sources=("MSD_T10", "COVID19"), split_file=root / "data_split.txt", quality=TINY_Q, **kw)


def _table(cfg, name):
    return pd.read_csv(cfg.tables_dir / f"{name}.csv", dtype=str, keep_default_na=False)


def _in_release(cfg, rid):
    return sorted(p.parent.parent.name for p in cfg.release_dir.glob(f"*/data/{rid}.nii.gz"))


def test_a_typo_in_a_test_id_stops_curation_naming_file_line_and_the_case(nifti_sources):
    cfg = _split_cfg(nifti_sources)
    candidates, _ = stage.find_candidates(cfg)
    with pytest.raises(release.SplitFileError) as err:
        stage.choose_series(cfg, candidates)
    msg = str(err.value)
    assert f"{nifti_sources / 'data_split.txt'}, line 7: test_public ID {TYPO!r} matches no case; " \
           f"did you mean {REAL!r}?" in msg
    assert "split_unlisted" in msg
    (p,) = err.value.problems
    assert (p.id, p.line, p.split, p.suggestions) == (TYPO, 7, "test_public", (REAL,))
    assert not any(cfg.release_dir.glob("*/data/*.nii.gz"))  # stopped before anything was placed


@pytest.mark.parametrize("policy", ["exclude", "seeded"])
def test_the_misspelled_test_case_never_lands_in_any_split_and_both_sides_are_tabled(nifti_sources, policy):
    cfg = _split_cfg(nifti_sources, split_unlisted=policy)
    selection, splits, _, _, notes = _curate(cfg)
    assert REAL not in splits.assignment
    assert _in_release(cfg, REAL) == []
    assert any(TYPO in n and "line 7" in n for n in notes)
    problems = _table(cfg, "split_problems").set_index("id")
    assert problems.loc[TYPO, "problem"] == release.PROBLEM_NO_CASE
    assert (problems.loc[TYPO, "line"], problems.loc[TYPO, "suggestion"]) == ("7", REAL)
    assert problems.loc[TYPO, "split_file"] == "sources/data_split.txt"  # relative to data/ci
    assert problems.loc[REAL, "problem"] == release.PROBLEM_NOT_LISTED
    assert problems.loc[REAL, "suggestion"] == TYPO
    assert problems.loc[REAL, "action"].startswith("excluded from every split")
    assert f"sources/data_split.txt: included case {REAL!r} is not listed; did you mean test_public {TYPO!r} " \
           f"(line 7)?" == problems.loc[REAL, "message"]
    exc = _table(cfg, "exclusions")
    row = exc[exc["release_id"] == REAL]
    assert (row["check"].tolist(), row["action"].tolist()) == ([release.SPLIT_EXCLUDED_CHECK], ["excluded"])
    assert REAL not in set(_table(cfg, "cases")["release_id"]) | set(_table(cfg, "provenance")["release_id"])
    assert f"{REAL}.nii.gz" not in (cfg.release_dir / "data_split.txt").read_text()
    # the listed cases keep the split file's splits
    assert {r: splits.assignment[r] for r in ("liver_0", "liver_1", "liver_132")} == \
        {"liver_0": "trainset", "liver_1": "test_private", "liver_132": "trainset"}
    assert set(splits.origin.values()) == {"split file"}


def test_an_unlisted_case_is_an_error_or_split_by_the_seeded_rule_and_tabled(nifti_sources):
    fixed = dict(SPLIT, test_public=[REAL], trainset=["liver_0", "volume-covid19-A-0003_ct"])  # liver_132 unlisted
    _write_split(nifti_sources / "data_split.txt", fixed)
    cfg = _split_cfg(nifti_sources)
    with pytest.raises(release.SplitFileError, match="included case 'liver_132' is not listed") as err:
        _curate(cfg)
    assert [p.problem for p in err.value.problems] == [release.PROBLEM_NOT_LISTED]
    assert _in_release(cfg, "liver_132") == []

    seeded = _split_cfg(nifti_sources, split_unlisted="seeded")
    _, splits, _, _, _ = _curate(seeded)
    assert splits.origin["liver_132"] == "seeded"
    assert splits.origin[REAL] == "split file"
    assert splits.assignment[REAL] == "test_public"
    assert _in_release(seeded, "liver_132") == [splits.assignment["liver_132"]]
    (row,) = _table(seeded, "split_problems").to_dict(orient="records")
    assert (row["id"], row["problem"], row["line"]) == ("liver_132", release.PROBLEM_NOT_LISTED, "")
    assert row["action"] == f"seeded: {splits.assignment['liver_132']}"
    assert _table(seeded, "provenance").set_index("release_id").loc["liver_132", "split_origin"] == "seeded"


def test_the_run_record_lists_the_split_problems(nifti_sources):
    from lib.core import params
    from lib.stages import curation

    values = params.load_params(params.params_file("ci", "01_curation"), "01_curation")
    values.update(sources=["MSD_T10", "COVID19"], min_slices=5, min_z_extent_mm=10.0, export_nnunet=False,
                  figures=False)
    ctx, cfg = curation.start(values)
    assert (cfg.split_unlisted, cfg.profile) == ("error", "ci")
    cfg = dataclasses.replace(cfg, split_unlisted="exclude")
    candidates, _ = stage.find_candidates(cfg)
    selection, split_ids, _ = stage.choose_series(cfg, candidates)
    conversion = stage.convert_series(cfg, selection)
    splits = stage.assign_split(cfg, conversion, split_ids)
    stage.write_outputs(cfg, selection, conversion, splits)
    identifiers, audit = curation.audit(ctx, cfg)
    path = curation.record(ctx, cfg, conversion, splits, audit, identifiers, selection)
    rec = json.loads(path.read_text())["extra"]
    assert rec["split_problems"]["count"] == 2
    assert rec["split_problems"]["excluded_from_splits"] == [REAL]
    assert {(r["id"], r["problem"]) for r in rec["split_problems"]["rows"]} == {
        (TYPO, release.PROBLEM_NO_CASE), (REAL, release.PROBLEM_NOT_LISTED)}
    assert rec["included"] == len(splits.assignment) == 4
    assert rec["excluded_patients"] == 1
    assert rec["superseded"]["count"] == 0


def test_split_unlisted_must_be_a_known_policy():
    with pytest.raises(ValueError, match="split_unlisted: 'skip'"):
        _cfg(split_unlisted="skip")
    from lib.core import params

    values = params.load_params(params.params_file("paper", "01_curation"), "01_curation")
    assert config.CurationConfig.from_params(values, paths.for_profile("paper")).split_unlisted == "error"


# ----------------------------------------------------------------------------- re-curation, stale masks

P1 = "1.3.6.1.4.1.9328.50.4.0001"
SUPINE = f"{P1}/01-01-2000-1-Abdomen-12345/2.000000-Supine 1.0 B30f-67890"
PRONE = f"{P1}/01-01-2000-1-Abdomen-12345/3.000000-Prone 1.0 B30f-67891"


def _colonog_cfg(row):
    root = paths.for_profile("ci").sources
    (root / "Path.csv").write_text(row + "\n")
    return _cfg(sources=("COLONOG",), path_csv=root / "Path.csv", quality=TINY_Q)


def _mask_like(image, path, label=20):
    img = io.load_volume(image, canonical=False)
    m = np.zeros(img.shape, np.uint8)
    m[6:10, 6:10, 4:8] = label
    io.save_volume(m, img.affine, path)


def test_recuration_with_another_series_moves_the_old_mask_out_and_lists_it():
    write_tcia_dicom(paths.for_profile("ci").sources)
    cfg = _colonog_cfg(PRONE)
    sel1, split1, _, _, _ = _curate(cfg)
    prone_key = {s.release_id: s.candidate.source_key for s in sel1.selections}[P1]
    other = next(r for r in split1.assignment if r != P1)
    for rid in (P1, other):
        sp = split1.assignment[rid]
        _mask_like(cfg.release_dir / sp / "data" / f"{rid}.nii.gz", cfg.release_dir / sp / "gt" / f"{rid}_seg.nii.gz")
    old_mask = (cfg.release_dir / split1.assignment[P1] / "gt" / f"{P1}_seg.nii.gz").read_bytes()

    cfg = _colonog_cfg(SUPINE)  # Path.csv now names the other series of the patient
    sel2, split2, placement, tables, _ = _curate(cfg)
    supine_key = {s.release_id: s.candidate.source_key for s in sel2.selections}[P1]
    assert supine_key != prone_key
    assert not list(cfg.release_dir.glob(f"*/gt/{P1}_seg.nii.gz"))  # the stale mask is gone from the release
    assert (cfg.release_dir / split2.assignment[other] / "gt" / f"{other}_seg.nii.gz").exists()  # untouched
    (row,) = pd.read_csv(tables["superseded"], dtype=str).to_dict(orient="records")
    assert (row["release_id"], row["old_series"], row["new_series"]) == (P1, prone_key, supine_key)
    assert row["removed_mask"].startswith("runs:01_curation/superseded/")
    moved = paths.resolve_profile_path(row["removed_mask"], "ci")
    assert moved.read_bytes() == old_mask
    assert placement.superseded == [row]

    _, _, placement3, tables3, _ = _curate(cfg)  # the same selection again: nothing more moves
    assert placement3.superseded == []
    assert len(pd.read_csv(tables3["superseded"])) == 1


# ----------------------------------------------------------------------------- relative table paths

def test_profile_relative_paths_round_trip_and_old_absolute_paths_still_read(tmp_path):
    rel_data = paths.rel_to_profile(paths.for_profile("ci").release / "trainset" / "data" / "a.nii.gz", "ci")
    assert rel_data == "CTSpine1K/trainset/data/a.nii.gz"
    rel_runs = paths.rel_to_profile(paths.for_profile("ci").stage("01_curation") / "x.csv", "ci")
    assert rel_runs == "runs:01_curation/x.csv"
    outside = tmp_path / "elsewhere" / "b.nii.gz"
    assert paths.rel_to_profile(outside, "ci") == outside.as_posix()
    assert paths.resolve_profile_path(rel_data, "ci") == paths.data_root() / "ci" / rel_data
    assert paths.resolve_profile_path(rel_runs, "ci") == paths.runs_root() / "ci" / "01_curation" / "x.csv"
    assert paths.resolve_profile_path(str(outside), "ci") == outside  # an old table's absolute path
    with pytest.raises(ValueError, match="unknown profile"):
        paths.rel_to_profile(outside, "nope")


def test_cases_table_paths_find_the_release_after_the_workspace_moves(nifti_sources, tmp_path, monkeypatch):
    cfg = _cfg(sources=("MSD_T10", "COVID19"), quality=TINY_Q)  # seeded split
    _curate(cfg)
    cases = _table(cfg, "cases")
    assert not cases["path"].str.startswith("/").any()
    moved = tmp_path / "moved"
    shutil.copytree(paths.data_root(), moved / "data")
    shutil.copytree(paths.runs_root(), moved / "runs")
    shutil.rmtree(paths.data_root())
    monkeypatch.setenv("SPINE1K_DATA", str(moved / "data"))
    monkeypatch.setenv("SPINE1K_RUNS", str(moved / "runs"))
    table = pd.read_csv(moved / "runs" / "ci" / "01_curation" / "tables" / "cases.csv", dtype=str)
    for rid, split, text in table[["release_id", "split", "path"]].itertuples(index=False):
        f = paths.resolve_profile_path(text, "ci")
        assert f == moved / "data" / "ci" / "CTSpine1K" / split / "data" / f"{rid}.nii.gz"
        assert f.exists()
