"""The stage context: what every notebook's setup cell used to copy, in one place.

A notebook calls ``ctx = <stage>.start(globals())`` right after its ``parameters`` cell. That
validates the parameters against the cell (:func:`lib.core.params.collect`), derives the
profile's folders (``runs/<profile>/NN_stage/{figures,tables,models}``), seeds the generators
when the stage asks for it, and gives the notebook one name for all of it (``ctx.P``,
``ctx.paths``, ``ctx.dir``, ``ctx.figures``, ``ctx.tables``, ``ctx.timings``). At the end,
``ctx.write_record(extra)`` writes the run record (versions, git SHA, device, parameters,
timings). Not a stage itself: every stage module uses it, none imports another stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lib.core import params as params_mod
from lib.core import runinfo
from lib.core.paths import ProfilePaths, ensure, for_profile
from lib.core.seeding import seed_everything
from lib.io.atomic import write_text
from lib.ml.device import describe_device, seed_torch
from lib.viz.style import save_figure


def print_environment(device: str = "auto") -> dict[str, Any]:
    """Print a compact version / git SHA / device block (the first code cell of every notebook)."""
    info = runinfo.environment_info(describe_device(device))
    pk = info["packages"]
    print(f"spine1k @ {info['git_sha']}  |  python {info['python']}  |  device {info['device']}")
    print("  " + "  ".join(f"{k} {v}" for k, v in pk.items() if v != "not installed"))
    return info


def write_run_record(stage_dir: str | Path, params: Any, extra: dict | None = None,
                     timings: dict | None = None, name: str = "run_record.json") -> Path:
    """Write ``<stage_dir>/run_record.json``: environment, parameters, timings and extra facts.

    Args:
        stage_dir: ``runs/<profile>/NN_stage/``.
        params: a :class:`lib.core.params.Params` or a plain dict.
        extra: anything else worth keeping (counts, skipped cases, metric summaries).
        timings: ``{step: seconds}``.
    """
    values = params.as_dict() if hasattr(params, "as_dict") else dict(params)
    record = {"environment": runinfo.environment_info(describe_device(values.get("device", "auto"))),
              "parameters": values, "timings_s": dict(timings or {}), "extra": extra or {}}
    path = Path(stage_dir) / name
    write_text(path, json.dumps(record, indent=2, default=runinfo.json_default) + "\n")
    return path


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    seed_everything(seed)
    seed_torch(seed)


@dataclass
class StageContext:
    """One stage run: its validated parameters, folders and timings.

    Attributes:
        stage: ``NN_stage`` (the notebook's name).
        P: the validated parameters (attribute access, read-only).
        paths: the profile's folders (:class:`lib.core.paths.ProfilePaths`).
        timings: named wall times (``with ctx.timings("train"): ...``).
    """

    stage: str
    P: params_mod.Params
    paths: ProfilePaths
    timings: runinfo.Timings = field(default_factory=runinfo.Timings)

    @classmethod
    def start(cls, stage: str, namespace: dict[str, Any], seed: bool = False) -> StageContext:
        """Validate the notebook's parameters (from ``globals()``), create the stage folders,
        and seed the global generators with ``P.seed`` when ``seed``."""
        P = params_mod.collect(namespace, stage)
        ctx = cls(stage, P, for_profile(P.profile))
        ensure(ctx.figures)
        ensure(ctx.tables)
        if seed:
            seed_all(P.seed)
        return ctx

    @property
    def dir(self) -> Path:
        """``runs/<profile>/NN_stage/``."""
        return self.paths.stage(self.stage)

    @property
    def figures(self) -> Path:
        return self.paths.figures(self.stage)

    @property
    def tables(self) -> Path:
        return self.paths.tables(self.stage)

    @property
    def models(self) -> Path:
        return self.paths.models(self.stage)

    def save_table(self, df: pd.DataFrame, name: str, index: bool = False) -> Path:
        """Write ``tables/<name>`` as CSV (atomic)."""
        return write_text(self.tables / name, df.to_csv(index=index))

    def save_figure(self, fig, name: str, dpi: int = 110) -> Path:
        """Write ``figures/<name>`` (PNG, atomic) and close the figure."""
        return save_figure(fig, self.figures / name, dpi=dpi)

    def write_record(self, extra: dict | None = None) -> Path:
        """``run_record.json`` of this stage: environment, parameters, timings, ``extra``."""
        return write_run_record(self.dir, self.P, extra=extra, timings=dict(self.timings))
