"""lib.annotation: ledger, simulated tiers, human import, resumable rounds (kill -9)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lib.stages.annotation.itksnap import export_for_itksnap, import_edited
from lib.imaging.label_shift import level_offsets, relabel, variant_of
from lib.stages.annotation.ledger import ENTRY_COLUMNS, Ledger
from lib.stages.annotation.loop import rounds_table, special_cases
from lib.stages.annotation.tiers import SimulatedTiers, tiers_from_params
from lib.io import save_volume
from tests.annotation_fixtures import AFFINE, SHAPE, FakeModel, make_cases, run, spine_mask

TIMESTAMPS = ["started_at", "finished_at"]


def test_level_offsets_find_a_shift():
    truth = spine_mask([25, 24, 23, 22, 21, 20])
    shifted = relabel(truth, {v: -1 for v in range(20, 26)})  # L6 called L5, ..., L1 called T12
    offs = level_offsets(truth, shifted)
    assert offs == {v: -1 for v in range(20, 26)}
    assert set(np.unique(shifted)) == {0, 19, 20, 21, 22, 23, 24}
    assert variant_of(truth) == "L6" and variant_of(spine_mask([23, 22, 21, 20])) == "missing_L5"


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
    assert res[1].tier == "senior_1" and res[1].relabelled == 6  # senior relabels the shifted run


def test_variant_goes_to_the_expert(rng):
    truth = spine_mask([25, 24, 23, 22, 21, 20])
    pre = _pre_with_errors(truth, rng, shift=-1)
    spec = {"junior": {"shift_catch_rate": 0.0, "boundary_residual": 0.0}, "senior": {"shift_catch_rate": 1.0},
            "double_check": {"sample_fraction": 0.0}}
    res = SimulatedTiers(tiers_from_params(spec), seed=0).annotate("c", 1, pre, truth, 0.008)
    assert [r.tier for r in res] == ["junior", "senior_1", "senior_2", "expert"]
    assert res[1].sent_to_expert and res[-1].sent_to_expert and np.array_equal(res[-1].mask, truth)
    assert res[-1].minutes > res[1].minutes  # the expert's relabelling costs time


def test_tier_params_reject_unknown_fields():
    with pytest.raises(ValueError, match="junior: unknown fields \\['shift_rate'\\]"):
        tiers_from_params({"junior": {"shift_rate": 0.5}})


def test_ledger_refuses_duplicates(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        led.enqueue(["a"], ["trainset"])
        row = dict.fromkeys(ENTRY_COLUMNS, 0) | {"case_id": "a", "round": 1, "tier": "junior", "actor": "j",
                                                     "started_at": "t", "finished_at": "t", "variant": "", "note": ""}
        led.record_case("a", 1, [row], "m", 0.5)
        with pytest.raises(sqlite3.IntegrityError):
            led.record_case("a", 1, [row], "m", 0.5)
        assert len(led.entries()) == 1 and led.accepted() == ["a"]


def test_rounds_improve_and_test_splits_never_trained_on(tmp_path):
    run(tmp_path)
    with Ledger(tmp_path / "ledger.sqlite") as led:
        table = rounds_table(led)
        entries = led.entries()
        assert set(led.accepted()) == {f"liver_{i:03d}" for i in range(8)}
    assert len(table) == 4 and list(table["split"]) == ["trainset", "trainset", "test_public", "test_private"]
    assert list(table["model_version"]) == [0, 1, 2, 2]  # retrained after each trainset batch only
    assert table["pre_dice_mean"].iloc[-1] > table["pre_dice_mean"].iloc[0]
    assert table["minutes_per_case"].iloc[-1] < table["minutes_per_case"].iloc[0]
    trained = (tmp_path / "work" / "models" / "round_02" / "model.json").read_text()
    assert "liver_004" not in trained and "liver_006" not in trained  # test cases
    assert not entries.duplicated(["case_id", "round", "tier"]).any()
    gt = sorted(p.name for p in (tmp_path / "release").glob("*/gt/*_seg.nii.gz"))
    assert len(gt) == 8
    assert special_cases(Ledger(tmp_path / "ledger.sqlite"))["L6"] == ["liver_000", "liver_003", "liver_006"]


def _tables(root):
    with Ledger(root / "ledger.sqlite") as led:
        e = led.entries().drop(columns=TIMESTAMPS)
        return e, rounds_table(led), led.cases().drop(columns=["updated_at", "mask_path"])


def test_kill_9_mid_round_then_resume_equals_uninterrupted(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for root in (ref, killed):
        root.mkdir()
        make_cases(root)
    run(ref)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "tests.annotation_fixtures", str(killed), "0.15"], env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    db = killed / "ledger.sqlite"
    deadline = time.time() + 60
    n = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as c:
                    n = c.execute("SELECT COUNT(DISTINCT case_id) FROM entries").fetchone()[0]
            except sqlite3.Error:
                continue
            if n >= 3:
                break
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= n < 8
    run(killed)  # resume
    (e1, t1, c1), (e2, t2, c2) = _tables(ref), _tables(killed)
    pd.testing.assert_frame_equal(e1, e2)
    pd.testing.assert_frame_equal(t1, t2)
    pd.testing.assert_frame_equal(c1, c2)
    for p in (ref / "release").glob("*/gt/*.nii.gz"):
        q = killed / p.relative_to(ref)
        assert np.array_equal(nib.load(str(p)).get_fdata(), nib.load(str(q)).get_fdata())


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
        assert f"{wrong_shape}_seg.nii.gz" in res.refused[wrong_shape] and "shape" in res.refused[wrong_shape]
        assert "[99]" in res.refused[bad_label]
        assert led.case_status(wrong_shape) == "queued" and led.case_status(bad_label) == "queued"
        assert set(led.queued()) == {wrong_shape, bad_label}
        assert len(led.events()) == 2
    assert (cases[0].mask.parent / f"{good}_seg.nii.gz").exists()
    assert not (cases[1].mask.parent / f"{wrong_shape}_seg.nii.gz").exists()
