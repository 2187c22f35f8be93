"""lib.imaging.label_shift: dislocation detection, level offsets, and the correction on phantom spines."""

from __future__ import annotations

import numpy as np
import pytest

from lib.core import labels as L
from lib.core.labels import label_at_level, level_index
from lib.imaging import instances, label_shift
from lib.imaging.label_shift import level_offsets, relabel, variant_of
from lib.metrics.overlap import mean_vertebra_dice
from lib.synthetic import phantom
from tests.helpers.spines import spine_mask


def _shift_from_sacrum(mask: np.ndarray, by: int = -1) -> np.ndarray:
    """What a network counting from the sacrum does to an L6 case: every level off by one."""
    lut = np.arange(256, dtype=np.uint8)
    for v in np.unique(mask):
        if v:
            lut[v] = label_at_level(level_index(v) + by) or v
    return lut[mask]


@pytest.fixture(scope="module")
def missing_l5_case():
    return phantom.generate_case(phantom.CaseSpec(seed=5, n_lumbar=4, fov="abdomen", spacing_mm=(2.0, 2.0, 2.0)))


def test_dislocation_detected_on_a_shifted_l6_case(l6_case):
    m = l6_case.mask
    shifted = _shift_from_sacrum(m)
    tab = label_shift.label_shift_table(m, shifted, l6_case.affine)
    assert list(tab["z_mm"]) == sorted(tab["z_mm"], reverse=True)  # cranial first
    l5_row = tab[tab["pred_name"] == "L5"].iloc[0]
    assert l5_row["truth_name"] == "L6"
    assert l5_row["offset"] == -1
    d = label_shift.dislocation(tab)
    assert d.dislocated
    assert d.offset == -1
    assert d.run_length == len(tab)
    ok = label_shift.dislocation(label_shift.label_shift_table(m, m, l6_case.affine))
    assert not ok.dislocated
    assert ok.run_length == 0


def test_single_mislabel_is_not_a_dislocation(l6_case):
    m = l6_case.mask.copy()
    pred = m.copy()
    pred[m == 22] = 23  # one vertebra wrong: no run of two
    assert not label_shift.dislocation(label_shift.label_shift_table(m, pred, l6_case.affine)).dislocated


@pytest.mark.parametrize("fixture", ["l6_case", "missing_l5_case"])
def test_correction_restores_labels_from_the_last_rib(fixture, request):
    case = request.getfixturevalue(fixture)
    shifted = _shift_from_sacrum(case.mask)
    assert mean_vertebra_dice(case.mask, shifted) < 0.1
    kept, info = label_shift.correct_label_shift(case.ct, shifted, case.affine)  # default: two landmarks needed
    assert not info.applied
    assert "one landmark" in info.anchor
    assert np.array_equal(kept, shifted)
    fixed, info = label_shift.correct_label_shift(case.ct, shifted, case.affine, anchors="any")
    assert info.applied
    assert info.anchor == "last rib (T12)"
    assert mean_vertebra_dice(case.mask, fixed) == pytest.approx(1.0)
    assert np.array_equal(fixed > 0, shifted > 0)  # geometry untouched, only labels change


def test_correction_leaves_a_correct_prediction_alone(l6_case, missing_l5_case):
    for case in (l6_case, missing_l5_case):
        for anchors in label_shift.ANCHOR_POLICIES:
            out, info = label_shift.correct_label_shift(case.ct, case.mask, case.affine, anchors=anchors)
            assert not info.applied
            assert np.array_equal(out, case.mask)


def test_default_correction_needs_skull_and_ribs_to_agree():
    case = phantom.generate_case(phantom.CaseSpec(seed=4, fov="whole", spacing_mm=(2.0, 2.0, 2.0),
                                                  center_on_spine=True, fov_xy_mm=240.0))
    shifted = _shift_from_sacrum(case.mask, by=+1)  # C1 called C2 ... L5 called L6
    assert mean_vertebra_dice(case.mask, shifted) < 0.1
    fixed, info = label_shift.correct_label_shift(case.ct, shifted, case.affine)
    assert info.applied, info.anchor
    assert info.anchor.startswith("C1 + last rib"), info.anchor
    assert mean_vertebra_dice(case.mask, fixed) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="anchors"):
        label_shift.correct_label_shift(case.ct, shifted, case.affine, anchors="one")


def _merge(mask: np.ndarray, upper: int, lower: int) -> np.ndarray:
    """What a network that fits six lumbar bodies into five labels does: ``lower`` called
    ``upper``, every vertebra below it one level high."""
    out = mask.copy()
    out[mask == lower] = upper
    for v in np.unique(mask):
        if v and level_index(v) > level_index(lower):
            out[mask == v] = label_at_level(level_index(v) - 1)
    return out


@pytest.mark.parametrize(("upper", "lower"), [(24, 25), (22, 23)], ids=["L5+L6", "L3+L4"])
def test_merged_vertebrae_are_split_and_the_labels_below_move_down(l6_case, upper, lower):
    m = l6_case.mask
    merged = _merge(m, upper, lower)
    assert 25 not in np.unique(merged)  # no L6 left: the paper's failure
    insts = instances.vertebra_instances(merged, l6_case.affine)
    parts, notes = instances.split_merged_instances(merged, l6_case.affine, insts)
    assert len(parts) == len(insts) + 1
    assert len(notes) == 1
    assert notes[0].startswith(L.name(upper))
    fixed, info = label_shift.correct_label_shift(l6_case.ct, merged, l6_case.affine)
    assert info.applied, info.anchor
    assert info.anchor.startswith("merged vertebra split"), info.anchor
    assert info.labels_after[-1] == "L6"
    assert np.array_equal(fixed > 0, merged > 0)  # voxels keep their place, labels change
    for v in (upper, lower, 25):  # the cut follows the disc (a posterior arch may go to the wrong side)
        a, b = m == v, fixed == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8, L.name(v)
    assert mean_vertebra_dice(m, fixed) > max(0.9, mean_vertebra_dice(m, merged) + 0.05)
    kept, info = label_shift.correct_label_shift(l6_case.ct, merged, l6_case.affine, split_merged=False)
    assert not info.applied or not info.anchor.startswith("merged")


def test_split_needs_two_whole_vertebrae_and_a_mostly_consecutive_prediction(l6_case):
    m = l6_case.mask
    insts = instances.vertebra_instances(m, l6_case.affine)
    assert instances.split_merged_instances(m, l6_case.affine, insts)[1] == []  # true L5 and L6 stay whole
    # L5 grown by half of L6 only: too big, but the lower part would not be a whole vertebra
    grown = m.copy()
    l6 = np.argwhere(m == 25)
    top_half = l6[l6[:, 2] >= np.median(l6[:, 2])]
    grown[tuple(top_half.T)] = 24
    grown[m == 25] = np.where(grown[m == 25] == 24, 24, 0)
    parts, notes = instances.split_merged_instances(grown, l6_case.affine, instances.vertebra_instances(grown, l6_case.affine))
    assert notes == []
    # a merge inside a scrambled prediction: most labels would change, so nothing is applied
    merged = _merge(m, 24, 25)
    rng = np.random.default_rng(0)
    present = [v for v in np.unique(merged) if v and v != 24]
    lut = np.arange(256, dtype=np.uint8)
    lut[present] = rng.permutation(present)
    scrambled = lut[merged]
    assert instances.split_merged_instances(scrambled, l6_case.affine, instances.vertebra_instances(scrambled, l6_case.affine))[1]
    out, info = label_shift.correct_label_shift(l6_case.ct, scrambled, l6_case.affine)
    assert not info.anchor.startswith("merged vertebra split")


def test_level_offsets_find_a_shift():
    truth = spine_mask([25, 24, 23, 22, 21, 20])
    shifted = relabel(truth, {v: -1 for v in range(20, 26)})  # L6 called L5, ..., L1 called T12
    offs = level_offsets(truth, shifted)
    assert offs == {v: -1 for v in range(20, 26)}
    assert set(np.unique(shifted)) == {0, 19, 20, 21, 22, 23, 24}
    assert variant_of(truth) == "L6"
    assert variant_of(spine_mask([23, 22, 21, 20])) == "missing_L5"
