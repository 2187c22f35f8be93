"""lib.synthetic.phantom: anatomy, variants, fields of view, HU ranges, determinism."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from lib.core import labels as L
from lib.synthetic.phantom import (
    T_CANC,
    T_CORT,
    T_DISC,
    T_FAT,
    T_LUNG,
    T_MUSCLE,
    CaseSpec,
    compute_centroids,
    generate_case,
    generate_scans,
)

COARSE = (3.0, 3.0, 3.0)


def expected_labels(n_thoracic: int, n_lumbar: int) -> set[int]:
    thor = [8 + i for i in range(min(n_thoracic, 12))] + ([28] if n_thoracic == 13 else [])
    return set(range(1, 8)) | set(thor) | set(range(20, 20 + n_lumbar))


@pytest.fixture(scope="module")
def whole_cases():
    """Whole-spine cases for every thoracic/lumbar count, on a coarse grid."""
    out = {}
    for nt, nl in [(12, 5), (11, 5), (13, 5), (12, 6), (12, 4)]:
        out[(nt, nl)] = generate_case(CaseSpec(seed=11, n_thoracic=nt, n_lumbar=nl, fov="whole",
                                               spacing_mm=COARSE, noise_hu=0.0))
    return out


@pytest.mark.parametrize(("nt", "nl"), [(12, 5), (11, 5), (13, 5), (12, 6), (12, 4)])
def test_whole_spine_has_exactly_the_vertebrae_of_the_spec(whole_cases, nt, nl):
    case = whole_cases[(nt, nl)]
    present = {int(v) for v in np.unique(case.mask) if v}
    assert present == expected_labels(nt, nl)
    assert len(present) == 7 + nt + nl
    assert case.ct.dtype == np.int16
    assert case.mask.dtype == np.uint8
    assert case.ct.shape == case.mask.shape == case.tissue.shape


def test_l6_case_has_labels_20_to_25_and_ribs_on_exactly_the_thoracic_vertebrae(whole_cases):
    case = whole_cases[(12, 6)]
    present = {int(v) for v in np.unique(case.mask) if v}
    assert set(range(20, 26)) <= present
    assert 28 not in present
    rib_levels = {int(v) for v in np.unique(case.ribs) if v}
    assert rib_levels == set(range(8, 20))
    assert case.info["rib_levels"] == list(range(8, 20))
    # ribs are bone in the CT but never labelled
    assert (case.mask[case.ribs > 0] == 0).all()
    assert np.median(case.ct[case.ribs > 0]) > 250
    # each rib starts next to its own vertebra (costovertebral joint within 10 mm)
    sp = np.asarray(case.spacing)
    for lev in sorted(rib_levels):
        rib = np.argwhere(case.ribs == lev) * sp
        vert = np.argwhere(case.mask == lev) * sp
        d, _ = cKDTree(vert).query(rib)
        assert d.min() < 10.0, f"rib of {L.name(lev)} does not reach {L.name(lev)}"


@pytest.mark.parametrize("nt", [11, 13])
def test_thoracic_count_sets_rib_levels(whole_cases, nt):
    case = whole_cases[(nt, 5)]
    rib_levels = {int(v) for v in np.unique(case.ribs) if v}
    thoracic = {v for v in expected_labels(nt, 5) if L.region(v) == "thoracic"}
    assert rib_levels == thoracic
    assert (28 in rib_levels) == (nt == 13)


def test_missing_l5_means_four_lumbar_and_a_bigger_sacrum(whole_cases):
    normal, l4 = whole_cases[(12, 5)], whole_cases[(12, 4)]
    assert 24 not in set(np.unique(l4.mask).tolist())
    sacral = [n for n in l4.info["levels"] if n.startswith("S")]
    assert "S0" in sacral  # the fused L5 segment is part of the (unlabelled) sacrum
    assert len(sacral) == 6
    assert len([n for n in normal.info["levels"] if n.startswith("S")]) == 5
    assert len([n for n in whole_cases[(12, 6)].info["levels"] if n.startswith("S")]) == 4


@pytest.mark.parametrize(("fov", "must", "must_not"), [
    ("neck", {1, 2, 3, 4, 5, 6, 7}, set(range(20, 26))),
    ("chest", set(range(9, 19)), {1, 2, 3} | set(range(22, 26))),
    ("abdomen", {19, 20, 21, 22, 23, 24}, set(range(1, 13))),
])
def test_field_of_view_decides_which_vertebrae_are_seen(fov, must, must_not):
    case = generate_case(CaseSpec(seed=5, fov=fov, spacing_mm=COARSE, noise_hu=0.0))
    present = {int(v) for v in np.unique(case.mask) if v}
    assert must <= present, f"{fov}: missing {sorted(must - present)}"
    assert not (present & must_not), f"{fov}: unexpected {sorted(present & must_not)}"
    assert present <= expected_labels(12, 5)


def test_verse_crop_holds_the_requested_run_and_a_small_fov():
    case = generate_case(CaseSpec(seed=2, fov="verse_crop", crop_levels=(17, 21), spacing_mm=COARSE, noise_hu=0.0))
    present = {int(v) for v in np.unique(case.mask) if v}
    assert set(range(17, 22)) <= present
    assert present <= set(range(15, 24))  # at most partial neighbours
    assert case.ct.shape[0] * case.spacing[0] < 220  # cropped around the spine


def test_hu_ranges_per_tissue_and_filled_bodies():
    case = generate_case(CaseSpec(seed=3, fov="verse_crop", crop_levels=(21, 22), spacing_mm=(0.6, 0.6, 0.6),
                                  fov_xy_mm=80.0, noise_hu=0.0))
    ct, tis = case.ct.astype(float), case.tissue
    med = {t: float(np.median(ct[tis == t])) for t in (T_FAT, T_MUSCLE, T_CORT, T_CANC, T_DISC) if (tis == t).any()}
    assert -130 <= med[T_FAT] <= -70
    assert 30 <= med[T_MUSCLE] <= 60
    assert 80 <= med[T_DISC] <= 140
    assert 150 <= med[T_CANC] <= 300
    assert 500 <= med[T_CORT] <= 1200  # thin shell: partial volume at 0.6 mm lowers it a little
    # the shell's core (two voxels inside the surface) reaches the cortical range
    inner = tis == T_CORT
    assert np.percentile(ct[inner], 90) >= 700
    # a body is filled bone: cancellous clearly above soft tissue everywhere
    assert np.percentile(ct[tis == T_CANC], 5) > np.percentile(ct[tis == T_MUSCLE], 95) + 50
    # the centre of a vertebral body is cancellous bone, not a hollow
    lab = 22
    cx, cy, cz = (np.linalg.inv(case.affine) @ np.array([*case.info["levels"]["L3"][1], 1.0]))[:3].round().astype(int)
    assert case.mask[cx, cy, cz] == lab
    assert 120 <= ct[cx - 2:cx + 3, cy - 2:cy + 3, cz - 2:cz + 3].mean() <= 320


def test_lungs_air_and_contrast():
    chest = generate_case(CaseSpec(seed=4, fov="chest", spacing_mm=COARSE, noise_hu=0.0))
    lung = chest.ct[chest.tissue == T_LUNG]
    assert lung.size > 1000
    assert -900 <= np.median(lung) <= -700
    assert (chest.ct[chest.tissue == 0] <= -990).mean() > 0.95  # air outside the body
    native = generate_case(CaseSpec(seed=4, fov="abdomen", spacing_mm=COARSE, noise_hu=0.0, contrast_phase="native"))
    portal = generate_case(CaseSpec(seed=4, fov="abdomen", spacing_mm=COARSE, noise_hu=0.0, contrast_phase="portal"))
    assert portal.ct.astype(float).sum() > native.ct.astype(float).sum()  # enhanced vessels and organs


def test_centroids_are_the_masks_centres_of_mass(whole_cases):
    case = whole_cases[(12, 5)]
    labs = sorted(case.centroids)
    com = ndimage.center_of_mass(np.ones(case.mask.shape), case.mask, labs)
    for lab, c in zip(labs, com, strict=True):
        world = case.affine @ np.array([*c, 1.0])
        np.testing.assert_allclose(case.centroids[lab], world[:3], atol=1e-6)
    assert compute_centroids(case.mask, case.affine) == case.centroids
    # craniocaudal order: C1 highest, then descending
    z = [case.centroids[v][2] for v in L.ordered(labs)]
    assert all(a > b for a, b in zip(z[:-1], z[1:], strict=False))


def test_spacing_and_thick_slices_average_thin_ones():
    base = dict(seed=8, fov="verse_crop", crop_levels=(20, 22), noise_hu=0.0)
    thin = generate_case(CaseSpec(spacing_mm=(2.0, 2.0, 1.5), **base))
    thick = generate_case(CaseSpec(spacing_mm=(2.0, 2.0, 4.5), slice_thickness_mm=4.5, **base))
    np.testing.assert_allclose(thick.spacing, (2.0, 2.0, 4.5))
    np.testing.assert_allclose(thin.affine[:3, 3], thick.affine[:3, 3])
    for k in range(1, thick.ct.shape[2] - 1):
        j = 3 * k
        if j + 1 >= thin.ct.shape[2]:
            break
        avg = thin.ct[:, :, j - 1:j + 2].astype(float).mean(axis=2)
        assert np.abs(thick.ct[:, :, k] - avg).max() <= 1.0  # rounding only
        np.testing.assert_array_equal(thick.mask[:, :, k], thin.mask[:, :, j])


def test_same_seed_same_bytes_other_seed_other_patient():
    spec = CaseSpec(seed=21, fov="abdomen", spacing_mm=(4.0, 4.0, 4.0), metal=True, noise_hu=15.0)
    a, b = generate_case(spec), generate_case(spec)
    assert a.ct.tobytes() == b.ct.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes()
    c = generate_case(CaseSpec(seed=22, fov="abdomen", spacing_mm=(4.0, 4.0, 4.0), metal=True, noise_hu=15.0))
    assert c.ct.shape != a.ct.shape or c.ct.tobytes() != a.ct.tobytes()
    # a second scan of the same patient over the same range: same anatomy, other noise
    zr = (-300.0, -200.0)
    e = generate_case(CaseSpec(seed=21, fov="abdomen", spacing_mm=(4.0, 4.0, 4.0), noise_hu=15.0, z_range_mm=zr))
    d = generate_case(CaseSpec(seed=21, fov="abdomen", spacing_mm=(4.0, 4.0, 4.0), noise_hu=15.0, z_range_mm=zr,
                               scan_seed=1))
    assert d.mask.tobytes() == e.mask.tobytes()
    assert d.ct.tobytes() != e.ct.tobytes()


def test_metal_is_bright_with_streaks():
    clean = generate_case(CaseSpec(seed=9, fov="verse_crop", crop_levels=(20, 24), spacing_mm=(2.0, 2.0, 2.0),
                                   noise_hu=0.0))
    metal = generate_case(CaseSpec(seed=9, fov="verse_crop", crop_levels=(20, 24), spacing_mm=(2.0, 2.0, 2.0),
                                   noise_hu=0.0, metal=True))
    assert (metal.ct >= 3000).sum() > 20
    assert (clean.ct >= 3000).sum() == 0
    diff = np.abs(metal.ct.astype(float) - clean.ct.astype(float))
    assert (diff > 100).sum() > 5 * (metal.ct >= 3000).sum()  # streaks reach beyond the metal


def test_invalid_spec_names_the_field():
    with pytest.raises(ValueError, match="n_lumbar=7"):
        CaseSpec(n_lumbar=7)
    with pytest.raises(ValueError, match="fov='pelvis'"):
        CaseSpec(fov="pelvis")


@pytest.mark.slow
def test_paper_scale_case():
    t0 = time.perf_counter()
    case = generate_case(CaseSpec(seed=1, fov="abdomen", spacing_mm=(0.75, 0.75, 0.8), fov_xy_mm=384.0))
    dt = time.perf_counter() - t0
    assert case.ct.shape[:2] == (512, 512)
    assert case.ct.shape[2] > 400
    assert {20, 21, 22, 23, 24} <= set(np.unique(case.mask).tolist())
    assert dt < 600


def test_scans_of_one_patient_share_anatomy_and_match_single_renders():
    zr = (-320.0, -200.0)
    base = CaseSpec(seed=31, fov="abdomen", spacing_mm=(4.0, 4.0, 4.0), colon_gas=True, z_range_mm=zr, noise_hu=10.0)
    prone = CaseSpec(seed=31, fov="abdomen", spacing_mm=(4.0, 4.0, 4.0), colon_gas=True, z_range_mm=zr, noise_hu=10.0,
                     position="prone", scan_seed=1)
    pair = generate_scans([base, prone])
    for case in pair:
        single = generate_case(case.spec)
        assert single.ct.tobytes() == case.ct.tobytes()
        assert single.mask.tobytes() == case.mask.tobytes()
    sup, pro = pair
    assert sup.mask.tobytes() == pro.mask.tobytes()
    # gravity: the tagged fluid lies posterior (supine) or anterior (prone) in the colon
    from lib.synthetic.phantom import T_FLUID, T_GAS, T_TABLE

    def fluid_offset(case):
        yy = np.arange(case.ct.shape[1])[None, :, None]
        fl = np.broadcast_to(yy, case.ct.shape)[case.tissue == T_FLUID].mean()
        gas = np.broadcast_to(yy, case.ct.shape)[case.tissue == T_GAS].mean()
        return fl - gas

    assert fluid_offset(sup) < 0 < fluid_offset(pro)
    ty_sup = np.nonzero((sup.tissue == T_TABLE).any(axis=(0, 2)))[0].mean()
    ty_pro = np.nonzero((pro.tissue == T_TABLE).any(axis=(0, 2)))[0].mean()
    assert ty_sup < sup.ct.shape[1] / 2 < ty_pro  # table under the back vs under the belly
    with pytest.raises(ValueError, match="differ only"):
        generate_scans([base, replace(base, n_lumbar=6)])


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (0.8, 0.8, 0.8)])
def test_noise_has_the_requested_sd(spacing):
    base = dict(seed=2, fov="verse_crop", crop_levels=(20, 21), spacing_mm=spacing)
    clean = generate_case(CaseSpec(noise_hu=0.0, **base))
    noisy = generate_case(CaseSpec(noise_hu=25.0, **base))
    d = noisy.ct.astype(float) - clean.ct
    assert abs(d.std() - 25.0) < 1.0
    assert abs(np.mean(d ** 4) / d.std() ** 4 - 3.0) < 0.3  # Gaussian, not uniform
