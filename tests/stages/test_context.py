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
    assert rec["extra"] == {"cases": 3, "failed_cases": [], "n_failed": 0}
    env = rec["environment"]
    assert env["git_sha"]
    assert env["packages"]["numpy"]
    assert env["device"].startswith("cpu")


def test_failures_are_written_recorded_and_counted_once():
    from lib.core.parallel import CaseFailure
    from lib.io.integrity import Fault
    from lib.stages.context import FAILED_CASES_CSV

    ctx = StageContext.start("04_benchmark", _namespace("04_benchmark", on_error="collect"))
    ctx.write_record({})
    empty = (ctx.dir / FAILED_CASES_CSV).read_text().splitlines()
    assert empty == ["case_id,step,file,kind,message"]  # written even when nothing failed
    assert ctx.add_failures("predict", [CaseFailure("test_public/a", "NiftiReadError: a.nii.gz: truncated")]) == 1
    assert ctx.add_failures("predict", [CaseFailure("test_public/a", "again")]) == 0  # once per step and case
    ctx.add_failures("evaluate test_public", [{"case_id": "b", "file": "/x/b_seg.nii.gz", "kind": "unknown_label",
                                                "message": "/x/b_seg.nii.gz: unexpected label values [99]"}])
    ctx.add_failures("select", [Fault("/x/c.nii.gz", "3 NaN/inf voxels")])
    ctx.write_record({"k": 1})
    import pandas as pd
    df = pd.read_csv(ctx.dir / FAILED_CASES_CSV, keep_default_na=False)
    assert df["case_id"].tolist() == ["test_public/a", "b", "c.nii.gz"]
    assert df["step"].tolist() == ["predict", "evaluate test_public", "select"]
    assert df.loc[1, "kind"] == "unknown_label"
    rec = json.loads((ctx.dir / "run_record.json").read_text())
    assert rec["extra"]["n_failed"] == 3
    assert rec["extra"]["k"] == 1
    assert rec["extra"]["failed_cases"][2]["file"] == "/x/c.nii.gz"


def test_on_error_raise_fails_the_stage_after_writing_the_record():
    from lib.core.parallel import CaseFailure
    from lib.stages.context import FAILED_CASES_CSV, StageFailuresError

    ctx = StageContext.start("05_failure_l6", _namespace("05_failure_l6", on_error="raise"))
    ctx.write_record({})  # nothing failed: no error
    ctx.add_failures("detect_and_correct", [CaseFailure("test_private/x", "IntegrityError: x_seg.nii.gz: 4 NaN")])
    with pytest.raises(StageFailuresError, match=r"(?s)1 failed case.*test_private/x.*NaN"):
        ctx.write_record({})
    assert "test_private/x" in (ctx.dir / FAILED_CASES_CSV).read_text()
    assert json.loads((ctx.dir / "run_record.json").read_text())["extra"]["n_failed"] == 1
