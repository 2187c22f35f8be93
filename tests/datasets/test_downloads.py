"""lib.datasets.downloads: what a download lacks is listed precisely."""

from __future__ import annotations

import shutil

from lib.datasets import downloads


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
    assert "COVID19: expected 40 volumes" in text
    rep = downloads.verify_sources(tmp_path / "nowhere", counts)
    assert "does not exist" in rep.summary()
