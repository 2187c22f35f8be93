"""Helpers shared by the tests split from tests/test_train.py."""

from __future__ import annotations

from lib.ml import planning


def tiny_plan(cases, **kw):
    """A two-stage synthetic plan with very small networks (fast on one CPU thread)."""
    return planning.plan_experiment(cases, "synthetic", base_filters=4, max_filters=16, coarse_spacing_mm=4.0,
                                 roi_margin_mm=8.0, deep_supervision=1, **kw)
