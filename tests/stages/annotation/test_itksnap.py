"""lib.stages.annotation.itksnap: bad edited masks are refused and stay queued."""

from __future__ import annotations

import numpy as np

from lib.io import save_volume
from lib.stages.annotation.itksnap import export_for_itksnap, import_edited
from lib.stages.annotation.ledger import Ledger
from tests.helpers.spines import AFFINE, SHAPE, FakeModel, make_cases, spine_mask


def test_human_import_refuses_bad_masks_and_keeps_them_queued(tmp_path):
    cases = make_cases(tmp_path, n=4)[:3]
    fake = FakeModel(tmp_path)
    (tmp_path / "m.json").write_text('{"version": 0}')
    work = []
    for c in cases:
        pre = tmp_path / "pre" / f"{c.case_id}_seg.nii.gz"
        fake.predict(tmp_path / "m.json", c.image, pre)
        work.append((c.case_id, c.image, pre))
    out = export_for_itksnap(tmp_path / "export", work)
    good, wrong_shape, bad_label = (c.case_id for c in cases)
    truth = spine_mask([24, 23, 22, 21, 20, 19])
    save_volume(truth, AFFINE, out / good / f"{good}_seg.nii.gz")
    save_volume(np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.uint8), AFFINE, out / wrong_shape / f"{wrong_shape}_seg.nii.gz")
    t99 = truth.copy()
    t99[5, 5, 5] = 99
    save_volume(t99, AFFINE, out / bad_label / f"{bad_label}_seg.nii.gz")
    with Ledger(tmp_path / "l.sqlite") as led:
        led.enqueue([c.case_id for c in cases], [c.split for c in cases])
        res = import_edited(led, 1, out, {c.case_id: c.mask.parent for c in cases}, model_version=0)
        assert res.accepted == [good]
        assert set(res.refused) == {wrong_shape, bad_label}
        assert f"{wrong_shape}_seg.nii.gz" in res.refused[wrong_shape]
        assert "shape" in res.refused[wrong_shape]
        assert "[99]" in res.refused[bad_label]
        assert led.case_status(wrong_shape) == "queued"
        assert led.case_status(bad_label) == "queued"
        assert set(led.queued()) == {wrong_shape, bad_label}
        assert len(led.events()) == 2
    assert (cases[0].mask.parent / f"{good}_seg.nii.gz").exists()
    assert not (cases[1].mask.parent / f"{wrong_shape}_seg.nii.gz").exists()
