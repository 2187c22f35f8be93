"""Shared fixtures: every test writes under a temporary data/runs root, never the repo's."""

from __future__ import annotations

import os
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest

from lib.synthetic import generate
from tests.helpers.synthetic_sources import _tiny_cfg

matplotlib.use("Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def isolated_roots(tmp_path, monkeypatch):
    """Point SPINE1K_DATA / SPINE1K_RUNS at tmp folders for every test."""
    monkeypatch.setenv("SPINE1K_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("SPINE1K_RUNS", str(tmp_path / "runs"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def one_torch_thread():
    """torch on one CPU thread for the test (restored after): small networks, stable timings."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One tiny generated source tree shared by the module (fixed folders, not env-derived)."""
    root = tmp_path_factory.mktemp("data") / "ci"
    p = SimpleNamespace(profile="ci", sources=root / "sources", oracle=root / "oracle")
    report = generate.generate_sources(p, _tiny_cfg(), workers=0, progress=False)
    return p, report

