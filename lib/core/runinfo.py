"""What a run was: versions, git SHA, device, parameters and timings, recorded with every run."""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lib.core.paths import REPO_ROOT

PACKAGES = ("numpy", "scipy", "pandas", "nibabel", "pydicom", "SimpleITK", "torch", "monai",
            "dask", "distributed", "papermill", "matplotlib", "scikit-image", "isal")


def git_sha(short: bool = False) -> str:
    """Commit of the workspace, with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if short:
        sha = sha[:10]
    return sha + ("-dirty" if dirty else "")


def package_versions(names=PACKAGES) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def environment_info(device: str = "") -> dict[str, Any]:
    """Python, platform, package versions, git SHA and the device description as a JSON-ready dict.

    Args:
        device: what the run computes on, as :func:`lib.ml.device.describe_device` says it
            (core holds no torch; the stage context passes the description in).
    """
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "packages": package_versions(),
        "device": device,
        "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


class Timings(dict):
    """Named wall times in seconds: ``with timings("train"): ...``."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - t0, 3)


def json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set | tuple):
        return list(obj)
    return str(obj)
