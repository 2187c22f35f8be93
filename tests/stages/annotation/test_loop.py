"""lib.stages.annotation.loop: rounds improve, test splits never trained on, kill -9 then resume."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pandas as pd

from lib.core.paths import REPO_ROOT
from lib.stages.annotation.ledger import Ledger
from lib.stages.annotation.loop import rounds_table, special_cases
from tests.helpers.spines import make_cases, run

TIMESTAMPS = ["started_at", "finished_at"]


def test_rounds_improve_and_test_splits_never_trained_on(tmp_path):
    run(tmp_path)
    with Ledger(tmp_path / "ledger.sqlite") as led:
        table = rounds_table(led)
        entries = led.entries()
        assert set(led.accepted()) == {f"liver_{i:03d}" for i in range(8)}
    assert len(table) == 4
    assert list(table["split"]) == ["trainset", "trainset", "test_public", "test_private"]
    assert list(table["model_version"]) == [0, 1, 2, 2]  # retrained after each trainset batch only
    assert table["pre_dice_mean"].iloc[-1] > table["pre_dice_mean"].iloc[0]
    assert table["minutes_per_case"].iloc[-1] < table["minutes_per_case"].iloc[0]
    trained = (tmp_path / "work" / "models" / "round_02" / "model.json").read_text()
    assert "liver_004" not in trained
    assert "liver_006" not in trained
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
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.spines", str(killed), "0.15"], env=env,
                            cwd=REPO_ROOT)
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
