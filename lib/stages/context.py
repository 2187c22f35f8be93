"""The stage context: what every notebook's setup cell used to copy, in one place.

A notebook calls ``ctx = <stage>.start(globals())`` right after its ``parameters`` cell. That
validates the parameters against the cell (:func:`lib.core.params.collect`), derives the
profile's folders (``runs/<profile>/NN_stage/{figures,tables,models}``), seeds the generators
when the stage asks for it, and gives the notebook one name for all of it (``ctx.P``,
``ctx.paths``, ``ctx.dir``, ``ctx.figures``, ``ctx.tables``, ``ctx.timings``). At the end,
``ctx.write_record(extra)`` writes the run record (versions, git SHA, device, parameters,
timings) and ``failed_cases.csv``. Not a stage itself: every stage module uses it, none imports
another stage.

Failed cases: a stage that maps over cases hands its failures to ``ctx.add_failures(step, ...)``
(a :class:`lib.core.parallel.MapResult`'s failures, an evaluation summary's ``failed_cases``, or
:class:`lib.io.Fault` s). They are written to ``<stage>/failed_cases.csv`` (always written: a
header only when nothing failed) and the run record; with ``on_error: raise`` in the parameters,
``write_record`` then raises :class:`StageFailuresError` listing them, so the notebook (and
``make reproduce``) fails; with ``collect`` the stage finishes and the pipeline's exit status says
that cases failed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lib.core import params as params_mod
from lib.core import runinfo
from lib.core.parallel import CaseFailure
from lib.core.paths import ProfilePaths, ensure, for_profile
from lib.core.seeding import seed_everything
from lib.io.atomic import write_text
from lib.io.integrity import Fault
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


FAILED_CASES_CSV = "failed_cases.csv"
"""``runs/<profile>/NN_stage/failed_cases.csv``: every case a stage could not process."""

FAILED_COLUMNS = ("case_id", "step", "file", "kind", "message")


class StageFailuresError(RuntimeError):
    """``on_error: raise`` and cases failed: raised after the run record was written."""

    def __init__(self, stage: str, rows: list[dict]):
        self.rows = rows
        lines = "\n".join(f"  - [{r['step']}] {r['case_id']}: {r['message'].splitlines()[0] if r['message'] else ''}"
                          for r in rows)
        super().__init__(f"{stage}: {len(rows)} failed case(s) (on_error: raise):\n{lines}")


def failure_rows(step: str, failures: Iterable) -> list[dict]:
    """``failed_cases.csv`` rows from :class:`CaseFailure` s, :class:`Fault` s or dicts (an
    evaluation summary's ``failed_cases``: case_id, file, kind, message)."""
    rows = []
    for f in failures:
        if isinstance(f, CaseFailure):
            row = {"case_id": f.case_id, "file": "", "kind": "error", "message": f.message}
        elif isinstance(f, Fault):
            row = {"case_id": getattr(f, "case_id", "") or Path(f.path).name, "file": f.path,
                   "kind": getattr(f, "kind", "") or "fault", "message": f.message}
        elif isinstance(f, dict):
            row = {"case_id": str(f.get("case_id", "")), "file": str(f.get("file", "") or ""),
                   "kind": str(f.get("kind", "") or "error"), "message": str(f.get("message", ""))}
        else:
            raise TypeError(f"cannot record a failure of type {type(f).__name__}: {f!r}")
        rows.append({"case_id": row["case_id"], "step": step, "file": row["file"], "kind": row["kind"],
                     "message": row["message"].strip()})
    return rows


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
        facts: what steps of the run noted for its record (merged into ``extra`` by
            :meth:`write_record`; e.g. nnU-Net's integrity report).
    """

    stage: str
    P: params_mod.Params
    paths: ProfilePaths
    timings: runinfo.Timings = field(default_factory=runinfo.Timings)
    failures: list[dict] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

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

    def add_failures(self, step: str, failures: Iterable) -> int:
        """Record failed cases of ``step`` (see :func:`failure_rows`); prints one line per case and
        returns how many were added. A case that failed before in the same step is kept once."""
        seen = {(r["step"], r["case_id"]) for r in self.failures}
        new = [r for r in failure_rows(step, failures) if (r["step"], r["case_id"]) not in seen]
        for r in new:
            first = r["message"].splitlines()[0] if r["message"] else ""
            print(f"FAILED [{step}] {r['case_id']}: {first}")
        self.failures.extend(new)
        return len(new)

    def write_failures(self) -> Path:
        """``failed_cases.csv`` (atomic; a header only when nothing failed)."""
        df = pd.DataFrame(self.failures, columns=list(FAILED_COLUMNS))
        return write_text(self.dir / FAILED_CASES_CSV, df.to_csv(index=False))

    def write_record(self, extra: dict | None = None) -> Path:
        """``run_record.json`` of this stage (environment, parameters, timings, ``extra``, the
        failed cases) and ``failed_cases.csv``; then, with ``on_error: raise`` and failures, raises
        :class:`StageFailuresError`."""
        self.write_failures()
        extra = {**self.facts, **(extra or {}), "failed_cases": list(self.failures), "n_failed": len(self.failures)}
        path = write_run_record(self.dir, self.P, extra=extra, timings=dict(self.timings))
        if self.failures and getattr(self.P, "on_error", "collect") == "raise":
            raise StageFailuresError(self.stage, self.failures)
        return path
