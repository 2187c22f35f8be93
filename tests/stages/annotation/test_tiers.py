"""lib.stages.annotation.tiers: what the simulated tiers leave behind, as documented."""

from __future__ import annotations

import numpy as np
import pytest

from lib.imaging.label_shift import relabel
from lib.stages.annotation.tiers import SimulatedTiers, tiers_from_params
from tests.helpers.spines import spine_mask


def _pre_with_errors(truth, rng, shift=0):
    pre = relabel(truth, {v: shift for v in np.unique(truth) if v})
    edge = (truth > 0) ^ (np.roll(truth, 1, axis=1) > 0)
    drop = edge & (rng.random(truth.shape) < 0.5)
    pre[drop] = 0
    pre[0:2, 0:2, 0:4] = 20  # a spurious blob
    return pre


def test_accepted_mask_equals_truth_but_for_the_documented_residual(rng):
    truth = spine_mask([24, 23, 22, 21, 20, 19])
    pre = _pre_with_errors(truth, rng)
    n_err = int(((pre > 0) != (truth > 0)).sum())
    residual = 0.1
    tiers = tiers_from_params({"junior": {"boundary_residual": residual}})
    out = SimulatedTiers(tiers, seed=3).annotate("c1", 1, pre, truth, voxel_ml=0.008)
    final = out[-1].mask
    wrong = final != truth
    # only foreground/background errors the junior left; never a wrong vertebra label
    assert not ((final > 0) & (truth > 0) & (final != truth)).any()
    assert wrong.sum() == pytest.approx(residual * n_err, rel=0.35)
    assert wrong.sum() < n_err
    # without residual the accepted mask is the truth
    clean = tiers_from_params({"junior": {"boundary_residual": 0.0}})
    assert np.array_equal(SimulatedTiers(clean, seed=3).annotate("c1", 1, pre, truth, 0.008)[-1].mask, truth)


def test_a_shift_missed_by_every_tier_survives_and_is_caught_otherwise(rng):
    truth = spine_mask([24, 23, 22, 21, 20, 19])
    pre = _pre_with_errors(truth, rng, shift=1)
    blind = {t: {"shift_catch_rate": 0.0, "boundary_residual": 0.0} if t == "junior" else {"shift_catch_rate": 0.0}
             for t in ("junior", "senior", "expert", "double_check")}
    final = SimulatedTiers(tiers_from_params(blind), seed=1).annotate("c", 1, pre, truth, 0.008)[-1].mask
    assert np.array_equal(final, relabel(truth, {v: 1 for v in range(19, 25)}))
    sharp = {"junior": {"shift_catch_rate": 0.0, "boundary_residual": 0.0}, "senior": {"shift_catch_rate": 1.0}}
    res = SimulatedTiers(tiers_from_params(sharp), seed=1).annotate("c", 1, pre, truth, 0.008)
    assert np.array_equal(res[-1].mask, truth)
    assert res[1].tier == "senior_1"
    assert res[1].relabelled == 6


def test_variant_goes_to_the_expert(rng):
    truth = spine_mask([25, 24, 23, 22, 21, 20])
    pre = _pre_with_errors(truth, rng, shift=-1)
    spec = {"junior": {"shift_catch_rate": 0.0, "boundary_residual": 0.0}, "senior": {"shift_catch_rate": 1.0},
            "double_check": {"sample_fraction": 0.0}}
    res = SimulatedTiers(tiers_from_params(spec), seed=0).annotate("c", 1, pre, truth, 0.008)
    assert [r.tier for r in res] == ["junior", "senior_1", "senior_2", "expert"]
    assert res[1].sent_to_expert
    assert res[-1].sent_to_expert
    assert np.array_equal(res[-1].mask, truth)
    assert res[-1].minutes > res[1].minutes  # the expert's relabelling costs time


def test_tier_params_reject_unknown_fields():
    with pytest.raises(ValueError, match="junior: unknown fields \\['shift_rate'\\]"):
        tiers_from_params({"junior": {"shift_rate": 0.5}})
