"""lib.stages.curation: discovery, selection, conversion with measured exclusions, the release, resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lib import io
from lib.core import labels as L
from lib.core import paths
from lib.datasets import nnunet, verse
from lib.datasets.ctspine1k import release as ctspine1k_release
from lib.datasets.ctspine1k import table1
from lib.io import atomic
from lib.stages.curation import config, convert, discover, release, select
from tests.helpers.curation_sources import AFF, SHAPE, _cfg, _run


def test_faulty_series_are_excluded_with_reasons_and_the_others_converted(sources):
    cfg = _cfg()
    sel, conv, split = _run(cfg)
    exc = pd.read_csv(cfg.tables_dir / "exclusions.csv", dtype=str)
    final = exc[exc["action"] == "excluded"]
    by_id = {r.release_id: r for r in final.itertuples()}
    assert by_id["1.3.6.1.4.1.9328.50.4.0003"].check == "missing_slices"
    assert "1 slice(s) missing" in by_id["1.3.6.1.4.1.9328.50.4.0003"].message
    assert by_id["1.3.6.1.4.1.9328.50.4.0004"].check == "mixed_series"
    assert by_id["1.3.6.1.4.1.9328.50.4.0005"].check == "missing_pixel_spacing"
    assert by_id["1.3.6.1.4.1.9328.50.4.0006"].check == "noise"
    assert float(by_id["1.3.6.1.4.1.9328.50.4.0006"].measured) > 150
    # the noisy patient's first pick was rejected, then its other position: two rows
    assert len(exc[exc["release_id"] == "1.3.6.1.4.1.9328.50.4.0006"]) == 2
    included = {c.release_id for c in conv.included}
    assert included == {"1.3.6.1.4.1.9328.50.4.0001", "1.3.6.1.4.1.9328.50.4.0002", "HN_P001", "liver_3",
                        "liver_11", "volume-covid19-A-0014_ct"}
    for rid, sp in split.assignment.items():
        f = cfg.release_dir / sp / "data" / f"{rid}.nii.gz"
        v = io.load_volume(f, canonical=False)
        assert v.array.dtype == np.int16
        assert np.abs(v.affine - AFF).max() < 1e-3
    assert all((cfg.release_dir / s / "gt").is_dir() for s in paths.SPLITS)


def test_selection_rules_positions_time_point_and_path_table(sources, tmp_path):
    cfg = _cfg()
    cands = discover.discover_candidates(cfg.sources_dir)
    sel = {s.release_id: s for s in select.select_series(cands, cfg).selections}
    s1 = sel["1.3.6.1.4.1.9328.50.4.0001"]
    assert s1.candidate.position in ("supine", "prone")
    assert len(s1.fallbacks) == 1
    assert s1.fallbacks[0].position != s1.candidate.position
    # same seed, same choice; the choice depends on the seed
    again = {s.release_id: s for s in select.select_series(cands, cfg).selections}
    assert again["1.3.6.1.4.1.9328.50.4.0001"].candidate.source_key == s1.candidate.source_key
    picks = {select.select_series(cands, _cfg(seed=k)).selections[0].candidate.position for k in range(12)}
    assert picks == {"supine", "prone"}
    # HNSCC: time point by study date, not folder order
    hn = sel["HN_P001"]
    assert "2004-01-02" not in hn.reason
    assert hn.candidate.study_key == "1.2.826.0.1.3680043.10.88.0"
    last = {s.release_id: s for s in select.select_series(cands, _cfg(hnscc_time_point=-1)).selections}["HN_P001"]
    assert last.candidate.study_key == "1.2.826.0.1.3680043.10.88.2"
    # Path.csv: fixes the series of a patient, no fallback
    table = tmp_path / "Path.csv"
    table.write_text("1.3.6.1.4.1.9328.50.4.0002/05-17-2003-Abdomen-COLONOGRAPHY-12345/3.000000-Prone-212\n")
    chosen = {s.release_id: s for s in select.select_series(cands, _cfg(path_csv=table)).selections}
    c2 = chosen["1.3.6.1.4.1.9328.50.4.0002"]
    assert c2.candidate.position == "prone"
    assert c2.reason == "Path.csv row"
    assert not c2.fallbacks
    # subsets: seeded, of the requested size
    sub = select.select_series(cands, _cfg(subset_sizes={"MSD_T10": 1}))
    assert sum(s.candidate.source == "MSD_T10" for s in sub.selections) == 1
    assert [d["reason"] for d in sub.dropped] == ["not in the seeded subset of 1"]


def test_rerun_skips_finished_work_and_resumes_after_a_kill(sources):
    cfg = _cfg()
    _, conv1, split1 = _run(cfg)
    snapshot = {p.relative_to(cfg.release_dir): p.read_bytes() for p in cfg.release_dir.rglob("*.nii.gz")}
    _, conv2, _ = _run(cfg)
    assert conv2.converted == 0
    assert conv2.reused == conv1.converted
    # a lost record (e.g. killed before it was written): only that series is converted again
    rec = next((cfg.work_dir / "records" / "MSD_T10").glob("liver_3.json"))
    rec.unlink()
    _, conv3, split3 = _run(cfg)
    assert conv3.converted == 1
    assert split3.assignment == split1.assignment
    after = {p.relative_to(cfg.release_dir): p.read_bytes() for p in cfg.release_dir.rglob("*.nii.gz")}
    assert after.keys() == snapshot.keys()
    assert all(after[k] == snapshot[k] for k in after if "liver_3" not in str(k))
    # a different seed moves cases between splits; masks travel with their images
    rid = next(iter(split1.assignment))
    sp = split1.assignment[rid]
    io.save_volume(np.zeros(SHAPE, np.uint8), AFF, cfg.release_dir / sp / "gt" / f"{rid}_seg.nii.gz")
    _, _, split4 = _run(_cfg(seed=11))
    new = split4.assignment[rid]
    assert (cfg.release_dir / new / "data" / f"{rid}.nii.gz").exists()
    assert (cfg.release_dir / new / "gt" / f"{rid}_seg.nii.gz").exists()
    n_images = sum(1 for _ in cfg.release_dir.glob("*/data/*.nii.gz"))
    assert n_images == len(split4.assignment)


def _mask(labels_present, shape=SHAPE):
    m = np.zeros(shape, np.uint8)
    for i, lab in enumerate(sorted(labels_present, key=L.level_index, reverse=True)):
        k0 = 12 + 3 * i  # caudal first: lowest label at z index 12 (30 mm above the bottom)
        m[18:22, 10:14, k0:k0 + 2] = lab
    return m


def test_table1_and_exports_with_masks(sources, tmp_path):
    cfg = _cfg()
    _, conv, split = _run(cfg)
    t0 = table1.build_table1(cfg.release_dir, with_masks=False)
    tot = t0[(t0.source == "total") & (t0.split == "all")].iloc[0]
    assert tot.patients == len(split.assignment)
    assert tot.paper_patients == 1005
    assert t0[(t0.source == "COLONOG") & (t0.split == "all")].iloc[0].spacing_z_mm == pytest.approx(2.5)
    assert t0[(t0.source == "COLONOG") & (t0.split == "trainset")].iloc[0].paper_patients == 480
    masks = {"1.3.6.1.4.1.9328.50.4.0001": list(range(15, 26)),   # T8..L6: sacral lumbarization
             "1.3.6.1.4.1.9328.50.4.0002": list(range(16, 24)),   # T9..L4, no L5: lumbar sacralization
             "HN_P001": list(range(1, 9))}                         # C1..T1
    for rid, labs in masks.items():
        io.save_volume(_mask(labs), AFF, cfg.release_dir / split.assignment[rid] / "gt" / f"{rid}_seg.nii.gz")
    t1 = table1.build_table1(paths.for_profile("ci"), with_masks=True)
    tot = t1[(t1.source == "total") & (t1.split == "all")].iloc[0]
    assert tot.cases_with_mask == 3
    assert tot.vertebrae == 11 + 8 + 8
    assert (tot.cervical, tot.thoracic, tot.lumbar) == (7, 1 + 5 + 4, 6 + 4)
    assert tot.L6_cases == 1
    assert tot.sacralization_cases == 1
    assert tot.paper_vertebrae == 11172
    special = ctspine1k_release.find_special_cases(cfg.release_dir)
    assert special["L6"] == ["1.3.6.1.4.1.9328.50.4.0001"]
    assert special["lumbar_sacralization"] == ["1.3.6.1.4.1.9328.50.4.0002"]
    readme = ctspine1k_release.write_readme(cfg.release_dir).read_text()
    assert "sacral lumbarization (L6 labelled as 25): 1" in readme
    assert "1.3.6.1.4.1.9328.50.4.0001" in readme

    # nnU-Net v2: trainset cases with masks -> imagesTr/labelsTr; tests -> imagesTs
    bad = next(r for r, s in split.assignment.items() if s == "trainset" and r not in masks)
    io.save_volume(np.zeros((5, 5, 5), np.uint8), AFF, cfg.release_dir / "trainset" / "gt" / f"{bad}_seg.nii.gz")
    ds = nnunet.export_nnunet(cfg.release_dir, tmp_path / "nnunet", 501, "CTSpine1K")
    assert ds.name == "Dataset501_CTSpine1K"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"]["background"] == 0
    assert meta["labels"]["L6"] == 25
    assert len(meta["labels"]) == 26
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["file_ending"] == ".nii.gz"
    train_masked = [r for r in masks if split.assignment[r] == "trainset"]
    assert meta["numTraining"] == len(train_masked)
    for r in train_masked:
        assert (ds / "imagesTr" / f"{r}_0000.nii.gz").exists()
        assert (ds / "labelsTr" / f"{r}.nii.gz").exists()
    tests = [r for r, s in split.assignment.items() if s != "trainset"]
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == sorted(f"{r}_0000.nii.gz" for r in tests)
    assert f"{bad}: {bad}_seg.nii.gz: [shape] shape (5, 5, 5) differs" in (ds / "skipped.txt").read_text()
    assert nnunet.export_nnunet(cfg.release_dir, tmp_path / "nnunet", 501, "CTSpine1K") == ds  # idempotent

    # VerSe centroids: read back with the VerSe reader, they are the masks' centres of mass
    from lib.datasets.verse import read_verse_centroids

    files = verse.export_verse_centroids(cfg.release_dir, tmp_path / "ctd")
    assert len(files) == 4
    rid = "1.3.6.1.4.1.9328.50.4.0001"
    f = tmp_path / "ctd" / split.assignment[rid] / f"{rid}_seg-subreg_ctd.json"
    body = json.loads(f.read_text())
    assert body[0] == {"direction": ["P", "I", "R"]}
    assert [d["label"] for d in body[1:]] == list(range(15, 26))
    got = read_verse_centroids(f, AFF, SHAPE)
    m = _mask(masks[rid])
    for lab in (15, 25):
        vox = np.argwhere(m == lab).mean(axis=0)
        np.testing.assert_allclose(got[lab], (AFF @ [*vox, 1])[:3], atol=1e-2)


def test_metadata_age_band_and_bad_inputs_named(sources, tmp_path):
    assert convert._age_band({"PatientAge": "093Y"}) == "90+"
    assert convert._age_band({"PatientBirthDate": "19600720", "StudyDate": "20050719"}) == "40-49"
    # a truncated NIfTI source is excluded with a reason naming the fault, the run goes on
    bad = paths.for_profile("ci").sources / "COVID19" / "volume-covid19-A-0099.nii.gz"
    raw = (paths.for_profile("ci").sources / "COVID19" / "volume-covid19-A-0014.nii.gz").read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    cfg = _cfg()
    _, conv, _ = _run(cfg)
    row = conv.exclusions[conv.exclusions.release_id == "volume-covid19-A-0099_ct"].iloc[0]
    assert row.check == "unreadable"
    assert "gzip" in row.message
    assert "volume-covid19-A-0014_ct" in {c.release_id for c in conv.included}
    with pytest.raises(FileNotFoundError, match="sources folder not found"):
        discover.discover_candidates(tmp_path / "nowhere")


def test_params_files_match_the_notebook():
    from lib.core import params

    for profile in ("synthetic", "ci", "paper"):
        values = params.load_params(params.params_file(profile, "01_curation"), "01_curation")
        assert values["profile"] == profile
        cfg = config.CurationConfig.from_params(values, paths.for_profile(profile))
        assert cfg.stage_dir.name == "01_curation"


def test_run_killed_during_placement_resumes_to_the_same_release(sources, monkeypatch):
    cfg = _cfg()
    calls = {"n": 0}
    real_move = atomic.move_atomic

    def dying_move(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real_move(src, dst)

    monkeypatch.setattr(release, "move_atomic", dying_move)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    monkeypatch.setattr(release, "move_atomic", real_move)
    assert sum(1 for _ in cfg.release_dir.glob("*/data/*.nii.gz")) == 2  # half-way
    _, conv, split = _run(cfg)
    assert conv.converted == 0  # nothing converted twice
    placed = sorted(p.name for p in cfg.release_dir.glob("*/data/*.nii.gz"))
    assert placed == sorted(f"{r}.nii.gz" for r in split.assignment)
    for rid, sp in split.assignment.items():
        assert (cfg.release_dir / sp / "data" / f"{rid}.nii.gz").exists()
    assert not list(cfg.release_dir.rglob("*.tmp*"))  # no half-written files
