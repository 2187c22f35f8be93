"""The spine1k command: subcommands dispatch, unknown ones fail with the usage."""

from __future__ import annotations

import subprocess
import sys

from lib.app import cli
from lib.core.paths import REPO_ROOT


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("reproduce", "evaluate", "check-params", "report"))


def test_unknown_command_exits_2_with_usage(capsys):
    assert cli.main(["reproduc"]) == 2
    assert "unknown command 'reproduc'" in capsys.readouterr().err


def test_python_dash_m_lib_check_params_validates_every_file():
    proc = subprocess.run([sys.executable, "-m", "lib", "check-params"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "params: all files valid" in proc.stdout, proc.stdout
