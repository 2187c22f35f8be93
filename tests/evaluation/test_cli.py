"""spine1k evaluate (python -m lib.evaluation) on a tiny folder pair."""

from __future__ import annotations

import json
import subprocess
import sys

from lib import evaluation as evaluate


def test_cli_on_a_tiny_folder_pair(folders, tmp_path):
    gt_dir, pred_dir = folders
    out = tmp_path / "cli_out"
    proc = subprocess.run([sys.executable, "-m", "lib.evaluation", "--gt", str(gt_dir), "--pred", str(pred_dir),
                           "--out", str(out), "--labels", "1-25", "--hd95", "max", "--workers", "0",
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Mean of Vertebrae" in proc.stdout
    assert "missing prediction: HN_P002" in proc.stderr
    s = json.loads((out / evaluate.SUMMARY_JSON).read_text())
    assert s["hd95_definition"] == "max"
    assert s["n_missing_cases"] == 1
    assert "test_public DSC (paper)" in (out / evaluate.TABLE2_CSV).read_text()
    bad = subprocess.run([sys.executable, "-m", "lib.evaluation", "--gt", str(tmp_path / "nope"), "--pred",
                          str(pred_dir), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "nope" in bad.stderr
    assert "Traceback" not in bad.stderr
