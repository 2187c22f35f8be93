"""lib.ml.ddp: two gloo processes train the curve one process trains."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lib.core.paths import REPO_ROOT
from lib.ml import ddp, plans, trainer
from tests.helpers.plans import tiny_plan
from tests.helpers.toy_cases import toy_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_gloo_matches_one_process_curve(tmp_path):
    cases = toy_cases(tmp_path / "d", 4)
    # one stage alone: the tiny plan's coarse stage as a softmax "labels" stage (a "single" plan's
    # last and only stage must be one) on the whole field of view, without the locate stage's
    # region of interest and inference gate
    plan = tiny_plan(cases, coarse_task="labels")
    st = dataclasses.replace(plan.stages[1], roi_from=None, budget_share=1.0)
    inference = {k: v for k, v in plan.inference.items() if k != "gate"}
    plan = plans.Plan(**{**plan.__dict__, "stages": [st], "combine": "single", "inference": inference})
    plans.validate_plan(plan)  # the job file's plan is validated again in every torchrun process
    kw = dict(max_epochs=8, iterations_per_epoch=4, seed=0, progress=False, device="cpu", num_threads=1)
    single = trainer.train(cases, tmp_path / "one", plan, **kw)
    job = ddp.write_job(tmp_path / "job.json", cases, tmp_path / "two", plan, **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lib.ml.ddp", "--job", str(job)]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    one = pd.read_csv(single.log_csv)["train_loss"].to_numpy()
    two = pd.read_csv(res["log_csv"])["train_loss"].to_numpy()
    assert len(one) == len(two) == 8
    assert two[-1] < 0.8 * two[0]
    assert one[-1] < 0.8 * one[0]
    # same init, same global batch, gradients averaged: the same curve (the batch Dice of a half
    # batch per process is not that of the whole batch, so close, not bit-identical)
    assert np.allclose(two, one, rtol=0.01, atol=0)
    w1 = torch.load(single.model_path, weights_only=False)["weights"][st.name]
    w2 = torch.load(res["model_path"], weights_only=False)["weights"][st.name]
    assert w1.keys() == w2.keys()
    v1, v2 = (torch.cat([w[k].float().flatten() for k in sorted(w1)]) for w in (w1, w2))
    assert float((v1 - v2).norm() / v1.norm()) < 0.1
