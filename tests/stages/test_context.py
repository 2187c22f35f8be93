"""lib.stages.context: the stage context validates the parameters, makes the folders, seeds, records."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lib.core import params
from lib.stages.context import StageContext


def _namespace(stage: str, profile: str = "ci", **overrides) -> dict:
    values = params.load_params(params.params_file(profile, stage), stage)
    values.update(overrides)
    return values


def test_start_validates_creates_folders_and_seeds():
    ctx = StageContext.start("04_benchmark", _namespace("04_benchmark", seed=3), seed=True)
    assert ctx.P.profile == "ci"
    assert ctx.dir.name == "04_benchmark"
    assert ctx.figures.is_dir()
    assert ctx.tables.is_dir()
    first = (random.random(), np.random.random())
    StageContext.start("04_benchmark", _namespace("04_benchmark", seed=3), seed=True)
    assert (random.random(), np.random.random()) == first
    with pytest.raises(params.ParamsError, match="hd95.*'pooled', 'max'|HD95"):
        StageContext.start("04_benchmark", _namespace("04_benchmark", hd95="median"))
    with pytest.raises(params.ParamsError, match="max_epochs"):
        StageContext.start("04_benchmark", _namespace("04_benchmark", max_epochs="many"))


def test_write_record_holds_environment_parameters_timings_and_extra():
    ctx = StageContext.start("05_failure_l6", _namespace("05_failure_l6"))
    with ctx.timings("detect"):
        pass
    rec = json.loads(ctx.write_record({"cases": 3}).read_text())
    assert rec["parameters"]["profile"] == "ci"
    assert "detect" in rec["timings_s"]
    assert rec["extra"] == {"cases": 3}
    env = rec["environment"]
    assert env["git_sha"]
    assert env["packages"]["numpy"]
    assert env["device"].startswith("cpu")
