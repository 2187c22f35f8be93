"""lib.ml.cache: the preprocessing cache is reused and redone when its source changes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lib.ml import cache, losses, preprocessing
from tests.helpers.plans import tiny_plan
from tests.helpers.toy_cases import make_toy_case, toy_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cache_is_reused_and_redone_when_source_changes(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    plan = tiny_plan(cases)
    folder, metas = cache.build_cache(cases, plan, "coarse", tmp_path / "cache", progress=False)
    img = np.load(folder / metas[0]["image"], mmap_mode="r")
    assert img.dtype == np.float16
    assert list(img.shape) == metas[0]["shape"]
    assert not str(folder / metas[0]["image"]).endswith(".gz")
    assert plan.stage("coarse").task == "levels"
    seg = np.load(folder / metas[0]["seg"])
    assert preprocessing.decode_levels(seg).max() == len(plan.labels)
    assert seg.dtype == np.uint8
    near = seg % preprocessing.LEVEL_FG
    assert (near[seg >= preprocessing.LEVEL_FG] > 0).all()
    assert (near > 0).sum() > (seg >= preprocessing.LEVEL_FG).sum()
    stamp = (folder / metas[0]["image"]).stat().st_mtime_ns
    cache.build_cache(cases, plan, "coarse", tmp_path / "cache", progress=False)
    assert (folder / metas[0]["image"]).stat().st_mtime_ns == stamp  # reused
    time.sleep(0.01)
    make_toy_case(cases[0][1], cases[0][2], seed=99)
    cache.build_cache(cases, plan, "coarse", tmp_path / "cache", progress=False)
    assert (folder / metas[0]["image"]).stat().st_mtime_ns != stamp  # redone
    # the normalisation is the plan's: clipped to the foreground percentiles, z-scored
    fine_folder, fine_metas = cache.build_cache(cases, plan, "fine", tmp_path / "cache", progress=False)
    fimg = np.load(fine_folder / fine_metas[1]["image"]).astype(np.float32)
    assert fimg.min() == pytest.approx(preprocessing.pad_value(plan.normalization), abs=1e-2)
    assert set(np.unique(np.load(fine_folder / fine_metas[1]["seg"]))) == {0, 1}


def test_foreground_targets_are_spine_fractions_on_a_coarser_grid(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    plan = tiny_plan(cases, target_spacing_mm=[3.0, 3.0, 3.0], soft_targets=True)
    folder, metas = cache.build_cache(cases, plan, "fine", tmp_path / "cache", progress=False)
    seg = np.load(folder / metas[0]["seg"])
    partial = (seg > 0) & (seg < preprocessing.SOFT_MAX)
    assert partial.any()
    assert (seg == preprocessing.SOFT_MAX).any()
    # the loss prefers probabilities equal to the fractions over hard 0/1 guesses
    y = torch.as_tensor(seg[None, None].astype(np.int64))
    f = y.float() / preprocessing.SOFT_MAX
    exact = torch.log(torch.cat([1 - f, f], 1).clamp(1e-4, 1))
    hard = torch.log(torch.cat([(f < 0.5).float(), (f >= 0.5).float()], 1).clamp(1e-4, 1))
    loss = losses.SoftForegroundLoss()
    assert float(loss(exact, y)) < float(loss(hard, y))
