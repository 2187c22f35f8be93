"""lib.app.pipeline: papermill runs in order, skips up-to-date stages, chains re-runs, reports failures."""

from __future__ import annotations

import errno
import json

import pytest

from lib.app import lock as lock_module
from lib.app import pipeline
from lib.app.lock import LOCK_NAME
from lib.core.params import ParamsError


def _nb(path, params_src, body):
    cells = [
        {"cell_type": "code", "id": "parameters", "metadata": {"tags": ["parameters"]}, "source": params_src,
         "outputs": [], "execution_count": None},
        {"cell_type": "code", "id": "body", "metadata": {}, "source": body, "outputs": [], "execution_count": None},
    ]
    nb = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


@pytest.fixture
def project(tmp_path):
    nbd, pd = tmp_path / "notebooks", tmp_path / "params" / "ci"
    nbd.mkdir()
    pd.mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    for stage in ("00_first", "01_second"):
        _nb(nbd / f"{stage}.ipynb",
            'profile: str = "synthetic"  # profile\nvalue: int = 1  # a number\n',
            f"import pathlib\np = pathlib.Path({str(out)!r}) / '{stage}.txt'\n"
            "p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
            "assert value >= 0, 'value must be non-negative'\n")
        (pd / f"{stage}.yaml").write_text("profile: ci\nvalue: 2\n")
    return tmp_path, out


def _run(root, **kw):
    return pipeline.run("ci", notebook_dir=root / "notebooks", params_dir=root / "params", log=lambda m: None, report=False, **kw)


def test_runs_then_skips_then_reruns_downstream(project):
    root, out = project
    assert _run(root) == {"00_first": "ran", "01_second": "ran"}
    assert _run(root) == {"00_first": "skipped", "01_second": "skipped"}
    (root / "params" / "ci" / "00_first.yaml").write_text("profile: ci\nvalue: 3\n")
    assert _run(root) == {"00_first": "ran", "01_second": "ran"}  # downstream of a change re-runs
    (root / "params" / "ci" / "01_second.yaml").write_text("profile: ci\nvalue: 4\n")
    assert _run(root) == {"00_first": "skipped", "01_second": "ran"}
    assert (out / "00_first.txt").read_text() == "xx"
    assert (out / "01_second.txt").read_text() == "xxx"
    assert _run(root, force=True, stages_spec="01") == {"01_second": "ran"}


def test_failure_names_stage_and_cell(project):
    root, _ = project
    (root / "params" / "ci" / "01_second.yaml").write_text("profile: ci\nvalue: -1\n")
    with pytest.raises(pipeline.StageFailedError) as info:
        _run(root)
    msg = str(info.value)
    assert "01_second FAILED" in msg
    assert "AssertionError" in msg
    assert "value must be non-negative" in msg
    assert "p.write_text" in msg  # the failing cell's source


def test_params_typo_stops_before_anything_runs(project):
    root, out = project
    (root / "params" / "ci" / "01_second.yaml").write_text("profile: ci\nvalu: 4\n")
    with pytest.raises(ParamsError, match="'valu'.*'value'"):
        _run(root)
    assert not (out / "00_first.txt").exists()


def test_rerun_with_new_inputs_starts_clean_but_an_interrupted_run_resumes(project, tmp_path):
    root, _ = project
    # a stage that resumes from what its folder holds: it counts the runs it finds there
    body = ("import os, pathlib\n"
            "d = pathlib.Path(os.environ['SPINE1K_RUNS']) / 'ci' / '01_second'\n"
            "f = d / 'done.txt'\n"
            "f.write_text(f.read_text() + 'x' if f.exists() else 'x')\n"
            "(d / 'cache').mkdir(exist_ok=True)\n"
            "(d / 'cache' / 'c.txt').write_text('cached')\n"
            "assert value >= 0, 'value must be non-negative'\n")
    _nb(root / "notebooks" / "01_second.ipynb", 'profile: str = "synthetic"  # profile\nvalue: int = 1  # a number\n', body)
    stage = tmp_path / "runs" / "ci" / "01_second"
    assert _run(root)["01_second"] == "ran"
    assert (stage / "done.txt").read_text() == "x"
    (root / "params" / "ci" / "01_second.yaml").write_text("profile: ci\nvalue: 5\n")
    assert _run(root)["01_second"] == "ran"
    assert (stage / "done.txt").read_text() == "x"  # new inputs: a clean folder, not a resumed one
    assert (tmp_path / "runs" / "ci" / ".previous" / "01_second" / "done.txt").exists()
    assert (stage / "cache" / "c.txt").exists()  # content-keyed caches survive
    # a failed run resumes with the same inputs (what it wrote is kept)
    (root / "params" / "ci" / "01_second.yaml").write_text("profile: ci\nvalue: -1\n")
    with pytest.raises(pipeline.StageFailedError):
        _run(root)
    assert (stage / "done.txt").read_text() == "x"  # fresh folder, one attempt
    with pytest.raises(pipeline.StageFailedError):
        _run(root)
    assert (stage / "done.txt").read_text() == "xx"  # same inputs: resumed
    with pytest.raises(pipeline.StageFailedError):
        _run(root, force=True)
    assert (stage / "done.txt").read_text() == "x"  # forced: never resumed
    assert _run(root, force=False, stages_spec="00") == {"00_first": "skipped"}
    (root / "params" / "ci" / "01_second.yaml").write_text("profile: ci\nvalue: 5\n")
    assert _run(root, force=True)["01_second"] == "ran"
    assert (stage / "done.txt").read_text() == "x"  # forced: clean again


def _logged_run(root, **kw):
    log: list[str] = []
    status = pipeline.run("ci", notebook_dir=root / "notebooks", params_dir=root / "params", log=log.append,
                          report=False, **kw)
    return status, "\n".join(log)


def test_freshness_follows_the_data_a_forced_upstream_and_edited_upstream_outputs(project, monkeypatch):
    root, _ = project
    sources = root / "data" / "ci" / "sources"
    sources.mkdir(parents=True)
    (sources / "a.txt").write_bytes(b"abc")
    monkeypatch.setattr(pipeline, "DATA_INPUTS", {"01_second": ["sources"]})
    assert _logged_run(root)[0] == {"00_first": "ran", "01_second": "ran"}
    assert _logged_run(root)[0] == {"00_first": "skipped", "01_second": "skipped"}
    (sources / "a.txt").write_bytes(b"abc")  # same bytes, new mtime: still up to date
    assert _logged_run(root)[0]["01_second"] == "skipped"
    (sources / "a.txt").write_bytes(b"abd")  # one byte
    status, log = _logged_run(root)
    assert status == {"00_first": "skipped", "01_second": "ran"}
    assert "re-running: input data changed: data/ci/sources (1 file(s) differ)" in log
    assert _logged_run(root, force=True, stages_spec="00")[0] == {"00_first": "ran"}
    status, log = _logged_run(root)
    assert status == {"00_first": "skipped", "01_second": "ran"}
    assert "upstream 00_first re-ran" in log
    (root / "runs" / "ci" / "00_first" / "table.csv").write_text("edited by hand\n")
    status, log = _logged_run(root)
    assert status["01_second"] == "ran"
    assert "outputs of upstream 00_first changed: runs/ci/00_first (1 file(s) differ)" in log


def test_a_changed_release_image_reruns_the_stages_after_the_one_that_wrote_it(project, monkeypatch):
    root, _ = project
    release = root / "data" / "ci" / "CTSpine1K" / "trainset" / "data"
    release.mkdir(parents=True)
    for i in range(3):  # as if 00_first had written the release
        (release / f"liver_{i}.nii.gz").write_bytes(bytes([i]) * 64)
    monkeypatch.setattr(pipeline, "STAGE_OUTPUTS", {"00_first": [("CTSpine1K", ())]})
    assert _logged_run(root)[0] == {"00_first": "ran", "01_second": "ran"}
    (release / "liver_1.nii.gz").write_bytes(b"\x07" * 64)
    (release / "liver_2.nii.gz").unlink()
    status, log = _logged_run(root)
    assert status == {"00_first": "skipped", "01_second": "ran"}
    assert "re-running: input data changed: data/ci/CTSpine1K (2 file(s) differ; written by 00_first)" in log
    stamp = json.loads((root / "runs" / "ci" / "01_second" / pipeline.STAMP).read_text())
    assert set(stamp["components"]) >= {"notebook", "params", "data", "upstream"}
    assert stamp["components"]["upstream"]["00_first"]["run_id"] == json.loads(
        (root / "runs" / "ci" / "00_first" / pipeline.STAMP).read_text())["run_id"]  # a skipped stage keeps its id


def test_failed_cases_are_counted_and_give_exit_status_3(project, monkeypatch):
    root, _ = project
    body = ("import os, pathlib\n"
            "d = pathlib.Path(os.environ['SPINE1K_RUNS']) / 'ci' / '01_second'\n"
            "(d / 'failed_cases.csv').write_text('case_id,step,file,kind,message\\n'\n"
            "    'liver_2,predict,liver_2.nii.gz,non_finite,12 NaN voxels\\n')\n")
    _nb(root / "notebooks" / "01_second.ipynb", 'profile: str = "synthetic"  # profile\nvalue: int = 1  # a number\n', body)
    status, log = _logged_run(root)
    assert status["01_second"] == "ran"
    assert "01_second: done in" in log
    assert "1 failed case(s) (see " in log
    assert "01_second/failed_cases.csv)" in log
    summary = json.loads((root / "runs" / "ci" / "pipeline.json").read_text())
    assert summary["failed_cases"] == {"00_first": 0, "01_second": 1}
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: {})
    assert pipeline.main(["--profile", "ci"]) == pipeline.EXIT_FAILED_CASES


@pytest.mark.parametrize(("argv", "message"), [
    (["--stages", "09"], "no stage 09; stages: 00_sources"),
    (["--stages", "abc"], "accepted forms: '02', '02-04', '00,03'"),
    (["--stages", "04-02"], "runs backwards"),
    (["--profile", "synthtic"], "unknown profile 'synthtic'; did you mean 'synthetic'?"),
])
def test_user_errors_are_one_line_with_exit_status_2(argv, message, capsys):
    assert pipeline.main(argv) == pipeline.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_read_only_stage_folder_is_one_clear_error(project, monkeypatch):
    root, _ = project
    real = pipeline.write_text

    def refuse(path, text):
        if path.name == pipeline.STAMP and path.parent.name == "01_second":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, text)

    monkeypatch.setattr(pipeline, "write_text", refuse)
    with pytest.raises(pipeline.StageFailedError, match=r"01_second: cannot write the stage stamp .*read-only"):
        _run(root)


def test_a_set_aside_across_devices_falls_back_to_a_move_other_errors_are_not_copied(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "ci" / "04_benchmark"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "t.csv").write_text("a\n")
    (out / "cache").mkdir()
    (out / pipeline.STAMP).write_text("{}")

    def cross_device(self, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(self))

    monkeypatch.setattr(pipeline.Path, "rename", cross_device)
    dest = tmp_path / "runs" / "ci" / ".previous" / "04_benchmark"
    assert pipeline.set_aside(out, dest) == dest
    assert (dest / "tables" / "t.csv").read_text() == "a\n"
    assert sorted(p.name for p in out.iterdir()) == [pipeline.STAMP, "cache"]

    (out / "x.csv").write_text("x")

    def refused(self, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pipeline.Path, "rename", refused)
    with pytest.raises(PermissionError):
        pipeline.set_aside(out, dest)
    assert not (dest / "x.csv").exists()  # no half copy: only another device falls back
    assert (out / "x.csv").exists()


def test_a_runs_folder_where_the_lock_cannot_be_written_is_one_line_exit_1(project, monkeypatch, capsys):
    root, out = project
    real_open = lock_module.os.open

    def refuse(path, *a, **k):
        if str(path).endswith(LOCK_NAME):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(lock_module.os, "open", refuse)
    with pytest.raises(pipeline.StageFailedError, match=r"runs/ci: cannot take the run lock .*read-only"):
        _run(root)
    assert not (out / "00_first.txt").exists()
    monkeypatch.setattr(pipeline, "_validated_params", lambda stages: {})
    assert pipeline.main(["--profile", "ci"]) == pipeline.EXIT_STAGE_FAILED
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "cannot take the run lock" in err


def test_the_reports_notebook_html_in_a_stage_folder_does_not_make_it_stale(project):
    root, _ = project
    assert set(_run(root).values()) == {"ran"}
    # the report renders every executed notebook beside it, after the last stage ran
    (root / "runs" / "ci" / "00_first" / "00_first.html").write_text("<html>rendered</html>")
    assert set(_run(root).values()) == {"skipped"}
