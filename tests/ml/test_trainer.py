"""lib.ml.trainer: training learns, is deterministic, fine-tunes, resumes bit-exactly after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from lib.core.paths import REPO_ROOT
from lib.io import load_volume
from lib.ml import checkpoint, ddp, networks, plans, trainer
from tests.helpers.plans import tiny_plan
from tests.helpers.toy_cases import toy_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(out_dir):
    return torch.load(out_dir / "model.pt", weights_only=False)["weights"]


def _equal(a, b):
    return all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s]) and a.keys() == b.keys()


def test_training_learns_is_deterministic_and_writes_outputs(tmp_path):
    cases = toy_cases(tmp_path / "d", 4)
    plan = tiny_plan(cases)
    kw = dict(val_cases=cases[3:], max_epochs=10, iterations_per_epoch=4, seed=1, progress=False, device="cpu")
    r1 = trainer.train(cases[:3], tmp_path / "a", plan, **kw)
    r2 = trainer.train(cases[:3], tmp_path / "b", plan, **kw)
    assert _equal(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    log = pd.read_csv(r1.log_csv)
    assert list(log["stage"].unique()) == ["locate", "coarse", "fine"]
    assert r1.epochs == {s.name: max(1, round(10 * s.budget_share)) for s in plan.stages}
    fine = log[log.stage == "fine"]
    assert fine["train_loss"].iloc[-1] < fine["train_loss"].iloc[0]
    coarse = log[log.stage == "coarse"]
    assert coarse["lr"].iloc[1] < coarse["lr"].iloc[0]  # poly decay
    assert r1.log_csv.stat().st_size > 100
    assert (tmp_path / "a" / "plan.json").exists()
    assert plans.load_plan(tmp_path / "a") == plan
    # another seed gives other weights; a finished run is returned without training
    r3 = trainer.train(cases[:3], tmp_path / "c", plan, **{**kw, "seed": 2})
    assert not _equal(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    t0 = time.perf_counter()
    again = trainer.train(cases[:3], tmp_path / "a", plan, **kw)
    assert time.perf_counter() - t0 < 1.0
    assert again.model_path == r1.model_path
    assert r3.seconds > 0
    assert r2.final_metrics["fine"]["epoch"] == r1.epochs["fine"]


def test_fine_tune_starts_from_previous_weights(tmp_path):
    cases = toy_cases(tmp_path / "d", 3)
    plan = tiny_plan(cases)
    base = trainer.train(cases, tmp_path / "base", plan, max_epochs=4, iterations_per_epoch=3, seed=0, progress=False)
    # zero learning rate: fine-tuned weights must equal the initial ones exactly
    ft = trainer.train(cases[:2], tmp_path / "ft", None, init_from=base.model_dir, max_epochs=2,
                     iterations_per_epoch=2, lr=1e-12, seed=5, progress=False, augment=False)
    assert plans.load_plan(ft.model_dir) == plan
    a, b = _weights(tmp_path / "base"), _weights(tmp_path / "ft")
    diff = max(float((a[s][k].float() - b[s][k].float()).abs().max()) for s in a for k in a[s])
    assert diff < 1e-6
    # fine-tune one stage only: the others keep their weights and the model stays complete
    one = trainer.train(cases[:2], tmp_path / "one", None, init_from=base.model_dir, max_epochs=1,
                      iterations_per_epoch=2, seed=5, progress=False, stages=["coarse"])
    w1 = _weights(one.model_dir)
    assert set(w1) == {"locate", "coarse", "fine"}
    assert all(torch.equal(w1["fine"][k], a["fine"][k]) for k in a["fine"])
    assert not all(torch.equal(w1["coarse"][k], a["coarse"][k]) for k in a["coarse"])
    # a plan with another label set: shared layers initialised, the output head starts fresh
    plan2 = tiny_plan(cases, labels=[20, 21])
    net = networks.build_network(plan2, "coarse")
    skipped = checkpoint.init_state(net, a["coarse"], "base")
    assert skipped
    assert all(("output_block" in k) or ("deep_supervision" in k) or ("super_head" in k) for k in skipped)


def test_time_budget_stops_training(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    plan = tiny_plan(cases)
    res = trainer.train(cases, tmp_path / "t", plan, max_epochs=1000, iterations_per_epoch=2, time_budget_s=3.0,
                      progress=False)
    assert set(res.stopped_by.values()) == {"time"}
    assert res.seconds < 6.0
    assert sum(res.epochs.values()) < 1000


_KILL_SCRIPT = """
import os, signal, sys, torch
from lib.ml import ddp, sampling
torch.set_num_threads(1)
k = int(sys.argv[2])
batch = sampling.PatchSampler.batch
def batch_then_die(self, epoch, iteration, *a, **kw):
    # SIGKILL in the middle of epoch k (0-based epoch k - 1) of the coarse stage: its checkpoint
    # of epoch k - 1 is on disk, one batch of epoch k has been trained, and nothing else is flushed
    if self.stage.name == "coarse" and epoch == k - 1 and iteration == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return batch(self, epoch, iteration, *a, **kw)
sampling.PatchSampler.batch = batch_then_die
ddp.run_job(sys.argv[1])
"""


def test_kill_during_epoch_and_resume_equals_uninterrupted(tmp_path):
    cases = toy_cases(tmp_path / "d", 3)
    plan = tiny_plan(cases)
    kw = dict(max_epochs=10, iterations_per_epoch=6, seed=4, progress=False, device="cpu", num_threads=1)
    ref = trainer.train(cases, tmp_path / "ref", plan, **kw)
    job = ddp.write_job(tmp_path / "job.json", cases, tmp_path / "run", plan, **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    k = 3  # killed during epoch 3 of the coarse stage, once the checkpoint of epoch 2 exists
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(job), str(k)], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    ckpt = tmp_path / "run" / "stage_coarse" / "checkpoint.pt"
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    killed_at = torch.load(ckpt, weights_only=False)["epoch"]
    assert killed_at == k - 1, f"killed after epoch {killed_at}, wanted during epoch {k}"
    assert not (tmp_path / "run" / "model.pt").exists()
    res = ddp.run_job(job)
    assert res.resumed_from["coarse"] == k - 1
    assert _equal(_weights(tmp_path / "ref"), _weights(tmp_path / "run"))
    a, b = pd.read_csv(ref.log_csv), pd.read_csv(res.log_csv)
    assert np.allclose(a["train_loss"], b["train_loss"], rtol=0, atol=0)


def test_train_rejects_unknown_labels(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    plan = tiny_plan(cases, labels=[20, 21, 22])
    with pytest.raises(Exception, match=r"t0_seg.*\[23\]"):
        trainer.train(cases, tmp_path / "x", plan, max_epochs=1, iterations_per_epoch=1, progress=False)
    # label_map can drop a value instead
    plan2 = tiny_plan(cases, labels=[20, 21, 22], label_map={23: 0})
    res = trainer.train(cases, tmp_path / "y", plan2, max_epochs=2, iterations_per_epoch=1, progress=False)
    assert res.model_path.exists()
    assert load_volume(cases[0][2]).array.max() == 23


def test_nan_gradients_of_a_finite_loss_stop_training_before_a_step(tmp_path, monkeypatch):
    cases = toy_cases(tmp_path / "d", 2)
    real, calls = trainer.deep_loss, {"n": 0}

    def nan_gradients_at_4(loss_fn, out, y, ds):
        calls["n"] += 1
        value = real(loss_fn, out, y, ds)
        # forward: value + 0 (finite); backward: 0 * d sqrt(x)/dx at 0 = 0 * inf = NaN for every weight
        return value + 0.0 * torch.sqrt(value - value) if calls["n"] == 4 else value

    monkeypatch.setattr(trainer, "deep_loss", nan_gradients_at_4)
    with pytest.raises(trainer.NonFiniteError, match=r"gradient norm nan in stage 'coarse', epoch 2, step 1") as err:
        trainer.train(cases, tmp_path / "m", tiny_plan(cases), stages=["coarse"], max_epochs=3,
                      iterations_per_epoch=2, progress=False, device="cpu", num_threads=1)
    assert err.value.case_ids  # the batch's cases are named
    state = torch.load(tmp_path / "m" / "stage_coarse" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1  # the last good epoch; the NaN step was not taken
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_floating_point(v))
    assert not (tmp_path / "m" / "stage_coarse" / "final.pt").exists()
