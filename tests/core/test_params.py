"""lib.core.params: params files checked against the notebooks' parameters cells."""

from __future__ import annotations

import json
import typing

import pytest

from lib.core import params, paths

CELL = '''profile: str = "synthetic"  # synthetic | ci | paper
max_epochs: int = 40  # training length
learning_rate: float = 0.01  # initial LR, poly decay
spacing_mm: tuple = (2.0, 2.0, 2.0)  # target spacing
scheduler: str | None = None  # Dask scheduler address
'''


def _notebook(path, source=CELL):
    nb = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["# Stage"]},
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": source,
         "outputs": [], "execution_count": None},
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def test_typo_names_file_key_and_closest(tmp_path):
    nb = _notebook(tmp_path / "02_pretraining.ipynb")
    pf = tmp_path / "02_pretraining.yaml"
    pf.write_text("profile: ci\nmax_epoch: 3\n")
    with pytest.raises(params.ParamsError) as info:
        params.load_params(pf, nb)
    msg = str(info.value)
    assert str(pf) in msg
    assert "'max_epoch'" in msg
    assert "'max_epochs'" in msg


def test_wrong_type_names_file_key_and_type(tmp_path):
    nb = _notebook(tmp_path / "s.ipynb")
    pf = tmp_path / "s.yaml"
    pf.write_text("max_epochs: ten\n")
    with pytest.raises(params.ParamsError, match=r"s.yaml: parameter 'max_epochs' = 'ten'.*expected int"):
        params.load_params(pf, nb)


def test_valid_file_merges_defaults_and_coerces(tmp_path):
    nb = _notebook(tmp_path / "s.ipynb")
    pf = tmp_path / "s.yaml"
    pf.write_text("profile: ci  # smallest\nlearning_rate: 1\nspacing_mm: [3.0, 3.0, 1.5]\n")
    values = params.load_params(pf, nb)
    assert values == {"profile": "ci", "max_epochs": 40, "learning_rate": 1.0,
                      "spacing_mm": (3.0, 3.0, 1.5), "scheduler": None}


def test_parameters_cell_must_be_declarative(tmp_path):
    nb = _notebook(tmp_path / "s.ipynb", CELL + "epochs_half = max_epochs // 2\n")
    with pytest.raises(params.ParamsError, match="only 'name: type = literal'"):
        params.notebook_parameters(nb)


def test_help_comes_from_trailing_comment():
    specs = params.parse_parameters(CELL)
    assert specs["max_epochs"].help == "training length"
    assert specs["scheduler"].default is None


def test_every_params_file_matches_its_notebook():
    """Each params/<profile>/NN_stage.yaml validates against notebooks/NN_stage.ipynb, and
    every notebook has a params file in every profile."""
    assert params.check_all() == []
    stages = sorted(p.stem for p in params.NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    for profile in ("synthetic", "ci", "paper"):
        for stage in stages:
            values = params.load_params(params.params_file(profile, stage), stage)
            assert values["profile"] == profile


def test_choice_types_reject_other_values_and_match_their_sources(tmp_path):
    from lib.metrics.surface import HD95_DEFINITIONS

    nb = _notebook(tmp_path / "03_x.ipynb", 'profile: Profile = "synthetic"  # the data\nhd95: HD95 = "pooled"  # HD95 definition\n')
    pf = tmp_path / "c.yaml"
    pf.write_text("hd95: median\n")
    with pytest.raises(params.ParamsError, match=r"c.yaml: parameter 'hd95' = 'median'.*'pooled' or 'max'"):
        params.load_params(pf, nb)
    pf.write_text("profile: ci\nhd95: max\n")
    assert params.load_params(pf, nb) == {"profile": "ci", "hd95": "max"}
    assert set(typing.get_args(params.HD95)) == set(HD95_DEFINITIONS)
    assert set(typing.get_args(params.Profile)) == set(paths.PROFILES)


def test_check_params_reports_a_parameter_papermill_cannot_see(tmp_path):
    """Papermill skips a parameters line whose comment holds '=' (its own regular expression);
    the value would be injected as an unknown parameter with a warning only."""
    bad = 'seed: int = 0  # the seed\nexpected_verse: int = 319  # VerSe 2020 = 319 CT series\n'
    nb_path = _notebook(tmp_path / "00_x.ipynb", bad)
    nb = json.loads(nb_path.read_text())
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb_path.write_text(json.dumps(nb))
    problems = params.papermill_blind_spots(nb_path)
    assert len(problems) == 1
    assert "'expected_verse'" in problems[0]
    assert str(nb_path) in problems[0]
    nb["cells"][1]["source"] = bad.replace("2020 = 319", "2020: 319")
    nb_path.write_text(json.dumps(nb))
    assert params.papermill_blind_spots(nb_path) == []
