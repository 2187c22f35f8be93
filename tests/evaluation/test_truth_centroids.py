"""The truth's own centroid file in evaluation: VerSe BIDS ``_seg-subreg_ctd.json`` and the
challenge copies' ``_iso-ctd.json`` (1 mm ASL frame), what the summary and Table 2 say."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from lib import metrics
from lib.datasets import verse
from lib.evaluation import cli, evaluate_folders
from lib.io import save_volume
from tests.metrics.test_identification_rules import TRUTH_LABELS, spine

PIR = np.array([[0.0, 0.0, -1.5, 40.0], [-2.0, 0.0, 0.0, 60.0], [0.0, -1.5, 0.0, 80.0], [0.0, 0.0, 0.0, 1.0]])


def _challenge_iso_asl_mm(world: np.ndarray, affine: np.ndarray, shape) -> np.ndarray:
    """mm of a world point in the CT reoriented to ASL (nibabel's own reorientation), from its
    first voxel: the frame of the challenge copies' ``_iso-ctd.json``."""
    img = nib.Nifti1Image(np.zeros(shape, np.int16), affine)
    asl = img.as_reoriented(orientations.ornt_transform(orientations.io_orientation(affine),
                                                        orientations.axcodes2ornt(("A", "S", "L"))))
    idx = np.linalg.solve(asl.affine, np.array([*world, 1.0]))[:3]
    return idx * np.asarray(asl.header.get_zooms()[:3])


def test_challenge_iso_asl_centroids_read_into_world_mm(tmp_path):
    shape = (30, 40, 24)
    world = {20: np.array([10.0, 25.0, 40.0]), 28: np.array([-4.0, 31.5, 52.0])}
    body = [{"label": v, **dict(zip("XYZ", (float(c) for c in _challenge_iso_asl_mm(w, PIR, shape)), strict=True))}
            for v, w in world.items()]
    path = tmp_path / "verse012_CT-orient_iso-ctd.json"
    path.write_text(json.dumps(body))
    back = verse.read_verse_centroids(path, PIR, shape)  # frame "auto": an iso-ctd file without direction
    for v, w in world.items():
        np.testing.assert_allclose(back[v], w, atol=1e-6)
    with pytest.raises(ValueError, match="direction"):
        verse.read_verse_centroids(path, PIR, shape, frame="bids")
    bad = tmp_path / "x_ctd.json"
    bad.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="x_ctd.json"):
        verse.read_verse_centroids(bad, PIR, shape)


def _verse_tree(tmp_path):
    """Two VerSe BIDS derivatives (mask + ctd.json beside it) and predictions; the second
    case's ctd.json puts L1 25 mm anterior of its body."""
    gt_dir, pred_dir = tmp_path / "derivatives", tmp_path / "pred"
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    m = spine(TRUTH_LABELS)
    for i, stem in enumerate(["sub-verse004", "sub-verse012"]):
        save_volume(m, aff, gt_dir / f"{stem}_seg-vert_msk.nii.gz")
        save_volume(m, aff, pred_dir / f"{stem}.nii.gz")
        cents = metrics.body_centroids_mm(m, aff)
        if i == 1:
            cents[20] = tuple(np.add(cents[20], (0.0, 25.0, 0.0)))
        verse.write_verse_centroids(gt_dir / f"{stem}_seg-subreg_ctd.json", cents, aff, m.shape)
    return gt_dir, pred_dir


def test_evaluation_reads_the_truth_centroid_file_and_says_so(tmp_path):
    gt_dir, pred_dir = _verse_tree(tmp_path)
    df, summary = evaluate_folders(gt_dir, pred_dir, tmp_path / "out", labels=list(range(1, 29)), workers=0,
                                   set_name="Test_VerSe", progress=False)
    vert = df[df["label"] > 0]
    assert set(vert["gt_centroid_source"]) == {"sub-verse004_seg-subreg_ctd.json", "sub-verse012_seg-subreg_ctd.json"}
    l1 = vert[vert["label"] == 20].set_index("case_id")
    assert l1.loc["sub-verse004", "identified"] == 1.0
    assert l1.loc["sub-verse012", "identified"] == 0.0  # the file, not the mask, is the truth
    assert l1.loc["sub-verse012", "localisation_mm"] == pytest.approx(25.0, abs=0.01)
    ident = summary["identification"]
    assert ident["rule"] == "verse_get_hits"
    assert ident["cases_with_truth_centroid_file"] == ["sub-verse004", "sub-verse012"]
    md = (tmp_path / "out" / "table2.md").read_text()
    assert "ID rate: Test_VerSe: verse_get_hits rule within 20 mm" in md
    assert "its centroid file for 2 case(s)" in md
    assert "VerSe 2020's best challenge entry, for comparison: ID rate 0.956, localisation error < 2 mm" in md
    assert "| Test_VerSe Loc. (mm) |" in md.splitlines()[0] + " |"
    # without the files both cases are scored on the estimate from the mask: all identified
    df2, s2 = evaluate_folders(gt_dir, pred_dir, None, labels=list(range(1, 29)), workers=0, progress=False,
                               centroid_files=False)
    assert set(df2.loc[df2["label"] > 0, "gt_centroid_source"]) == {"mask"}
    assert df2.loc[df2["label"] > 0, "identified"].eq(1.0).all()
    assert s2["identification"]["cases_with_truth_centroid_file"] == []


def test_cli_selects_the_rule_and_the_centroids_by_name(tmp_path, capsys):
    gt_dir, pred_dir = _verse_tree(tmp_path)
    rc = cli.main(["--gt", str(gt_dir), "--pred", str(pred_dir), "--out", str(tmp_path / "o"), "--labels", "1-25,28",
                   "--workers", "0", "--no-progress", "--id-rule", "nearest_prediction", "--centroids", "mass",
                   "--no-centroid-files"])
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["identification"]["rule"] == "nearest_prediction"
    assert summary["identification"]["centroids"] == "mass"
    assert "identification: nearest_prediction rule" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["--gt", str(gt_dir), "--pred", str(pred_dir), "--out", str(tmp_path / "o2"), "--id-rule", "closest"])
    assert exc.value.code == 2
    assert "verse_get_hits" in capsys.readouterr().err
