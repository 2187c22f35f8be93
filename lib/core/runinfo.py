"""What a run was: versions, git SHA, device, parameters and timings, recorded with every run."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import random
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lib.core.paths import REPO_ROOT
from lib.io import write_text

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


def resolve_device(device: str = "auto"):
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; otherwise ``torch.device(device)``."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def describe_device(device: str = "auto") -> str:
    import torch

    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type} ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})"


def environment_info(device: str = "auto") -> dict[str, Any]:
    """Python, platform, package versions, git SHA and device as a JSON-ready dict."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "packages": package_versions(),
        "device": describe_device(device),
        "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def print_environment(device: str = "auto") -> dict[str, Any]:
    """Print a compact version / git SHA / device line block (first code cell of every notebook)."""
    info = environment_info(device)
    pk = info["packages"]
    print(f"spine1k @ {info['git_sha']}  |  python {info['python']}  |  device {info['device']}")
    print("  " + "  ".join(f"{k} {v}" for k, v in pk.items() if v != "not installed"))
    return info


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs (and make torch deterministic where it can be)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(seed)


class Timings(dict):
    """Named wall times in seconds: ``with timings("train"): ...``."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - t0, 3)


def write_run_record(stage_dir: str | Path, params: Any, extra: dict | None = None,
                     timings: dict | None = None, name: str = "run_record.json") -> Path:
    """Write ``<stage_dir>/run_record.json``: environment, parameters, timings and extra facts.

    Args:
        stage_dir: ``runs/<profile>/NN_stage/``.
        params: a :class:`lib.params.Params` or a plain dict.
        extra: anything else worth keeping (counts, skipped cases, metric summaries).
        timings: ``{step: seconds}``.
    """
    values = params.as_dict() if hasattr(params, "as_dict") else dict(params)
    record = {"environment": environment_info(values.get("device", "auto")), "parameters": values,
              "timings_s": dict(timings or {}), "extra": extra or {}}
    path = Path(stage_dir) / name
    write_text(path, json.dumps(record, indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set | tuple):
        return list(obj)
    return str(obj)
