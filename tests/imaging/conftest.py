"""Fixtures shared by the tests of this folder."""

from __future__ import annotations

import pytest

from lib.synthetic import phantom


@pytest.fixture(scope="module")
def l6_case():
    return phantom.generate_case(phantom.CaseSpec(seed=3, n_lumbar=6, fov="abdomen", spacing_mm=(2.0, 2.0, 2.0)))

