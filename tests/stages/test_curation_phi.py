"""lib.stages.curation.phi: the PHI audit finds every planted identifier, and nothing when de-identified."""

from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lib.core import paths
from lib.stages.curation import config, phi
from tests.helpers.curation_sources import _cfg, _run


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
    assert rep.passed
    assert rep.files > 20
    assert rep.identifiers > 40
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
    cfg_src = yaml.safe_load((paths.REPO_ROOT / "params" / "ci" / "00_sources.yaml").read_text())
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


def test_xlsx_members_are_searched(tmp_path):
    """The audit opens zip containers: an identifier inside an .xlsx sheet is found."""
    p = tmp_path / "s.xlsx"
    pd.DataFrame({"a": ["ok", "RIVERTON CLINIC ZZ9QX1"]}).to_excel(p, index=False)
    with zipfile.ZipFile(p) as z:
        assert any(n.endswith(".xml") for n in z.namelist())
    ident = phi.make_identifier("InstitutionName", "RIVERTON CLINIC ZZ9QX1")
    leaks = phi.audit_phi([tmp_path], [ident])
    assert leaks
    assert leaks[0].where.startswith("zip member")
