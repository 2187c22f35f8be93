"""lib.synthetic.generate: the synthetic sources in the archives' layouts, deterministic, resumable."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from lib.datasets import verse as verse_files
from lib.synthetic import generate, oracle, source_plan
from tests.helpers.synthetic_sources import _sitk_read, _tiny_cfg


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
    assert [d.name for d in hn] == ["HN_P001"]
    assert len(list(hn[0].iterdir())) == 3
    assert list((s / "MSD_T10" / "imagesTr").glob("liver_*.nii.gz"))
    assert list((s / "COVID19").glob("volume-covid19-A-0*.nii.gz"))
    for ct in (s / "VerSe" / "rawdata").glob("sub-verse*/*_ct.nii.gz"):
        stem = ct.name[: -len("_ct.nii.gz")]
        der = s / "VerSe" / "derivatives" / ct.parent.name
        assert (der / f"{stem}_seg-vert_msk.nii.gz").exists()
        assert (der / f"{stem}_seg-subreg_ctd.json").exists()
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
        truth = oracle.load_centroids(p, "VerSe", r["source_key"], kind="body")
        mass = oracle.load_centroids(p, "VerSe", r["source_key"])
        assert set(back) == set(truth) == set(mass)
        for lab in truth:  # the ctd.json holds the true vertebral-body centroids, as VerSe's do
            np.testing.assert_allclose(back[lab], truth[lab], atol=0.01)
        # ... which are not the whole-vertebra centres (C1: no body, the same point)
        far = [np.linalg.norm(np.subtract(truth[v], mass[v])) > 3.0 for v in truth if v != 1]
        assert np.mean(far) > 0.8  # C2 (body with dens) may lie near its mask centre
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
    assert trees[0].keys() == trees[1].keys()
    assert len(trees[0]) > 20
    assert all(trees[0][k] == trees[1][k] for k in trees[0])
    assert source_plan.plan_sources(_tiny_cfg()) == items
    other = source_plan.plan_sources(dict(_tiny_cfg(), seed=1))
    assert [i["spec"]["seed"] for i in other] != [i["spec"]["seed"] for i in items]


def test_rerun_skips_finished_volumes(generated):
    p, report = generated
    again = generate.generate_sources(p, _tiny_cfg(), workers=0, progress=False)
    assert again.skipped == len(report.index)
    assert again.index.equals(report.index)
