"""lib.infer: geometry of saved masks (RAS, LPS, oblique), sliding window, TTA, post-processing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from lib.imaging import components, instances
from lib.ml import inference
from lib.ml import losses
from lib.ml import planning
from lib.ml import sliding_window
from lib.ml import trainer
from lib.io import load_volume, save_volume
from tests.test_model import make_toy_case, toy_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny three-stage model trained for a few seconds on toy spines (shared by the tests)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("infer_model")
    cases = toy_cases(root / "d", 4)
    plan = planning.plan_experiment(cases, "synthetic", base_filters=4, max_filters=16, coarse_spacing_mm=4.0,
                                 roi_margin_mm=8.0, deep_supervision=1)
    res = trainer.train(cases, root / "model", plan, max_epochs=30, iterations_per_epoch=5, seed=0, progress=False,
                      device="cpu")
    return res.model_dir, cases


class _Pointwise(torch.nn.Module):
    """Logits that depend only on each voxel's value: any window layout gives the same answer."""

    def __init__(self, n_classes=3):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, n_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-1, 1, n_classes).view(n_classes, 1, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_equals_direct_and_is_memory_bounded():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 2, (10, 12, 100)).astype(np.float32)
    net = _Pointwise().eval()
    with torch.no_grad():
        direct = torch.softmax(net(torch.from_numpy(img)[None, None]), 1)[0].numpy()
    got = np.zeros_like(direct)
    seen = []

    def consume(z0, z1, probs):
        seen.append((z0, z1))
        got[..., z0:z1] = probs

    info = sliding_window.sliding_window(net, img, (8, 8, 16), 3, consume, overlap=0.5)
    assert np.allclose(got, direct, atol=1e-5)
    # every slice emitted once, in order; never more than ~2 patch heights of all classes held
    assert seen[0][0] == 0 and seen[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:], strict=False))
    assert info["max_buffer_z"] <= 2 * 16 and info["windows"] > 10
    # an image smaller than the patch is padded around (centred), not cut
    small = img[:5, :6, :7]
    out = np.zeros((3, 5, 6, 7), np.float32)
    sliding_window.sliding_window(net, small, (8, 8, 16), 3, lambda a, b, p: out.__setitem__((Ellipsis, slice(a, b)), p))
    assert np.allclose(out, direct[:, :5, :6, :7], atol=1e-5)


def test_mirror_tta_is_exact_for_a_symmetric_net_and_changes_an_asymmetric_one():
    img = np.random.default_rng(1).normal(0, 1, (8, 8, 16)).astype(np.float32)
    runs = {}
    for name, net in (("point", _Pointwise()), ("conv", torch.nn.Conv3d(1, 3, 3, padding=1))):
        for tta in ((), (0,)):
            out = np.zeros((3, 8, 8, 16), np.float32)
            sliding_window.sliding_window(net.eval(), img, (8, 8, 16), 3,
                                 lambda a, b, p, o=out: o.__setitem__((Ellipsis, slice(a, b)), p), tta_axes=tta)
            runs[name, tta] = out
    assert np.allclose(runs["point", ()], runs["point", (0,)], atol=1e-6)
    assert not np.allclose(runs["conv", ()], runs["conv", (0,)], atol=1e-4)


def test_gaussian_importance_peaks_in_the_centre():
    w = sliding_window.gaussian_importance((9, 11, 16))
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    assert np.unravel_index(np.argmax(w), w.shape)[:2] == (4, 5)
    assert np.allclose(w, w[::-1, ::-1, ::-1])


def test_postprocess_keeps_largest_component_per_label_and_drops_specks():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = 5      # 216 voxels
    lab[12:14, 12:14, 12:14] = 5  # second, smaller component of label 5
    lab[2:8, 2:8, 10:16] = 6
    lab[17, 17, 17] = 7        # a one-voxel speck
    out = components.postprocess_labels(lab, (1, 1, 1), largest_component=True, min_component_mm3=5)
    assert (out == 5).sum() == 216 and (out[12:14, 12:14, 12:14] == 0).all()
    assert (out == 6).sum() == 216 and (out == 7).sum() == 0
    assert (components.postprocess_labels(lab, (1, 1, 1), False, 0) == lab).all()
    # a stray piece of label 6 stuck to vertebra 5 is relabelled 5, not deleted
    lab2 = lab.copy()
    lab2[8, 3:6, 3:6] = 6
    out2 = components.postprocess_labels(lab2, (1, 1, 1), largest_component=True, min_component_mm3=5)
    assert (out2[8, 3:6, 3:6] == 5).all() and (out2 == 6).sum() == 216


def _lps(spacing, shape, origin):
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [origin[0] + spacing[0] * (shape[0] - 1), origin[1] + spacing[1] * (shape[1] - 1), origin[2]]
    return aff


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_prediction_has_the_input_shape_and_affine(trained, tmp_path, orientation):
    model_dir, cases = trained
    ras = load_volume(cases[3][1])
    a = ras.array
    if orientation == "RAS":
        data, aff = a, ras.affine
    elif orientation == "LPS":
        data, aff = a[::-1, ::-1, :], _lps(ras.spacing, a.shape, ras.affine[:3, 3])
    else:  # oblique and permuted: file axis 0 runs mostly along z
        rot = Rotation.from_euler("xyz", [10, -6, 20], degrees=True).as_matrix()
        aff = np.eye(4)
        aff[:3, :3] = (rot @ np.diag(ras.spacing))[:, [2, 0, 1]]
        aff[:3, 3] = [-20.0, 5.0, 40.0]
        data = np.transpose(a, (2, 0, 1))
    src = tmp_path / f"img_{orientation}.nii.gz"
    save_volume(np.ascontiguousarray(data), aff, src)
    out = inference.predict_case(model_dir, src, tmp_path / f"pred_{orientation}.nii.gz")
    img_in, img_out = nib.load(str(src)), nib.load(str(out))
    assert img_out.shape == img_in.shape
    assert np.allclose(img_out.affine, img_in.affine, atol=1e-5)
    assert img_out.get_data_dtype() == np.uint8
    pred = np.asarray(img_out.dataobj)
    assert pred.any()
    if orientation != "RAS":  # same anatomy, same prediction once back in RAS order
        ref = np.asarray(nib.load(str(inference.predict_case(model_dir, cases[3][1], tmp_path / "pred_ref.nii.gz"))).dataobj)
        back = load_volume(out).array
        assert np.array_equal(back, ref)


def test_trained_toy_model_finds_the_spine(trained, tmp_path):
    model_dir, cases = trained
    make_toy_case(tmp_path / "new.nii.gz", tmp_path / "new_seg.nii.gz", seed=42)
    pred = load_volume(inference.predict_case(model_dir, tmp_path / "new.nii.gz", tmp_path / "p.nii.gz")).array
    gt = load_volume(tmp_path / "new_seg.nii.gz").array
    spine, _ = losses.dice_scores(pred > 0, gt > 0, 2)
    assert spine > 0.6
    assert set(np.unique(pred)) <= {0, 20, 21, 22, 23}


def test_predict_cases_parallel_collects_failures_and_skips_done(trained, tmp_path):
    model_dir, cases = trained
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(open(cases[0][1], "rb").read()[:200])  # truncated gzip
    items = [(c[0], c[1], str(tmp_path / f"{c[0]}_seg.nii.gz")) for c in cases[:2]]
    items.append(("broken", str(bad), str(tmp_path / "broken_seg.nii.gz")))
    res = inference.predict_cases(model_dir, items, workers=2, progress=False)
    assert sorted(res.values) == ["t0", "t1"] and res.failed_ids == ["broken"]
    assert "broken.nii.gz" in res.failures[0].message
    stamp = (tmp_path / "t0_seg.nii.gz").stat().st_mtime_ns
    inference.predict_cases(model_dir, items[:1], workers=0, progress=False)
    assert (tmp_path / "t0_seg.nii.gz").stat().st_mtime_ns == stamp  # skipped
    inference.predict_cases(model_dir, items[:1], workers=0, overwrite=True, progress=False)
    assert (tmp_path / "t0_seg.nii.gz").stat().st_mtime_ns != stamp


def test_single_stage_plan_predicts_on_its_own_grid(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    fp = planning.extract_fingerprint(cases)
    plan = planning.plan_experiment(fp, "paper", base_filters=4, max_filters=8, memory_fraction=0.01,
                                 target_spacing_mm=[3.0, 3.0, 3.0], deep_supervision=1,
                                 training={"optimizer": "adamw", "lr": 3e-3, "amp": False, "num_workers": 0})
    res = trainer.train(cases, tmp_path / "m", plan, max_epochs=2, iterations_per_epoch=2, progress=False)
    m = inference.load_model(res.model_dir, "cpu")
    vol = load_volume(cases[0][1])
    lab = inference.predict_volume(m, vol.array, vol.spacing, tta=True)
    assert lab.shape == vol.shape and lab.dtype == np.uint8
    assert set(np.unique(lab)) <= {0, 20, 21, 22, 23}


def test_split_at_necks_moves_a_misplaced_boundary_to_the_thin_joint():
    # two "vertebrae" (16-voxel cubes) joined by a 2 x 2 voxel "facet joint"; the coarse stage
    # put the boundary 2 voxels inside the lower one
    lab = np.zeros((20, 20, 40), np.uint8)
    lab[2:18, 2:18, 2:18] = 1
    lab[9:11, 9:11, 18:21] = 1  # the neck
    lab[2:18, 2:18, 21:37] = 2
    lab[2:18, 2:18, 21:23] = 1  # misplaced boundary
    out = instances.split_at_necks(lab, (1.0, 1.0, 1.0), core_fraction=0.3)
    assert np.array_equal(out > 0, lab > 0)  # the spine mask is untouched
    assert (out[2:18, 2:18, 2:18] == 1).all() and (out[2:18, 2:18, 21:37] == 2).all()
    assert set(np.unique(out)) == {0, 1, 2}
    # anisotropic spacing is honoured and an empty map passes through
    assert not instances.split_at_necks(np.zeros((4, 4, 4), np.uint8), (1, 1, 3)).any()
