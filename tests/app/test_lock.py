"""lib.app.lock: one run per profile; a live holder is named, a dead one's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lib.app import pipeline
from lib.app.lock import LOCK_NAME, RunLock, RunLockedError
from lib.core.paths import REPO_ROOT

_HOLD = ("import sys, time\nfrom lib.app.lock import RunLock\n"
         "with RunLock(sys.argv[1], argv=['make', 'reproduce']):\n"
         "    print('held', flush=True)\n    time.sleep(120)\n")


def _holder(runs):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(runs)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_a_live_holder_is_refused_with_its_pid_then_the_lock_is_taken_after_it_dies(tmp_path):
    runs = tmp_path / "runs" / "ci"
    proc = _holder(runs)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by pid {proc.pid} .*make reproduce"):
            RunLock(runs).acquire()
        code = pipeline.main(["--profile", "ci"])  # the real command: refuses, names the holder
        assert code == pipeline.EXIT_LOCKED
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    lock = RunLock(runs).acquire()  # the kernel released the dead holder's flock
    assert lock.took_over["pid"] == proc.pid  # its file still named it: taken over, said so
    assert json.loads((runs / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_stale_lock_file_without_a_live_holder_is_taken_over(tmp_path):
    runs = tmp_path / "r"
    runs.mkdir()
    (runs / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "argv": ["x"]}))
    with RunLock(runs) as lock:
        assert lock.took_over["pid"] == 999999
        with pytest.raises(RunLockedError):  # held now, even by this same process's second try
            RunLock(runs).acquire()
    assert (runs / LOCK_NAME).read_text() == ""  # released
    t0 = time.time()
    with RunLock(runs):
        pass
    assert time.time() - t0 < 1
