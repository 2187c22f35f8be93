"""lib.ml.planning: fingerprint, target spacing, topology, patch budget, the two plan kinds."""

from __future__ import annotations

import numpy as np
import pytest

from lib.io import load_volume, save_volume
from lib.ml import networks, planning, plans
from tests.helpers.fingerprints import _fp
from tests.helpers.toy_cases import make_toy_case, toy_cases


def test_fingerprint_reads_canonical_spacing_and_foreground(tmp_path):
    # an LPS file with anisotropic spacing: fingerprint must report RAS axis order
    aff = np.diag([-0.8, -0.9, 2.5, 1.0])
    cases = toy_cases(tmp_path, 2, spacing=(0.8, 0.9, 2.5), affine=aff)
    fp = planning.extract_fingerprint(cases)
    assert fp["n_cases"] == 2
    assert fp["median_spacing_mm"] == pytest.approx([0.8, 0.9, 2.5])
    assert fp["labels"] == [20, 21, 22, 23]
    # foreground HU of the toy boxes: 400..580 plus noise, background ~0 excluded
    assert 380 < fp["intensity"]["mean"] < 600
    assert fp["intensity"]["p00_5"] > 300


def test_target_spacing_median_or_p10_when_anisotropic():
    iso = _fp([(1.0, 1.0, 1.2)] * 3 + [(0.8, 0.8, 1.0)] * 2, [(100, 100, 100)] * 5)
    assert planning.target_spacing(iso) == pytest.approx([1.0, 1.0, 1.2])
    zs = [5.0, 5.0, 4.5, 5.0, 1.5, 5.0, 5.0, 5.0, 5.0, 2.5]
    aniso = _fp([(0.8, 0.8, z) for z in zs], [(512, 512, 90)] * len(zs))
    t = planning.target_spacing(aniso)
    assert t[:2] == pytest.approx([0.8, 0.8])
    assert t[2] == pytest.approx(np.percentile(zs, 10))  # not the median 5.0
    assert t[2] < 5.0


def test_topology_pools_anisotropic_axis_late_and_uses_1_kernels():
    strides, kernels, div = planning.get_topology((160, 160, 32), (0.8, 0.8, 4.0))
    assert strides[0] == [1, 1, 1]
    # z (5x coarser) is not pooled until in-plane spacing reached within a factor 2
    assert strides[1] == [2, 2, 1]
    assert strides[2] == [2, 2, 1]
    assert kernels[0] == [3, 3, 1]
    assert any(s[2] == 2 for s in strides[3:])
    assert div == [int(np.prod([s[a] for s in strides])) for a in range(3)]
    # feature maps never below 4 voxels
    assert all(p / d >= 4 for p, d in zip((160, 160, 32), div, strict=False))


def test_plan_patch_respects_memory_budget_and_divisibility():
    budget = planning.reference_budget() * 0.05
    patch, strides, kernels, filters = planning.plan_patch((300, 300, 300), (1.0, 1.0, 1.0), budget, 16, 128, 2)
    assert planning.estimate_memory(patch, strides, filters, 2) <= budget
    assert all(p % d == 0 for p, d in zip(patch, plans.divisibility(strides), strict=False))
    bigger = planning.plan_patch((300, 300, 300), (1.0, 1.0, 1.0), budget * 8, 16, 128, 2)[0]
    assert np.prod(bigger) > np.prod(patch)


def test_paper_plan_is_3d_fullres_like():
    fp = _fp([(0.8, 0.8, 1.0)] * 6, [(512, 512, 600)] * 6, labels=range(1, 25))
    plan = planning.plan_experiment(fp, "paper")
    assert plan.combine == "single"
    assert [s.name for s in plan.stages] == ["3d_fullres"]
    st = plan.stages[0]
    assert st.filters[0] == 32
    assert max(st.filters) == 320
    assert len(st.strides) == 6
    assert st.deep_supervision >= 1
    assert st.task == "labels"
    assert np.prod(st.patch_size) >= 96 ** 3  # of the order of nnU-Net's 128^3
    assert plan.training["optimizer"] == "sgd"
    assert plan.training["max_epochs"] == 1000
    assert plan.labels == list(range(1, 25))


def test_synthetic_plan_is_a_small_cascade_covering_the_fov():
    fp = _fp([(2.0, 2.0, 2.0)] * 6, [(190, 190, 380)] * 6, labels=range(1, 26))
    fp["p90_fg_extent_mm"] = [110.0, 120.0, 600.0]
    plan = planning.plan_experiment(fp, "synthetic", roi_margin_mm=30.0)
    locate, coarse, fine = plan.stages
    assert plan.combine == "label_transfer"
    assert locate.task == "foreground"
    assert locate.roi_from is None
    assert locate.whole_volume
    extent = np.asarray(locate.patch_size) * np.asarray(locate.spacing_mm)
    assert np.all(extent >= np.asarray(fp["p90_extent_mm"]) - 1e-6)  # the whole FOV in one patch
    assert coarse.task == "levels"
    assert coarse.roi_from == "locate"
    assert coarse.whole_volume
    assert coarse.z_coord
    extent = np.asarray(coarse.patch_size) * np.asarray(coarse.spacing_mm)
    assert np.all(extent >= np.asarray([110.0, 120.0, 600.0]) + 60 - 1e-6)  # the whole spine + margins
    assert fine.task == "foreground"
    assert fine.spacing_mm == [2.0, 2.0, 2.0]
    assert fine.roi_from == "locate"
    assert plan.inference["gate"]["stage"] == "locate"
    assert networks.count_parameters(networks.build_network(plan, "fine")) < 3e6


def test_fingerprint_rejects_mismatched_mask(tmp_path):
    img, msk = make_toy_case(tmp_path / "a.nii.gz", tmp_path / "a_seg.nii.gz", 0)
    save_volume(np.zeros((5, 5, 5), np.uint8), np.eye(4), tmp_path / "bad_seg.nii.gz")
    with pytest.raises(Exception, match="bad_seg"):
        planning.extract_fingerprint([("a", str(img), str(tmp_path / "bad_seg.nii.gz"))])
    assert load_volume(msk).array.max() == 23
