"""lib.curation: selection, exclusion, de-identification + PHI audit, splits, release, Table 1,
exports. Sources are tiny synthetic DICOM/NIfTI trees written here (``lib.sources``'s DICOM
writer), with planted identifiers."""

from __future__ import annotations

import json
import zipfile

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from lib import io
from lib.io import atomic
from lib.stages.curation import config
from lib.stages.curation import convert
from lib.datasets.ctspine1k import release as ctspine1k_release
from lib.stages.curation import discover
from lib.datasets.ctspine1k import ids as release_ids
from lib.datasets import nnunet
from lib.datasets import paper_facts
from lib.stages.curation import phi
from lib.stages.curation import release
from lib.stages.curation import select
from lib.datasets.ctspine1k import split_file
from lib.datasets.ctspine1k import table1
from lib.datasets import verse
from lib.core import labels as L
from lib.core import paths
from lib.io.dicom_write import write_dicom_series

AFF = np.array([[2.0, 0, 0, -40.0], [0, 2.0, 0, -30.0], [0, 0, 2.5, -80.0], [0, 0, 0, 1]])
SHAPE = (40, 34, 44)  # 110 mm craniocaudal coverage


def _ct(seed: int, noise: float = 12.0, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y = np.mgrid[:nx, :ny]
    body = (((x - nx / 2) / (nx * 0.38)) ** 2 + ((y - ny / 2) / (ny * 0.38)) ** 2) < 1
    vol = np.where(body[..., None], 45.0, -1000.0) + rng.normal(0, noise, (nx, ny, nz))
    vol[nx // 2 - 2: nx // 2 + 2, ny // 2 - 9: ny // 2 - 5, :] = 800.0  # spine
    return np.rint(vol).astype(np.int16)


def _ident(i: int, token: str) -> dict:
    """Identifying tags with a planted token (uppercase letters + digits, like 00_sources)."""
    return {
        "PatientName": f"DOE{token}^JANE", "PatientBirthDate": f"195{i}0312", "StudyDate": f"200{i}0517",
        "InstitutionName": f"RIVERTON CLINIC {token}", "AccessionNumber": f"ACC{token}77",
        "ReferringPhysicianName": f"DR{token}^HOUSE", "OtherPatientIDs": f"MRN{token}12", "StudyID": f"S{token}",
        "PatientSex": "F" if i % 2 else "M", "PatientAge": f"0{50 + i}Y", "Manufacturer": "SYNTH",
        "ManufacturerModelName": "CT-9000", "KVP": "120", "ConvolutionKernel": "B30f",
    }


TOKENS = {}


def _series(root, source, patient, study, series, token, i, position="HFS", **kw):
    tags = dict(_ident(i, token), PatientID=patient, PatientPosition=position, SeriesNumber=kw.pop("number", 2))
    TOKENS[f"{source}/{patient}/{series}"] = token
    return write_dicom_series(_ct(i, kw.pop("noise", 12.0)), AFF, root / source / patient / study / series, tags, **kw)


@pytest.fixture
def sources(tmp_path):
    """A small source tree: COLONOG (two positions for some patients; one series per patient
    for the three faulty ones), HNSCC with three time points, MSD and COVID NIfTI volumes."""
    root = paths.for_profile("ci").sources
    st = "05-17-2003-Abdomen-COLONOGRAPHY-12345"
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0001", st, "2.000000-Supine-111", "TKA1B2", 1, "HFS")
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0001", st, "3.000000-Prone-112", "TKA1B2", 1, "HFP", number=3)
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0002", st, "2.000000-Supine-211", "TKC3D4", 2, "HFS")
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0002", st, "3.000000-Prone-212", "TKC3D4", 2, "HFP", number=3)
    # faulty series, one per patient: missing slice / mixed UIDs / no PixelSpacing
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0003", st, "2.000000-Supine-311", "TKE5F6", 3, drop_slices=[20])
    files = _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0004", st, "2.000000-Supine-411", "TKG7H8", 4,
                    series_uid="1.2.826.0.1.3680043.10.77.1")
    for p in files[::3]:
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.77.2"
        ds.save_as(p)
    files = _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0005", st, "2.000000-Supine-511", "TKJ9K2", 5)
    for p in files:
        ds = pydicom.dcmread(p)
        del ds.PixelSpacing
        ds.save_as(p)
    # a noisy patient: both positions fail the noise criterion
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0006", st, "2.000000-Supine-611", "TKL3M4", 6, noise=200.0)
    _series(root, "COLONOG", "1.3.6.1.4.1.9328.50.4.0006", st, "3.000000-Prone-612", "TKL3M4", 6, "HFP", noise=200.0,
            number=3)
    for tp, date in enumerate(["20040102", "20040401", "20040702"]):
        tags_i = 7
        token = "TKN5P6"
        tags = dict(_ident(tags_i, token), PatientID="HN_P001", StudyDate=date, PatientPosition="HFS", SeriesNumber=2)
        # time points written out of date order on disk
        folder = root / "HNSCC" / "HN_P001" / f"{date[4:6]}-{date[6:]}-{date[:4]}-NECK-{9 - tp}" / "2.000000-NECK-1"
        write_dicom_series(_ct(10 + tp), AFF, folder, tags, study_uid=f"1.2.826.0.1.3680043.10.88.{tp}")
    for stem, seed, descrip in [("liver_3", 20, "scan TKQ7R8"), ("liver_11", 21, "")]:
        img = nib.Nifti1Image(_ct(seed), AFF)
        img.header["descrip"] = descrip.encode()
        (root / "MSD_T10" / "imagesTr").mkdir(parents=True, exist_ok=True)
        nib.save(img, str(root / "MSD_T10" / "imagesTr" / f"{stem}.nii.gz"))
    (root / "COVID19").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_ct(30), AFF), str(root / "COVID19" / "volume-covid19-A-0014.nii.gz"))
    return root


def _cfg(**kw) -> config.CurationConfig:
    pp = paths.for_profile("ci")
    q = config.QualityThresholds(min_slices=10, min_z_extent_mm=50.0, max_noise_hu=80.0)
    base = dict(sources_dir=pp.sources, release_dir=pp.release, stage_dir=pp.stage("01_curation"), seed=0,
                quality=q, fallback_series=True)
    base.update(kw)
    return config.CurationConfig(**base)


def _run(cfg, split_file_ids=None):
    cands = discover.discover_candidates(cfg.sources_dir, cfg.sources)
    sel = select.select_series(cands, cfg)
    conv = convert.convert_selected(sel, cfg, progress=False)
    split = release.assign_splits([c.release_id for c in conv.included], cfg, split_file_ids)
    release.write_release(cfg, conv, split)
    release.write_stage_tables(cfg, sel, conv, split)
    return sel, conv, split


# ----------------------------------------------------------------------------- exclusions


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
        assert v.array.dtype == np.int16 and np.abs(v.affine - AFF).max() < 1e-3
    assert all((cfg.release_dir / s / "gt").is_dir() for s in paths.SPLITS)


def test_selection_rules_positions_time_point_and_path_table(sources, tmp_path):
    cfg = _cfg()
    cands = discover.discover_candidates(cfg.sources_dir)
    sel = {s.release_id: s for s in select.select_series(cands, cfg).selections}
    s1 = sel["1.3.6.1.4.1.9328.50.4.0001"]
    assert s1.candidate.position in ("supine", "prone") and len(s1.fallbacks) == 1
    assert s1.fallbacks[0].position != s1.candidate.position
    # same seed, same choice; the choice depends on the seed
    again = {s.release_id: s for s in select.select_series(cands, cfg).selections}
    assert again["1.3.6.1.4.1.9328.50.4.0001"].candidate.source_key == s1.candidate.source_key
    picks = {select.select_series(cands, _cfg(seed=k)).selections[0].candidate.position for k in range(12)}
    assert picks == {"supine", "prone"}
    # HNSCC: time point by study date, not folder order
    hn = sel["HN_P001"]
    assert "2004-01-02" not in hn.reason and hn.candidate.study_key == "1.2.826.0.1.3680043.10.88.0"
    last = {s.release_id: s for s in select.select_series(cands, _cfg(hnscc_time_point=-1)).selections}["HN_P001"]
    assert last.candidate.study_key == "1.2.826.0.1.3680043.10.88.2"
    # Path.csv: fixes the series of a patient, no fallback
    table = tmp_path / "Path.csv"
    table.write_text("1.3.6.1.4.1.9328.50.4.0002/05-17-2003-Abdomen-COLONOGRAPHY-12345/3.000000-Prone-212\n")
    chosen = {s.release_id: s for s in select.select_series(cands, _cfg(path_csv=table)).selections}
    c2 = chosen["1.3.6.1.4.1.9328.50.4.0002"]
    assert c2.candidate.position == "prone" and c2.reason == "Path.csv row" and not c2.fallbacks
    # subsets: seeded, of the requested size
    sub = select.select_series(cands, _cfg(subset_sizes={"MSD_T10": 1}))
    assert sum(s.candidate.source == "MSD_T10" for s in sub.selections) == 1
    assert [d["reason"] for d in sub.dropped] == ["not in the seeded subset of 1"]


# ----------------------------------------------------------------------------- PHI


def test_audit_finds_planted_identifiers_when_deidentification_is_off(sources):
    identifiers = phi.collect_identifiers(sources, every_file=False)
    kinds = {i.kind for i in identifiers}
    assert {"PatientName", "PatientBirthDate", "InstitutionName", "AccessionNumber", "StudyDate",
            "folder_name", "nifti_descrip"} <= kinds
    assert not any(i.value.startswith("1.3.6.1.4.1.9328") for i in identifiers)  # public ID: allowed

    cfg_off = _cfg(deidentify=False)
    _run(cfg_off)
    leaks = phi.audit_phi([cfg_off.release_dir, cfg_off.stage_dir], identifiers)
    where = {(lk.kind, lk.where.split(" ")[0]) for lk in leaks}
    assert any(k == "PatientName" for k, _ in where)
    assert any(w.startswith("zip") for _, w in where)                      # metadata sheet
    assert any(w.startswith("gunzipped") for _, w in where)                # NIfTI header text
    assert any(k == "nifti_descrip" for k, _ in where)                     # MSD header text kept
    with pytest.raises(phi.PHILeakError) as info:
        phi.require_no_phi([cfg_off.release_dir], identifiers)
    assert "TKA1B2" not in str(info.value)                                 # the report masks values


def test_audit_finds_nothing_when_deidentification_is_on(sources):
    identifiers = phi.collect_identifiers(sources, every_file=True)
    cfg = _cfg()
    _run(cfg)
    rep = phi.require_no_phi([cfg.release_dir, cfg.stage_dir], identifiers)
    assert rep.passed and rep.files > 20 and rep.identifiers > 40
    # the metadata sheet kept the non-identifying tags, with an age band instead of dates
    sheet = pd.read_excel(cfg.release_dir / "metadata_colonog.xlsx")
    assert {"ID", "split", "position", "manufacturer", "kvp", "sex", "age_band"} <= set(sheet.columns)
    assert set(sheet["age_band"]) == {"50-59"}
    assert not any(c in sheet.columns for c in ("PatientName", "StudyDate", "PatientBirthDate"))
    assert len(pd.read_excel(cfg.release_dir / "metadata_neck.xlsx")) == 1


@pytest.mark.parametrize("where", ["file_name", "csv_date_reformatted", "nifti_aux", "xlsx", "name_part"])
def test_audit_detects_each_kind_of_planted_leak(tmp_path, where):
    ids = [phi.make_identifier("PatientName", "SMITHQ7Z2^ANNABEL", "PN"),
           phi.make_identifier("StudyDate", "20060315", "DA"),
           phi.make_identifier("AccessionNumber", "A7ZQ2X99", "SH")]
    out = tmp_path / "out"
    out.mkdir()
    (out / "clean.csv").write_text("release_id,spacing\nliver_3,0.75\n2.25.1200603150,1\n")
    if where == "file_name":
        (out / "case_A7ZQ2X99.txt").write_text("x")
    elif where == "csv_date_reformatted":
        (out / "t.csv").write_text("a,b\n1,03/15/2006\n")
    elif where == "nifti_aux":
        img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
        img.header["aux_file"] = b"a7zq2x99"
        nib.save(img, str(out / "x.nii.gz"))
    elif where == "xlsx":
        pd.DataFrame({"n": ["Smith Q7Z2 note", "SMITHQ7Z2 ANNABEL"]}).to_excel(out / "m.xlsx", index=False)
    else:
        (out / "r.txt").write_text("seen by annabel.")
    leaks = phi.audit_phi([out], [i for i in ids if i])
    assert len(leaks) >= 1, where
    assert all("clean.csv" not in lk.path for lk in leaks)  # digit-bounded date: no false hit in a UID


def test_audit_against_planted_values_of_the_sources_agent(tmp_path):
    """The 00_sources generator plants identifiers (oracle phi_planted.json); curation builds its
    own list from the sources and must cover every planted value. The oracle is read by the
    test only."""
    import yaml

    from lib.synthetic import generate, oracle

    pp = paths.for_profile("ci")
    cfg_src = yaml.safe_load(open(paths.REPO_ROOT / "params" / "ci" / "00_sources.yaml"))
    cfg_src.update(n_colonog=1, n_msd=1, n_hnscc=1, n_covid=1, n_verse=0, n_low_noise=0, n_low_truncated=0,
                   n_low_missing_slices=0, hnscc_time_points=1, inplane_mm=6.0)
    generate.generate_sources(pp, cfg_src, progress=False)
    planted = oracle.read_phi_planted(pp)
    identifiers = phi.collect_identifiers(pp.sources, every_file=False)
    values = {i.value for i in identifiers}
    for p in planted["values"]:
        assert p["value"].strip() in values, p["keyword"]
    cfg = _cfg(quality=config.QualityThresholds(min_slices=5, min_z_extent_mm=20.0))
    _run(cfg)
    assert phi.require_no_phi([cfg.release_dir, cfg.stage_dir], identifiers).passed
    blob = b"".join(p.read_bytes() for p in cfg.tables_dir.glob("*.csv")).lower()
    assert not any(t.lower().encode() in blob for t in planted["tokens"])


# ----------------------------------------------------------------------------- IDs and splits


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
    assert assignment["weird-scan-7"] == "trainset" and assignment["volume-covid19-A-0320_ct"] == "test_private"
    assert any("ran together" in n for n in notes)
    counts = release_ids.count_by_source_split(assignment).set_index("source")
    assert counts.loc["COLONOG", ["trainset", "test_public", "test_private"]].tolist() == [2, 1, 0]
    assert counts.loc["HNSCC", "all"] == 2 and counts.loc["COVID19", "test_private"] == 2
    assert counts.loc["unknown", "trainset"] == 1 and counts.loc["total", "all"] == 11
    assert release_ids.unknown_ids(assignment) == ["weird-scan-7"]
    # used for a release: IDs not on disk and cases not in the file are reported, none dropped
    cfg = _cfg()
    res = release.assign_splits(["HN_P001", "liver_0", "weird-scan-7", "liver_5"], cfg, assignment)
    assert res.assignment["HN_P001"] == "trainset" and res.origin["liver_5"] == "seeded"
    assert res.unknown_ids == ["weird-scan-7"] and "weird-scan-7" in " ".join(res.notes)
    assert res.not_listed == ["liver_5"] and "HN_P002" in res.listed_missing
    # written back in the official format, read back identically
    out = split_file.write_split_file(tmp_path / "again.txt", assignment)
    assert split_file.read_split_file(out)[0] == assignment
    with pytest.raises(ValueError, match="before any"):
        (tmp_path / "bad.txt").write_text("liver_0.nii.gz\n")
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


# ----------------------------------------------------------------------------- resume


def test_rerun_skips_finished_work_and_resumes_after_a_kill(sources):
    cfg = _cfg()
    _, conv1, split1 = _run(cfg)
    snapshot = {p.relative_to(cfg.release_dir): p.read_bytes() for p in cfg.release_dir.rglob("*.nii.gz")}
    _, conv2, _ = _run(cfg)
    assert conv2.converted == 0 and conv2.reused == conv1.converted
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


# ----------------------------------------------------------------------------- Table 1, exports


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
    assert tot.patients == len(split.assignment) and tot.paper_patients == 1005
    assert t0[(t0.source == "COLONOG") & (t0.split == "all")].iloc[0].spacing_z_mm == pytest.approx(2.5)
    assert t0[(t0.source == "COLONOG") & (t0.split == "trainset")].iloc[0].paper_patients == 480
    masks = {"1.3.6.1.4.1.9328.50.4.0001": list(range(15, 26)),   # T8..L6: sacral lumbarization
             "1.3.6.1.4.1.9328.50.4.0002": list(range(16, 24)),   # T9..L4, no L5: lumbar sacralization
             "HN_P001": list(range(1, 9))}                         # C1..T1
    for rid, labs in masks.items():
        io.save_volume(_mask(labs), AFF, cfg.release_dir / split.assignment[rid] / "gt" / f"{rid}_seg.nii.gz")
    t1 = table1.build_table1(paths.for_profile("ci"), with_masks=True)
    tot = t1[(t1.source == "total") & (t1.split == "all")].iloc[0]
    assert tot.cases_with_mask == 3 and tot.vertebrae == 11 + 8 + 8
    assert (tot.cervical, tot.thoracic, tot.lumbar) == (7, 1 + 5 + 4, 6 + 4)
    assert tot.L6_cases == 1 and tot.sacralization_cases == 1 and tot.paper_vertebrae == 11172
    special = ctspine1k_release.find_special_cases(cfg.release_dir)
    assert special["L6"] == ["1.3.6.1.4.1.9328.50.4.0001"]
    assert special["lumbar_sacralization"] == ["1.3.6.1.4.1.9328.50.4.0002"]
    readme = ctspine1k_release.write_readme(cfg.release_dir).read_text()
    assert "sacral lumbarization (L6 labelled as 25): 1" in readme and "1.3.6.1.4.1.9328.50.4.0001" in readme

    # nnU-Net v2: trainset cases with masks -> imagesTr/labelsTr; tests -> imagesTs
    bad = next(r for r, s in split.assignment.items() if s == "trainset" and r not in masks)
    io.save_volume(np.zeros((5, 5, 5), np.uint8), AFF, cfg.release_dir / "trainset" / "gt" / f"{bad}_seg.nii.gz")
    ds = nnunet.export_nnunet(cfg.release_dir, tmp_path / "nnunet", 501, "CTSpine1K")
    assert ds.name == "Dataset501_CTSpine1K"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"]["background"] == 0 and meta["labels"]["L6"] == 25 and len(meta["labels"]) == 26
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    train_masked = [r for r in masks if split.assignment[r] == "trainset"]
    assert meta["numTraining"] == len(train_masked)
    for r in train_masked:
        assert (ds / "imagesTr" / f"{r}_0000.nii.gz").exists() and (ds / "labelsTr" / f"{r}.nii.gz").exists()
    tests = [r for r, s in split.assignment.items() if s != "trainset"]
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == sorted(f"{r}_0000.nii.gz" for r in tests)
    assert f"{bad}: mask shape" in (ds / "skipped.txt").read_text()
    assert nnunet.export_nnunet(cfg.release_dir, tmp_path / "nnunet", 501, "CTSpine1K") == ds  # idempotent

    # VerSe centroids: read back with the VerSe reader, they are the masks' centres of mass
    from lib.datasets.verse import read_verse_centroids

    files = verse.export_verse_centroids(cfg.release_dir, tmp_path / "ctd")
    assert len(files) == 4
    rid = "1.3.6.1.4.1.9328.50.4.0001"
    f = tmp_path / "ctd" / split.assignment[rid] / f"{rid}_seg-subreg_ctd.json"
    body = json.loads(f.read_text())
    assert body[0] == {"direction": ["P", "I", "R"]} and [d["label"] for d in body[1:]] == list(range(15, 26))
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
    assert row.check == "unreadable" and "gzip" in row.message
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


def test_xlsx_members_are_searched(tmp_path):
    """The audit opens zip containers: an identifier inside an .xlsx sheet is found."""
    p = tmp_path / "s.xlsx"
    pd.DataFrame({"a": ["ok", "RIVERTON CLINIC ZZ9QX1"]}).to_excel(p, index=False)
    with zipfile.ZipFile(p) as z:
        assert any(n.endswith(".xml") for n in z.namelist())
    ident = phi.make_identifier("InstitutionName", "RIVERTON CLINIC ZZ9QX1")
    leaks = phi.audit_phi([tmp_path], [ident])
    assert leaks and leaks[0].where.startswith("zip member")


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
