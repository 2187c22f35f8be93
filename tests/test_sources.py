"""Tests of lib.sources: DICOM series writing (geometry through pydicom and SimpleITK), the
generated source layouts, planted identifiers, VerSe centroids, determinism, paper-mode checks."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from lib.datasets import downloads
from lib.datasets import verse as verse_files
from lib.imaging import resampling
from lib.io import dicom_read, dicom_write, load_volume
from lib.stages import sources as stage_sources
from lib.synthetic import generate, oracle, source_plan

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- DICOM writer


def _sitk_read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    m = np.eye(4)
    m[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    m[:3, 3] = img.GetOrigin()
    return arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ m  # LPS -> RAS


def _oblique_affine() -> np.ndarray:
    th = 0.3
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([0.7, 0.8, 1.5])
    a[:3, 3] = (10.0, -20.0, 30.0)
    return a


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("kind", ["axial", "oblique", "prone"])
def test_dicom_series_geometry_round_trips_through_simpleitk(tmp_path, order, kind):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 2500, (20, 16, 9)).astype(np.int16)
    if kind == "axial":
        aff = np.diag([0.75, 0.75, 0.8, 1.0])
        aff[:3, 3] = (-190.0, -170.0, -400.0)
    elif kind == "oblique":
        aff = _oblique_affine()
    else:  # prone: rows run R->L reversed (IOP -1,0,0,0,-1,0 in LPS) = RAS-increasing axes
        aff = np.diag([-0.8, -0.8, 2.0, 1.0]) @ np.diag([-1.0, -1.0, 1.0, 1.0])
    files = dicom_write.write_dicom_series(ct, aff, tmp_path / "s", {"PatientName": "A^B", "PatientID": "P1"},
                                       slice_order=order)
    assert len(files) == 9
    arr, got = _sitk_read(tmp_path / "s")
    np.testing.assert_array_equal(arr, ct)
    np.testing.assert_allclose(got, aff, atol=1e-3)


def test_dicom_tags_and_positions_read_back_with_pydicom(tmp_path):
    ct = np.full((12, 10, 5), 40, np.int16)
    ct[0, 0, :] = -1024
    aff = np.diag([-0.75, -0.75, 2.0, 1.0])  # what a supine HFS scanner writes: IOP 1,0,0,0,1,0
    aff[:3, 3] = (200.0, 180.0, -300.0)
    tags = {"PatientName": "DOE^JANE", "PatientID": "X7", "PatientBirthDate": "19500101", "InstitutionName": "H",
            "AccessionNumber": "A1", "StudyDate": "20070101", "KVP": "120", "SliceThickness": "2.5"}
    files = dicom_write.write_dicom_series(ct, aff, tmp_path / "s", tags, slice_order="descending", drop_slices=(2,))
    assert len(files) == 4
    dss = [pydicom.dcmread(f) for f in files]
    ds = dss[0]
    assert ds.SOPClassUID == dicom_write.CT_IMAGE_STORAGE and ds.Modality == "CT"
    assert str(ds.PatientName) == "DOE^JANE" and ds.PatientBirthDate == "19500101" and ds.KVP == "120"
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.75, 0.75])
    assert float(ds.SliceThickness) == 2.5  # tags may state a thickness other than the spacing
    # descending: instance 1 is the most superior slice; the dropped slice leaves a 4 mm gap
    by_inst = sorted(dss, key=lambda d: int(d.InstanceNumber))
    z = [float(d.ImagePositionPatient[2]) for d in by_inst]
    assert z == sorted(z, reverse=True)
    assert sorted(np.round(np.diff(sorted(z)), 3).tolist()) == [2.0, 2.0, 4.0]
    # HU through RescaleSlope/Intercept; LPS position of voxel (0, 0, 0)
    hu = by_inst[-1].pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu[0, 0] == -1024 and hu[5, 5] == 40
    np.testing.assert_allclose([float(v) for v in by_inst[-1].ImagePositionPatient], [-200.0, -180.0, -300.0])
    # geometry keywords come from the affine only
    with pytest.raises(ValueError, match="PixelSpacing"):
        dicom_write.write_dicom_series(ct, aff, tmp_path / "t", {"PixelSpacing": [1, 1]})


def test_dicom_series_write_is_atomic_and_cleans_up_after_a_killed_run(tmp_path):
    ct = np.zeros((6, 5, 4), np.int16)
    stale = tmp_path / ".s.abc123"
    stale.mkdir()
    (stale / "1-001.dcm").write_bytes(b"half")
    first = dicom_write.write_dicom_series(ct, np.eye(4), tmp_path / "s", {"PatientName": "X"})
    again = dicom_write.write_dicom_series(ct[:, :, :2], np.eye(4), tmp_path / "s", {"PatientName": "X"})
    assert len(first) == 4 and len(again) == 2
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [p.name for p in again]  # replaced, no leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # stale and temporary folders gone


def test_dicom_files_are_what_pydicom_itself_writes(tmp_path):
    ct = np.arange(6 * 5 * 3, dtype=np.int16).reshape(6, 5, 3)
    files = dicom_write.write_dicom_series(ct, np.eye(4), tmp_path / "s", {"PatientName": "X"})
    ds = pydicom.dcmread(files[1])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert buf.getvalue() == files[1].read_bytes()


# ----------------------------------------------------------------------------- VerSe centroids


@pytest.mark.parametrize("axcodes", [("P", "I", "R"), ("L", "A", "S"), ("R", "P", "I")])
def test_verse_centroid_json_round_trips(tmp_path, axcodes):
    ras = np.diag([0.8, 0.9, 1.5, 1.0])
    ras[:3, 3] = (-30.0, 12.0, -200.0)
    arr = np.zeros((40, 30, 20), np.int16)
    stored, aff = resampling.reorient_array(arr, ras, axcodes)
    cents = {20: (-10.0, 20.0, -190.0), 28: (-5.5, 22.25, -180.0)}
    path = verse_files.write_verse_centroids(tmp_path / "x_ctd.json", cents, aff, stored.shape)
    body = json.loads(path.read_text())
    assert body[0] == {"direction": ["P", "I", "R"]}
    assert [e["label"] for e in body[1:]] == [28, 20]  # craniocaudal: T13 before L1
    back = verse_files.read_verse_centroids(path, aff, stored.shape)
    for lab, c in cents.items():
        np.testing.assert_allclose(back[lab], c, atol=2e-3)
    # coordinates are voxel indices in P, I, R: X grows posteriorly
    x_of = {e["label"]: e["X"] for e in body[1:]}
    assert x_of[20] > x_of[28]  # label 20 lies at y=20 < 22.25 (more posterior)


# ----------------------------------------------------------------------------- generated sources


def _tiny_cfg() -> dict:
    cfg = yaml.safe_load((REPO / "params" / "ci" / "00_sources.yaml").read_text())
    cfg.update(inplane_mm=4.0, z_colonog_mm=4.0, z_hnscc_mm=4.0, z_msd_choices_mm=[4.0, 5.0], z_verse_mm=4.0)
    return cfg


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One tiny generated source tree shared by the module (fixed folders, not env-derived)."""
    root = tmp_path_factory.mktemp("data") / "ci"
    p = SimpleNamespace(profile="ci", sources=root / "sources", oracle=root / "oracle")
    report = generate.generate_sources(p, _tiny_cfg(), workers=0, progress=False)
    return p, report


def test_generation_reports_every_volume(generated):
    p, report = generated
    assert not report.failures
    idx = oracle.read_index(p)
    assert len(idx) == len(source_plan.plan_sources(_tiny_cfg())) == len(report.index)
    assert set(idx["source"]) == set(source_plan.RAW_SOURCES)
    assert {"L6", "L5_missing", "transitional", "normal"} <= set(idx["variant"])
    assert {"noise", "truncated", "missing_slices"} == set(idx.loc[idx["quality"] == "low", "quality_reason"])
    assert idx["metal"].any()
    verse = idx[idx["source"] == "VerSe"]
    assert {"L6", "T11", "T13"} <= set("+".join(verse["variant"]).split("+"))


def test_source_layouts_mirror_the_archives(generated):
    p, _ = generated
    s = Path(p.sources)
    col = sorted((s / "COLONOG").iterdir())
    assert all(d.name.startswith("1.3.6.1.4.1.9328.50.4.") for d in col)
    for d in col:
        series = sorted(d.glob("*/*"))
        assert len(series) == 2  # prone + supine in one study
        assert all(len(list(x.glob("*.dcm"))) > 10 for x in series)
        positions = {pydicom.dcmread(next(x.glob("*.dcm")), stop_before_pixels=True).PatientPosition for x in series}
        assert positions == {"HFS", "HFP"}
    hn = sorted((s / "HNSCC").iterdir())
    assert [d.name for d in hn] == ["HN_P001"] and len(list(hn[0].iterdir())) == 3  # three time points
    assert list((s / "MSD_T10" / "imagesTr").glob("liver_*.nii.gz"))
    assert list((s / "COVID19").glob("volume-covid19-A-0*.nii.gz"))
    for ct in (s / "VerSe" / "rawdata").glob("sub-verse*/*_ct.nii.gz"):
        stem = ct.name[: -len("_ct.nii.gz")]
        der = s / "VerSe" / "derivatives" / ct.parent.name
        assert (der / f"{stem}_seg-vert_msk.nii.gz").exists() and (der / f"{stem}_seg-subreg_ctd.json").exists()
    # no truth next to the CTSpine1K sources: no masks, no manifest
    leaked = [f for f in s.rglob("*") if f.is_file() and "VerSe" not in f.parts
              and ("seg" in f.name or f.suffix in (".csv", ".json") and f.name != "dataset.json")]
    assert not leaked


def test_headers_state_the_planned_z_spacing(generated):
    p, _ = generated
    idx = oracle.read_index(p)
    for _, r in idx.iterrows():
        img = Path(p.sources) / r["image_path"]
        if img.is_dir():
            dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(img.glob("*.dcm"))]
            z = np.sort([float(d.ImagePositionPatient[2]) for d in dss])
            steps = np.round(np.diff(z), 3)
            assert np.isclose(np.min(steps), r["spacing_z_mm"], atol=1e-3)
            assert np.isclose(float(dss[0].SliceThickness), r["slice_thickness_mm"], atol=1e-3)
            if r["quality_reason"] == "missing_slices":
                assert np.max(steps) > 2 * r["spacing_z_mm"]
            else:
                assert np.allclose(steps, r["spacing_z_mm"], atol=1e-3)
        else:
            zooms = sorted(nib.load(str(img)).header.get_zooms()[:3])
            np.testing.assert_allclose(zooms, sorted([r["spacing_x_mm"], r["spacing_y_mm"], r["spacing_z_mm"]]),
                                       atol=1e-4)


def test_dicom_sources_convert_with_the_truth_geometry(generated):
    p, _ = generated
    idx = oracle.read_index(p)
    for _, r in idx[idx["source"].isin(["COLONOG", "HNSCC"]) & (idx["quality"] == "ok")].iterrows():
        arr, aff = _sitk_read(Path(p.sources) / r["image_path"])
        truth = nib.load(str(Path(p.oracle) / r["mask_path"]))
        assert arr.shape == truth.shape
        np.testing.assert_allclose(aff, truth.affine, atol=1e-3)
        mask = np.asarray(truth.dataobj)
        assert arr[mask > 0].mean() > 150  # labelled voxels are bone in the CT
        assert {int(v) for v in r["labels"].split()} == {int(v) for v in np.unique(mask) if v}
        ds = pydicom.dcmread(next((Path(p.sources) / r["image_path"]).glob("*.dcm")), stop_before_pixels=True)
        assert ds.SeriesInstanceUID == r["source_key"]


def test_planted_identifiers_are_in_the_dicom_tags(generated):
    p, _ = generated
    phi = oracle.read_phi_planted(p)
    assert phi["tokens"]
    by_key: dict[str, list[dict]] = {}
    for v in phi["values"]:
        by_key.setdefault(v["source_key"], []).append(v)
    idx = oracle.read_index(p).set_index("source_key")
    checked = 0
    for key, vals in by_key.items():
        r = idx.loc[key]
        img = Path(p.sources) / r["image_path"]
        if not img.is_dir():
            hdr = nib.load(str(img)).header
            assert vals[0]["token"] in hdr["descrip"].tobytes().decode()
            continue
        ds = pydicom.dcmread(next(img.glob("*.dcm")), stop_before_pixels=True)
        for v in vals:
            if v["keyword"] == "folder_name":
                assert v["value"] in str(img)
                continue
            assert str(getattr(ds, v["keyword"])) == v["value"]
            checked += 1
    assert checked > 20
    # tokens are unique per patient
    pats = {(v["patient_id"], v["token"]) for v in phi["values"] if v["token"] and v["keyword"] == "PatientName"}
    assert len({t for _, t in pats}) == len(pats)


def test_verse_masks_centroids_and_grids(generated):
    p, _ = generated
    idx = oracle.read_index(p)
    verse = idx[idx["source"] == "VerSe"]
    differs = 0
    for _, r in verse.iterrows():
        ct_path = Path(p.sources) / r["image_path"]
        stem = ct_path.name[: -len("_ct.nii.gz")]
        der = ct_path.parent.parent.parent / "derivatives" / ct_path.parent.name
        ct = nib.load(str(ct_path))
        msk = nib.load(str(der / f"{stem}_seg-vert_msk.nii.gz"))
        differs += not np.allclose(ct.header.get_zooms(), msk.header.get_zooms())
        back = verse_files.read_verse_centroids(der / f"{stem}_seg-subreg_ctd.json", ct.affine, ct.shape)
        truth = oracle.load_centroids(p, "VerSe", r["source_key"])
        assert set(back) == set(truth)
        for lab in truth:
            np.testing.assert_allclose(back[lab], truth[lab], atol=0.01)
        if np.allclose(ct.header.get_zooms(), msk.header.get_zooms()):
            np.testing.assert_array_equal(np.asarray(msk.dataobj), np.asarray(nib.load(str(Path(p.oracle) / r["mask_path"])).dataobj))
    assert differs >= 1


def test_same_seed_same_bytes(tmp_path):
    items = source_plan.plan_sources(_tiny_cfg())
    picked = [next(i for i in items if i["fmt"] == "dicom"), next(i for i in items if i["fmt"] == "verse")]
    trees = []
    for name in ("a", "b"):
        for it in picked:
            generate.generate_item(dict(it, sources_root=str(tmp_path / name / "s"), oracle_root=str(tmp_path / name / "o")))
        files = sorted(f for f in (tmp_path / name).rglob("*") if f.is_file())
        trees.append({str(f.relative_to(tmp_path / name)): f.read_bytes() for f in files})
    assert trees[0].keys() == trees[1].keys() and len(trees[0]) > 20
    assert all(trees[0][k] == trees[1][k] for k in trees[0])
    assert source_plan.plan_sources(_tiny_cfg()) == items
    other = source_plan.plan_sources(dict(_tiny_cfg(), seed=1))
    assert [i["spec"]["seed"] for i in other] != [i["spec"]["seed"] for i in items]


def test_rerun_skips_finished_volumes(generated):
    p, report = generated
    again = generate.generate_sources(p, _tiny_cfg(), workers=0, progress=False)
    assert again.skipped == len(report.index)
    assert again.index.equals(report.index)


def test_synthetic_profile_plants_enough_variants():
    cfg = yaml.safe_load((REPO / "params" / "synthetic" / "00_sources.yaml").read_text())
    items = source_plan.plan_sources(cfg)
    ls = [i for i in items if i["source"] in ("COLONOG", "MSD_T10") and i["quality"] == "ok"]
    per_patient = {i["patient_id"]: i["variant"] for i in ls}
    n = len(per_patient)
    l6 = sum(v == "L6" for v in per_patient.values())
    l5 = sum(v == "L5_missing" for v in per_patient.values())
    # a 20 % test split of these patients holds >= 3 L6 and >= 2 missing-L5 on average
    assert 0.2 * l6 >= 2.5 and 0.2 * l5 >= 1.8
    assert 40 <= n <= 60
    assert all(i["spec"]["fov"] == "abdomen" for i in ls if i["variant"] != "normal")
    # CTSpine1K-source patients: about 60, every source >= 6, COLONOG the majority
    pats = {(i["source"], i["patient_id"]) for i in items if i["source"] != "VerSe"}
    counts = {s: sum(1 for x in pats if x[0] == s) for s in source_plan.CTSPINE1K_SOURCES}
    assert 50 <= sum(counts.values()) <= 70 and min(counts.values()) >= 6
    assert counts["COLONOG"] == max(counts.values())


# ----------------------------------------------------------------------------- paper mode


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
    assert pat.name in text and "without DICOM files" in text
    assert liver.name in text
    assert "COVID19: expected 40 volumes" in text
    rep = downloads.verify_sources(tmp_path / "nowhere", counts)
    assert "does not exist" in rep.summary()


def test_load_source_volume_is_canonical(generated):
    p, _ = generated
    idx = oracle.read_index(p)
    for src in ("COLONOG", "MSD_T10", "VerSe"):
        r = idx[idx["source"] == src].iloc[0]
        vol = dicom_read.read_source_volume(Path(p.sources), r["image_path"])
        assert np.all(np.diag(vol.affine)[:3] > 0)  # RAS+
        truth = oracle.load_truth(p, src, r["source_key"], vol)
        assert truth.shape == vol.shape and truth.any()
        if src != "COLONOG":
            ref = load_volume(Path(p.sources) / r["image_path"])
            np.testing.assert_array_equal(ref.array, vol.array)


def test_closing_note_states_time_per_case_at_both_scales(generated, tmp_path):
    _, report = generated
    probe = stage_sources.probe_paper_scale(slices=2)
    assert probe["shape"] == "512x512x2" and probe["full_case_s_estimate"] > 0
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"when": "now", "cases": [dict(scale="paper", fov="abdomen", shape="512x512x518",
                                                                spacing_mm="0.75, 0.75, 0.8", generate_s=15.7,
                                                                mvox_per_s=8.6)]}))
    table = stage_sources.timing_table(report.timings)
    assert set(table["source"]) == set(source_plan.RAW_SOURCES)
    note = stage_sources.timing_note(table, bench, probe)
    assert "s per volume" in note and "512 x 512 x 542" in note and "15.70 s per case" in note


def test_official_split_holds_the_variants_each_test_split_needs():
    import pandas as pd

    from lib.synthetic.source_plan import official_split

    rows = []
    for i in range(40):
        variant = "L6" if i % 4 == 0 else ("L5_missing" if i % 4 == 1 else "normal")
        rows.append(dict(source="COLONOG", patient_id=f"1.3.6.1.4.1.9328.50.4.{i:04d}", source_key=f"uid{i}",
                         quality="ok", variant=variant))
    rows += [dict(source="MSD_T10", patient_id=f"liver_{i}", source_key=f"liver_{i}", quality="ok",
                  variant="L6" if i < 2 else "normal") for i in range(12)]
    rows += [dict(source="COVID19", patient_id=f"c{i}", source_key=f"volume-covid19-A-{i:04d}", quality="ok",
                  variant="normal") for i in range(6)]
    rows.append(dict(source="COLONOG", patient_id="bad", source_key="uidbad", quality="low", variant="normal"))
    index = pd.DataFrame(rows)
    a = official_split(index, seed=0)
    assert "bad" not in a and len(a) == 58
    assert a["volume-covid19-A-0000_ct"] in ("trainset", "test_public", "test_private")  # release spelling
    variant = {r.patient_id if r.source == "COLONOG" else (r.source_key + ("_ct" if r.source == "COVID19" else "")): r.variant
               for r in index.itertuples()}
    for split in ("test_public", "test_private"):
        ids = [k for k, s in a.items() if s == split]
        assert sum(variant[k] == "L6" for k in ids) >= 3
        assert sum(variant[k] == "L5_missing" for k in ids) >= 2
    colonog = [s for k, s in a.items() if k.startswith("1.3.6")]
    assert colonog.count("trainset") == 24 and colonog.count("test_public") == 8  # paper proportions 480/152/152
    assert official_split(index, seed=0) == a and official_split(index, seed=1) != a
