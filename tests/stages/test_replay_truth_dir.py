"""03_annotation's replay_truth_dir: a relative path is taken under the profile's data folder."""

from __future__ import annotations

import pytest

from lib.core import params
from lib.stages.annotation.stage import replay_truth_root
from lib.stages.context import StageContext


def _ctx(value: str) -> StageContext:
    values = params.load_params(params.params_file("paper", "03_annotation"), "03_annotation")
    values.update(replay_truth_dir=value)
    return StageContext.start("03_annotation", values)


def test_relative_absolute_empty_and_missing_replay_truth_dir(tmp_path):
    ctx = _ctx(params.load_params(params.params_file("paper", "03_annotation"), "03_annotation")["replay_truth_dir"])
    assert not ctx.P.replay_truth_dir.startswith("/")  # the paper profile names no machine's folder
    with pytest.raises(FileNotFoundError, match="replay_truth_dir"):
        replay_truth_root(ctx)
    (ctx.paths.data / ctx.P.replay_truth_dir / "trainset" / "gt").mkdir(parents=True)
    assert replay_truth_root(ctx) == ctx.paths.data / ctx.P.replay_truth_dir
    assert replay_truth_root(_ctx(str(tmp_path))) == tmp_path
    with pytest.raises(ValueError, match="replay_truth_dir is empty"):
        replay_truth_root(_ctx(""))
