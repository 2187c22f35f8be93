"""lib.ml.ddp: two gloo processes train the curve one process trains."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

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
    plan = tiny_plan(cases)
    st = plan.stages[1]
    plan = plans.Plan(**{**plan.__dict__, "stages": [st], "combine": "single"})  # one stage, foreground only
    plan.stages[0].budget_share = 1.0
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
    assert two[-1] < 0.8 * two[0] and one[-1] < 0.8 * one[0]
    assert np.corrcoef(one, two)[0, 1] > 0.9
    assert abs(two[0] - one[0]) / one[0] < 0.15  # same init, same global batch
