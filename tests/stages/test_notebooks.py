"""The real notebooks 00-06, run end to end with the ci profile through the pipeline (slow: ~7 min).

What the other tests check function by function, this one checks as a user meets it: every
notebook executes top to bottom with its ``params/ci`` file, writes its tables and run record,
a second run skips every stage, and the report is written. Then a second run of 02-04 on a copy
is killed (``kill -9`` of its process group) at three points of each of 02, 03 and 04, resumed
each time, and must end with the tables of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lib.app import pipeline
from lib.core.paths import REPO_ROOT, STAGES, data_root, for_profile

pytestmark = pytest.mark.slow

EXPECTED_TABLES = {
    "00_sources": ["sources_summary.csv"],
    "01_curation": ["cases.csv", "provenance.csv", "exclusions.csv", "table1.csv"],
    "02_pretraining": ["verse_selection.csv", "split.csv"],
    "03_annotation": ["rounds.csv", "ledger_entries.csv", "accepted_vs_truth.csv"],
    "04_benchmark": ["table2.csv", "table1.csv", "case_scores.csv"],
    "05_failure_l6": ["label_shift.csv", "correction_summary.csv", "l6_before_after.csv"],
    "06_failure_lowz": ["dice_vs_z.csv", "lowz_per_case.csv"],
}


def test_the_seven_notebooks_run_on_the_ci_profile_then_skip():
    log: list[str] = []
    assert pipeline.run("ci", log=log.append) == {s: "ran" for s in STAGES}, "\n".join(log)
    paths = for_profile("ci")
    for stage, tables in EXPECTED_TABLES.items():
        folder = paths.stage(stage)
        rec = json.loads((folder / "run_record.json").read_text())
        assert rec["parameters"]["profile"] == "ci", stage
        assert rec["environment"]["git_sha"], stage
        assert (folder / f"{stage}.ipynb").exists()
        for name in tables:
            assert (folder / "tables" / name).exists(), f"{stage}: tables/{name}"
    table2 = pd.read_csv(paths.tables("04_benchmark") / "table2.csv", index_col=0)
    dsc = table2.loc[["Mean of Vertebrae", "Mean of Spine"], [c for c in table2 if c.endswith(" DSC")]]
    assert ((dsc >= 0) & (dsc <= 1)).all().all()
    assert dsc.loc["Mean of Spine"].max() > 0.3
    rounds = pd.read_csv(paths.tables("03_annotation") / "rounds.csv")
    assert len(rounds) >= 2
    assert rounds["cases"].sum() == len(list(paths.release.glob("*/gt/*_seg.nii.gz")))
    assert (paths.runs / "report.html").exists()
    assert set(pipeline.run("ci", report=False, log=log.append).values()) == {"skipped"}
    _kill_and_resume_equals(paths)


KILL_POINTS = [  # (stage, files under its folder whose appearance triggers the kill)
    ("02_pretraining", "tables/verse_selection.csv"),
    ("02_pretraining", "models/stage_*/checkpoint.pt"),
    ("02_pretraining", "predictions/heldout/*.nii.gz"),
    ("03_annotation", "preannotations/round_01/*.nii.gz"),
    ("03_annotation", "models/round_01/stage_*/checkpoint.pt"),
    ("03_annotation", "preannotations/round_0[3-9]/*.nii.gz"),
    ("04_benchmark", "models/final/stage_*/checkpoint.pt"),
    ("04_benchmark", "predictions/*/*.nii.gz"),
    ("04_benchmark", "evaluation/*/results_manifest.json"),
]
VOLATILE = re.compile(r"seconds|_s$|time|started|finished|updated|_at$|path|file|dir")


def _stage_running(runs: Path, stage: str) -> bool:
    try:
        return json.loads((runs / stage / ".stage.json").read_text()).get("status") == "running"
    except (OSError, ValueError):
        return False


def _stage_done(runs: Path, stage: str) -> bool:
    try:
        return json.loads((runs / stage / ".stage.json").read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _kill_and_resume_equals(paths) -> None:
    """Copy the data and 00/01 of the finished ci run; run 02-04 there, killed at each point of
    :data:`KILL_POINTS` and resumed; the tables of 02-04 must equal the uninterrupted run's."""
    work = data_root().parent / "killed"
    data2, runs2 = work / "data", work / "runs"
    shutil.copytree(data_root(), data2, symlinks=True)
    for stage in ("00_sources", "01_curation"):
        shutil.copytree(paths.stage(stage), runs2 / "ci" / stage, symlinks=True)
    env = {**os.environ, "SPINE1K_DATA": str(data2), "SPINE1K_RUNS": str(runs2), "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "lib", "reproduce", "--profile", "ci", "--stages", "02-04"]
    kills, proc = [], None
    for stage, pattern in KILL_POINTS:
        if proc is None:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        folder, deadline = runs2 / "ci" / stage, time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            if _stage_running(runs2 / "ci", stage) and list(folder.glob(pattern)):
                os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers
                proc.wait()
                time.sleep(2)  # its kernel (own process group) sees its parent gone and exits within ~1 s
                kills.append((stage, pattern))
                proc = None
                break
            if _stage_done(runs2 / "ci", stage):  # the point passed unseen: on to the next one
                break
            time.sleep(0.05)
        if proc is not None and proc.poll() is not None:
            assert proc.returncode in (0, 3), f"run before kill point {stage}: {pattern} exited {proc.returncode}"
            proc = None
    if proc is not None:
        assert proc.wait(timeout=1800) in (0, 3)  # 3: the ci data plants a faulty VerSe scan (listed)
    final = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert final.returncode == 3, final.stderr[-3000:]  # done; 02 lists the planted VerSe fault
    assert len(kills) >= 7, f"only {len(kills)} kills landed while their stage ran: {kills}"
    assert {s for s, _ in kills} == {"02_pretraining", "03_annotation", "04_benchmark"}, kills
    for stage in ("02_pretraining", "03_annotation", "04_benchmark"):
        for csv in sorted((paths.stage(stage) / "tables").rglob("*.csv")):
            other = runs2 / "ci" / stage / "tables" / csv.relative_to(paths.stage(stage) / "tables")
            a, b = pd.read_csv(csv), pd.read_csv(other)
            for c in b.select_dtypes(include="object").columns:  # absolute paths (02's selection) name the copy's root
                b[c] = b[c].str.replace(f"{work}/", f"{work.parent}/", regex=False)
            keep = [c for c in a.columns if not VOLATILE.search(str(c))]
            pd.testing.assert_frame_equal(a[keep], b[keep], check_exact=True, obj=f"{stage}/{csv.name}")
