"""lib.stages.pretraining: the selection and the hold-out by subject on the real download layout, the
cropped scans scored for information, the scores."""

from __future__ import annotations

import pandas as pd
import pytest

from lib.core import params
from lib.core.paths import for_profile
from lib.stages import pretraining
from lib.stages.context import StageContext
from tests.helpers.verse_tree import write_downloads


def _ctx(**overrides) -> StageContext:
    values = params.load_params(params.params_file("ci", "02_pretraining"), "02_pretraining")
    values.update(overrides)
    return StageContext("02_pretraining", params.Params(**values), for_profile("ci"))


def _triples(n: int) -> list[tuple[str, str, str]]:
    return [(f"sub-verse{i:03d}", f"/x/sub-verse{i:03d}_ct.nii.gz", f"/x/sub-verse{i:03d}_seg.nii.gz") for i in range(n)]


def test_hold_out_is_seeded_keeps_one_training_scan_and_writes_the_split():
    ctx = _ctx(n_holdout=3, seed=5)
    train, held, table = pretraining.hold_out(ctx, _triples(3))
    assert len(train) == 1
    assert len(held) == 2
    written = pd.read_csv(ctx.tables / "split.csv")
    assert written.groupby("split").size().to_dict() == {"heldout": 2, "train": 1}
    assert pretraining.hold_out(ctx, _triples(3))[:2] == (train, held)
    other = pretraining.hold_out(_ctx(n_holdout=3, seed=6), _triples(8))[1]
    assert other != pretraining.hold_out(ctx, _triples(8))[1]
    with pytest.raises(RuntimeError, match="no usable"):
        pretraining.hold_out(ctx, [])


def test_cropped_cases_follow_the_params_and_the_exclusion_summary_counts_reasons():
    sel = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "image": list("ABCD"), "mask": list("abcd"),
                        "usable": [True, False, False, False],
                        "reason": ["", "cropped: the spine starts at C4", "cropped: no sacrum", "mask spacing 1 mm differs"]})
    assert [c[0] for c in pretraining.cropped_cases(_ctx(evaluate_cropped=True, max_cropped_cases=0), sel)] == ["b", "c"]
    assert [c[0] for c in pretraining.cropped_cases(_ctx(evaluate_cropped=True, max_cropped_cases=1), sel)] == ["b"]
    assert pretraining.cropped_cases(_ctx(evaluate_cropped=False), sel) == []
    summary = pretraining.exclusion_summary(sel)["excluded scans"].to_dict()
    assert summary == {"cropped": 2, "mask spacing 1 mm differs": 1}


def test_scores_take_the_headline_numbers_of_a_summary():
    summary = {"mean_of_spine": {"dice": {"mean": 0.93}},
               "mean_of_vertebrae": {"dice": {"mean": 0.88}, "hd95": {"mean": 3.3}, "identification_rate_pooled": 1.0}}
    assert pretraining.scores(summary, 4.5) == {"spine_dice": 0.93, "vertebra_dice": 0.88, "vertebra_hd95_mm": 3.3,
                                                "identification_rate": 1.0, "seconds_per_scan": 4.5}


def test_select_and_hold_out_work_on_the_real_download_layout_by_subject(tmp_path):
    root = tmp_path / "downloads"
    ct = write_downloads(root)
    ctx = _ctx(verse_dir=str(root), n_holdout=1)
    usable, selection = pretraining.select(ctx)
    assert len(selection) == 7
    assert len(usable) == 4
    dups = pd.read_csv(ctx.tables / "verse_duplicates.csv")
    assert len(dups) == 3
    [entry] = pretraining.duplicates_summary(dups)
    assert entry["scan"] == "sub-verse012"
    assert entry["kept"] == str(ct["012_v20"])
    assert {c["image"] for c in entry["copies"]} == {str(ct["012_v19"]), str(ct["012_v20"]), str(ct["012_challenge"])}
    sides_of_gl003 = set()
    for seed in range(8):
        ctx = _ctx(verse_dir=str(root), n_holdout=1, seed=seed)
        train, held, _ = pretraining.hold_out(ctx, usable)  # subjects from tables/verse_selection.csv
        split = pd.read_csv(ctx.tables / "split.csv")
        assert list(split.columns) == ["case_id", "subject", "release", "split"]
        assert split.groupby("subject")["split"].nunique().max() == 1, split
        assert split.set_index("case_id").loc["sub-gl003_dir-ax", "release"] == "verse20training"
        assert held
        sides_of_gl003.add(split.set_index("case_id").loc["sub-gl003_dir-ax", "split"])
    assert sides_of_gl003 == {"train", "heldout"}
