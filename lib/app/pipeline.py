"""Run the study: every notebook in order through papermill, skipping what is up to date.

``spine1k reproduce --profile synthetic [--force] [--stages 02-04]`` (``make reproduce``; also
``python -m lib.app.pipeline``):

* validates every params file of the profile against its notebook first (papermill itself only
  warns about unknown names), so a typo fails in a second, not after an hour;
* executes ``notebooks/NN_stage.ipynb`` with ``params/<profile>/NN_stage.yaml`` into
  ``runs/<profile>/NN_stage/NN_stage.ipynb``;
* skips a stage whose notebook, params and upstream stages are unchanged since its last
  successful run (a fingerprint chained through the stages, so touching one params file re-runs
  that stage and every stage after it); ``--force`` re-runs;
* a stage that re-runs with changed inputs (or forced) starts from an empty folder -- its previous
  outputs go to ``runs/<profile>/.previous/`` -- while a stage whose run was interrupted or
  failed with the same inputs resumes from what it had written (ledgers, checkpoints);
* stops at the first failing stage and prints the papermill error and the cell that failed;
* prints progress per stage and the total wall time, keeps ``runs/<profile>/pipeline.json`` and
  writes the run report ``runs/<profile>/report.html`` (:mod:`lib.app.report`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lib.app.report import build_report
from lib.core import params as _params
from lib.core.paths import REPO_ROOT, STAGES, for_profile
from lib.io import write_text

STAMP = ".stage.json"


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: Path
    params_file: Path


def discover_stages(profile: str, notebook_dir: Path | None = None, params_dir: Path | None = None) -> list[Stage]:
    """Numbered notebooks in run order, each with its params file for ``profile``."""
    nb_dir = notebook_dir or _params.NOTEBOOK_DIR
    p_dir = params_dir or _params.PARAMS_DIR
    return [Stage(nb.stem, nb, p_dir / profile / f"{nb.stem}.yaml")
            for nb in sorted(nb_dir.glob("[0-9][0-9]_*.ipynb"))]


def select_stages(stages: list[Stage], spec: str | None) -> list[Stage]:
    """Filter by ``"02"``, ``"02-04"`` or ``"00,03"`` (two-digit prefixes)."""
    if not spec:
        return stages
    wanted: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            wanted.update(f"{i:02d}" for i in range(int(a), int(b) + 1))
        elif part:
            wanted.add(f"{int(part):02d}")
    return [s for s in stages if s.name[:2] in wanted]


PREVIOUS = ".previous"
"""``runs/<profile>/.previous/NN_stage/``: the outputs of a stage's last run, set aside when it
re-runs with other inputs or is forced (kept until its next re-run)."""

KEEP_ON_RERUN = ("cache",)
"""Stage sub-folders that survive a re-run: content-addressed caches (keys hash their inputs)."""


def set_aside(out_dir: Path, dest: Path) -> Path | None:
    """Move a stage folder's outputs (all but :data:`KEEP_ON_RERUN` and the stamp) to ``dest``.

    Stages resume from what their folder holds (ledgers, checkpoints, predictions); after their
    inputs changed, that would mix a new run with stale results. Returns ``dest`` when anything
    was moved.
    """
    items = [p for p in out_dir.iterdir() if p.name not in KEEP_ON_RERUN and p.name != STAMP] if out_dir.is_dir() else []
    if not items:
        return None
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for p in items:
        p.rename(dest / p.name)
    return dest


def fingerprint(stage: Stage, upstream: str) -> str:
    """Hash of the notebook, its params file and the upstream stages' fingerprint."""
    h = hashlib.sha256()
    h.update(upstream.encode())
    for f in (stage.notebook, stage.params_file):
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.exists() else b"<missing>")
    return h.hexdigest()


def _read_stamp(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _validated_params(stages: list[Stage]) -> dict[str, dict]:
    """Every stage's parameters, validated against its notebook; all problems raised together."""
    values: dict[str, dict] = {}
    problems: list[str] = []
    for st in stages:
        try:
            values[st.name] = _params.load_params(st.params_file, st.notebook)
        except _params.ParamsError as exc:
            problems.append(str(exc))
    if problems:
        raise _params.ParamsError("params check failed:\n" + "\n".join(problems))
    return values


def _execute_stage(st: Stage, out_dir: Path, fp: str, values: dict, kernel: str | None, head: str) -> float:
    """Execute one stage's notebook with papermill into ``out_dir``, keeping its stamp current
    (running -> ok | failed). Returns the seconds it ran; raises :class:`StageFailedError`."""
    import papermill as pm  # heavy (jupyter client, nbformat): only a run needs it

    stamp = out_dir / STAMP
    write_text(stamp, json.dumps({"fingerprint": fp, "status": "running"}) + "\n")
    t0 = time.perf_counter()
    out_nb = out_dir / f"{st.name}.ipynb"
    try:
        pm.execute_notebook(str(st.notebook), str(out_nb), parameters=values,
                            kernel_name=kernel, cwd=str(REPO_ROOT), progress_bar=False,
                            log_output=False, request_save_on_cell_execute=True)
    except pm.PapermillExecutionError as exc:
        secs = time.perf_counter() - t0
        write_text(stamp, json.dumps({"fingerprint": fp, "status": "failed", "seconds": secs}) + "\n")
        msg = (f"{head} FAILED after {secs:.0f} s in cell {exc.exec_count} "
               f"(executed notebook: {out_nb}):\n{exc.ename}: {exc.evalue}\n--- cell source ---\n{exc.source}")
        raise StageFailedError(msg) from None
    secs = time.perf_counter() - t0
    write_text(stamp, json.dumps({"fingerprint": fp, "status": "ok", "seconds": round(secs, 2),
                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    return secs


def run(profile: str = "synthetic", force: bool = False, stages_spec: str | None = None,
        notebook_dir: Path | None = None, params_dir: Path | None = None, kernel: str | None = None,
        report: bool = True, log=print) -> dict:
    """Run the pipeline. Returns ``{stage: "ran" | "skipped"}``; raises on the first failure.

    Args:
        profile: ``synthetic``, ``ci`` or ``paper``.
        force: re-run stages even when up to date.
        stages_spec: restrict to some stages (``"02-04"``); upstream fingerprints still chain.
        notebook_dir, params_dir: alternative folders (tests).
        kernel: Jupyter kernel name (default: the notebook's own, ``python3`` of this env).
        report: build ``runs/<profile>/report.html`` at the end.
    """
    paths = for_profile(profile)
    all_stages = discover_stages(profile, notebook_dir, params_dir)
    if not all_stages:
        raise SystemExit(f"no notebooks found in {notebook_dir or _params.NOTEBOOK_DIR}")
    values = _validated_params(all_stages)  # every params file, before running anything
    selected = {s.name for s in select_stages(all_stages, stages_spec)}
    status: dict[str, str] = {}
    upstream = profile
    t_total = time.perf_counter()
    for i, st in enumerate(all_stages, 1):
        fp = fingerprint(st, upstream)
        upstream = fp
        if st.name not in selected:
            continue
        out_dir = paths.stage(st.name) if st.name in _known_stages() else paths.runs / st.name
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = out_dir / STAMP
        prev = _read_stamp(stamp)
        head = f"[{i}/{len(all_stages)}] {st.name}"
        if not force and prev.get("fingerprint") == fp and prev.get("status") == "ok":
            log(f"{head}: up to date, skipped (ran {prev.get('finished', '?')}, {prev.get('seconds', 0):.0f} s)")
            status[st.name] = "skipped"
            continue
        resume = not force and prev.get("fingerprint") == fp and prev.get("status") in ("running", "failed")
        if prev and not resume:
            kept = set_aside(out_dir, paths.runs / PREVIOUS / out_dir.name)
            if kept:
                log(f"{head}: outputs of its previous run moved to {kept} (stale: "
                    f"{'forced re-run' if prev.get('fingerprint') == fp else 'inputs changed'})")
        elif resume:
            log(f"{head}: resuming its interrupted run (same notebook, params and inputs)")
        log(f"{head}: running with params/{profile}/{st.params_file.name} ...")
        secs = _execute_stage(st, out_dir, fp, values[st.name], kernel, head)
        log(f"{head}: done in {secs:.1f} s")
        status[st.name] = "ran"
    total = time.perf_counter() - t_total
    summary = {"profile": profile, "stages": status, "total_seconds": round(total, 1)}
    write_text(paths.runs / "pipeline.json", json.dumps(summary, indent=2) + "\n")
    log(f"pipeline {profile}: {sum(v == 'ran' for v in status.values())} ran, "
        f"{sum(v == 'skipped' for v in status.values())} skipped, total {total:.1f} s")
    if report:
        log(f"report: {build_report(profile)}")
    return status


def _known_stages() -> set[str]:
    return set(STAGES)


class StageFailedError(RuntimeError):
    """A notebook raised; the message has the stage, the cell and the error."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="spine1k reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="synthetic", help="synthetic | ci | paper")
    ap.add_argument("--force", action="store_true", help="re-run stages even when up to date")
    ap.add_argument("--stages", default=None, help="subset, e.g. 02-04 or 00,03")
    args = ap.parse_args(argv)
    try:
        run(args.profile, force=args.force, stages_spec=args.stages)
    except (StageFailedError, _params.ParamsError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
