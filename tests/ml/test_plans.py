"""lib.ml.plans: JSON round trip and validation."""

from __future__ import annotations

import pytest

from lib.ml import planning, plans
from tests.helpers.fingerprints import _fp


def test_plan_json_round_trip_and_validation(tmp_path):
    fp = _fp([(2.0, 2.0, 2.0)] * 3, [(64, 64, 128)] * 3, labels=(20, 21, 28))
    plan = planning.plan_experiment(fp, "synthetic", label_map={28: 0})
    assert plan.labels == [20, 21]  # T13 mapped away
    plans.save_plan(plan, tmp_path / "plan.json")
    again = plans.load_plan(tmp_path)
    assert again == plan
    assert again.label_map == {28: 0}
    bad = plans.plan_to_dict(plan)
    bad["stages"][0]["patch_size"] = [13, 13, 13]
    with pytest.raises(ValueError, match="not divisible"):
        plans.plan_from_dict(bad)
    with pytest.raises(FileNotFoundError):
        plans.load_plan(tmp_path / "nothing")
