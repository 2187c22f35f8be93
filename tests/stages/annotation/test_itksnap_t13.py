"""lib.stages.annotation.itksnap: T13 (28) is imported for a case whose data may hold it, refused
elsewhere, and every other bad mask is still refused."""

from __future__ import annotations

import numpy as np

from lib.core import labels as L
from lib.io import load_volume, save_volume
from lib.stages.annotation.itksnap import case_labels, export_for_itksnap, import_edited
from lib.stages.annotation.ledger import Ledger
from tests.helpers.spines import AFFINE, SHAPE, make_cases, spine_mask

WITH_T13 = [24, 23, 22, 21, 20, 28]  # L5..L1, T13: 13 thoracic vertebrae


def test_t13_is_accepted_only_where_the_data_may_hold_it_and_other_faults_still_refused(tmp_path):
    cases = make_cases(tmp_path, n=4)
    verse_like, plain, bad_label, bad_shape = (c.case_id for c in cases)
    t13_cases = {verse_like, bad_label, bad_shape}
    work = [(c.case_id, c.image, c.image) for c in cases]  # the image stands in for a pre-annotation
    out = export_for_itksnap(tmp_path / "export", work, t13_cases=t13_cases)
    assert '"T13"' in (out / verse_like / "labels.txt").read_text()
    assert '"T13"' not in (out / plain / "labels.txt").read_text()  # not offered where it is refused
    assert '"L6"' in (out / plain / "labels.txt").read_text()

    t13 = spine_mask(WITH_T13)
    for cid in (verse_like, plain):
        save_volume(t13, AFFINE, out / cid / f"{cid}_seg.nii.gz")
    t99 = t13.copy()
    t99[5, 5, 5] = 99
    save_volume(t99, AFFINE, out / bad_label / f"{bad_label}_seg.nii.gz")
    save_volume(np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.uint8), AFFINE, out / bad_shape / f"{bad_shape}_seg.nii.gz")
    with Ledger(tmp_path / "l.sqlite") as led:
        led.enqueue([c.case_id for c in cases], [c.split for c in cases])
        res = import_edited(led, 1, out, {c.case_id: c.mask.parent for c in cases}, model_version=0,
                            t13_cases=t13_cases)
        assert res.accepted == [verse_like]
        assert set(res.refused) == {plain, bad_label, bad_shape}
        assert "[28]" in res.refused[plain]
        assert "T13 = 28 is accepted only for cases whose data may hold it" in res.refused[plain]
        assert "[99]" in res.refused[bad_label]
        assert "T13" not in res.refused[bad_label]  # 28 was allowed there: only 99 is named
        assert "shape" in res.refused[bad_shape]
        assert {led.case_status(c) for c in (plain, bad_label, bad_shape)} == {"queued"}
    saved = cases[0].mask
    assert saved.exists()
    assert set(np.unique(load_volume(saved).array)) == {0, *WITH_T13}


def test_without_t13_cases_a_t13_mask_is_refused_as_before(tmp_path):
    cases = make_cases(tmp_path, n=4)[:1]
    cid = cases[0].case_id
    out = export_for_itksnap(tmp_path / "export", [(cid, cases[0].image, cases[0].image)])
    save_volume(spine_mask(WITH_T13), AFFINE, out / cid / f"{cid}_seg.nii.gz")
    with Ledger(tmp_path / "l.sqlite") as led:
        led.enqueue([cid], [cases[0].split])
        res = import_edited(led, 1, out, {cid: cases[0].mask.parent}, model_version=0)
    assert res.accepted == []
    assert "[28]" in res.refused[cid]
    assert case_labels(cid) == list(L.CTSPINE1K_LABELS)
    assert case_labels(cid, t13_cases={cid}) == L.ordered([*L.CTSPINE1K_LABELS, L.T13])
