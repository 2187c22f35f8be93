"""Fault corpus, parameters: a wrong value fails before anything runs, naming the file, the
parameter and what it accepts."""

from __future__ import annotations

import pytest

from lib.core import params
from tests.reliability.corpus import Fault, faults


def _bad(stage, old, new, expect):
    def check(run):
        src = params.params_file("ci", stage).read_text()
        assert old in src, f"params/ci/{stage}.yaml no longer holds {old!r}"
        f = run.tmp / "ci" / f"{stage}.yaml"
        f.parent.mkdir(parents=True)
        f.write_text(src.replace(old, new, 1))
        with pytest.raises(params.ParamsError, match=expect) as err:
            params.load_params(f, stage)
        assert f.name in str(err.value)
        run.told(str(err.value).split(": ", 1)[-1][:110])
    return check


FAULTS = faults(
    Fault("pa-01", "params", "hd95: median (no such definition)", _bad("04_benchmark", "hd95: pooled", "hd95: median",
                                                                      "hd95.*'pooled' or 'max'")),
    Fault("pa-02", "params", "on_error: ignore", _bad("05_failure_l6", "on_error: collect", "on_error: ignore",
                                                      "on_error.*'collect' or 'raise'")),
    Fault("pa-03", "params", "mode: simulate (typo of a choice)", _bad("03_annotation", "mode: simulated",
                                                                       "mode: simulate", "mode")),
    Fault("pa-04", "params", "init_from: warm", _bad("04_benchmark", "init_from: annotation", "init_from: warm",
                                                     "init_from")),
    Fault("pa-05", "params", "a misspelt parameter name (max_epoch)", _bad("04_benchmark", "max_epochs:", "max_epoch:",
                                                                           "max_epoch")),
    Fault("pa-06", "params", "a number given as text (max_epochs: two)", _bad("04_benchmark", "max_epochs: 2",
                                                                              "max_epochs: two", "max_epochs")),
    Fault("pa-07", "params", "profile: synthtic", _bad("04_benchmark", "profile: ci", "profile: synthtic", "profile")),
)


@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_fault(fault, run):
    fault.check(run)
