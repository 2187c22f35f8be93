"""The VerSe counts the synthetic and ci profiles plan: enough complete scans for 02 to train on
and for a Test_VerSe of held-out scans, plus cropped scans for VerSe_cropped (plan only, nothing
rendered)."""

from __future__ import annotations

import pytest
import yaml

from lib.synthetic.source_plan import plan_sources
from tests.helpers.synthetic_sources import REPO


def _expected(profile: str) -> dict[str, int]:
    """Planned VerSe scans: complete with the mask on the CT grid (usable), cropped, and 02's split."""
    cfg = yaml.safe_load((REPO / "params" / profile / "00_sources.yaml").read_text())
    n_holdout = yaml.safe_load((REPO / "params" / profile / "02_pretraining.yaml").read_text())["n_holdout"]
    items = [i for i in plan_sources(cfg) if i["source"] == "VerSe"]
    usable = sum(i["series_description"] == "complete" and i["mask_zoom"] is None for i in items)
    held = min(n_holdout, usable - 1)
    return {"total": len(items), "usable": usable, "train": usable - held, "held_out": held,
            "cropped": sum(i["series_description"] == "cropped" for i in items)}


@pytest.mark.parametrize(("profile", "counts"), [
    ("synthetic", {"total": 60, "usable": 32, "train": 22, "held_out": 10, "cropped": 21}),
    ("ci", {"total": 4, "usable": 2, "train": 1, "held_out": 1, "cropped": 1}),
])
def test_profiles_plan_a_held_out_test_verse_without_shrinking_pretraining(profile, counts):
    got = _expected(profile)
    assert got == counts
    if profile == "synthetic":
        assert got["held_out"] >= 10  # Test_VerSe when 04 warm-starts from 02's model
        assert got["train"] >= 20  # 02 trained on 20 scans before the hold-out grew (n_holdout 3 of 23)
