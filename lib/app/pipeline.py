"""Run the study: every notebook in order through papermill, skipping what is up to date.

``spine1k reproduce --profile synthetic [--force] [--stages 02-04]`` (``make reproduce``; also
``python -m lib.app.pipeline``):

* validates every params file of the profile against its notebook first (papermill itself only
  warns about unknown names), so a typo fails in a second, not after an hour;
* executes ``notebooks/NN_stage.ipynb`` with ``params/<profile>/NN_stage.yaml`` into
  ``runs/<profile>/NN_stage/NN_stage.ipynb``;
* skips a stage whose notebook, params, data inputs and upstream stages are unchanged since its
  last successful run: its fingerprint covers the notebook, its params file, a content digest of
  the raw data it reads (:data:`DATA_INPUTS`) and, for every earlier stage, the id of its last
  run and a content digest of its outputs (:data:`STAGE_OUTPUTS`) -- so a changed params file, a
  changed source file, an edited upstream table or a forced upstream re-run re-runs every stage
  after it, and the log says why; ``--force`` re-runs;
* holds ``runs/<profile>/.lock`` for the whole run (:mod:`lib.app.lock`): a second run on the
  same profile refuses, naming the live holder's PID;
* counts the failed cases each stage lists in its ``failed_cases.csv`` and ends with exit status
  3 when any stage listed one (0 = all cases done, 1 = a stage failed, 2 = usage error, 4 = locked);
* a stage that re-runs with changed inputs (or forced) starts from an empty folder -- its previous
  outputs go to ``runs/<profile>/.previous/`` -- while a stage whose run was interrupted or
  failed with the same inputs resumes from what it had written (ledgers, checkpoints);
* stops at the first failing stage and prints the papermill error and the cell that failed;
* prints progress per stage and the total wall time, keeps ``runs/<profile>/pipeline.json`` and
  writes the run report ``runs/<profile>/report.html`` (:mod:`lib.app.report`).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import errno
import hashlib
import json
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lib.app.lock import RunLock, RunLockedError
from lib.app.report import build_report
from lib.core import params as _params
from lib.core.digest import DigestCache, digest_tree, files_differing
from lib.core.paths import PROFILES, REPO_ROOT, STAGES, data_root, for_profile
from lib.io import write_text

EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE, EXIT_FAILED_CASES, EXIT_LOCKED = 0, 1, 2, 3, 4
FAILED_CASES_CSV = "failed_cases.csv"

DATA_INPUTS: dict[str, list[str]] = {
    "01_curation": ["sources"],
    "02_pretraining": ["sources/VerSe"],
}
"""Raw data a stage reads that no earlier stage wrote (folders under ``data/<profile>/``): the
downloads (or 00's generated sources). What earlier stages wrote is covered by their outputs."""

STAGE_OUTPUTS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "00_sources": [("sources", ()), ("oracle", ())],
    "01_curation": [("CTSpine1K", ("gt", "readme.txt"))],
    "03_annotation": [("CTSpine1K", ("data", "*.csv", "*.xlsx", "*.json", "data_split*"))],
}
"""What a stage writes under ``data/<profile>/`` besides its run folder (folder, excluded names):
01 the release images and sheets; 03 the accepted masks (``gt/``) and the release's
``readme.txt`` with the special cases (01 writes a first one)."""

DIGEST_EXCLUDE = (".stage.json", "run_record.json", "[0-9][0-9]_*.ipynb", "[0-9][0-9]_*.html", "cache", ".previous",
                  "__pycache__", ".lock", ".digests.json", ".*.tmp", ".partial*")
"""Never part of an output digest: stamps, the run record, the executed notebook and its HTML
rendering (written by the report after the stage, after later stages too), caches."""

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


class UsageError(ValueError):
    """A user error on the command line (bad ``--stages``, unknown profile): one line, exit 2."""


def select_stages(stages: list[Stage], spec: str | None) -> list[Stage]:
    """Filter by ``"02"``, ``"02-04"`` or ``"00,03"`` (two-digit prefixes).

    Raises:
        UsageError: a part that is not a number or range, or that names no stage.
    """
    if not spec:
        return stages
    available = [s.name for s in stages]
    wanted: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d{1,2})(?:-(\d{1,2}))?", part)
        if not m:
            raise UsageError(f"--stages {spec!r}: {part!r} is not a stage number or range; accepted forms: "
                             f"'02', '02-04', '00,03' (stages: {', '.join(available)})")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise UsageError(f"--stages {spec!r}: range {part!r} runs backwards")
        wanted.update(f"{i:02d}" for i in range(a, b + 1))
    chosen = [s for s in stages if s.name[:2] in wanted]
    unknown = sorted(w for w in wanted if w not in {s.name[:2] for s in stages})
    if not chosen or (unknown and "-" not in spec):
        raise UsageError(f"--stages {spec!r}: no stage {', '.join(unknown)}; stages: {', '.join(available)}")
    return chosen


def check_profile_name(profile: str) -> str:
    """The profile, or a :class:`UsageError` with the closest name suggested."""
    if profile in PROFILES:
        return profile
    close = difflib.get_close_matches(profile, PROFILES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown profile {profile!r}{hint} (profiles: {', '.join(PROFILES)})")


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
        try:
            p.rename(dest / p.name)
        except OSError as exc:  # another device (a mounted .previous): copy, then remove
            if exc.errno != errno.EXDEV:
                raise
            shutil.move(str(p), str(dest / p.name))
    return dest


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def stage_outputs(profile: str, out_dir: Path, stage: str, cache: DigestCache) -> dict:
    """Content digest of what a stage wrote: its run folder and its :data:`STAGE_OUTPUTS`."""
    parts = {"run_folder": digest_tree(out_dir, DIGEST_EXCLUDE, cache)}
    for folder, exclude in STAGE_OUTPUTS.get(stage, []):
        parts[folder] = digest_tree(data_root() / profile / folder, DIGEST_EXCLUDE + exclude, cache)
    return parts


def _summary(parts: dict) -> dict:
    return {k: v["digest"] for k, v in parts.items()}


def components(st: Stage, profile: str, upstream: dict, cache: DigestCache) -> dict:
    """What a stage's fingerprint covers: notebook, params file, raw data inputs, upstream runs."""
    data = {d: digest_tree(data_root() / profile / d, DIGEST_EXCLUDE, cache) for d in DATA_INPUTS.get(st.name, [])}
    return {"notebook": _sha(st.notebook), "params": _sha(st.params_file),
            "data": {k: v["digest"] for k, v in data.items()}, "data_files": {k: v["by_file"] for k, v in data.items()},
            "upstream": upstream}


def fingerprint_of(comps: dict) -> str:
    keep = {k: v for k, v in comps.items() if k != "data_files"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def why_rerun(st: Stage, profile: str, prev: dict, comps: dict, force: bool,
              files: dict | None = None) -> str:
    """Why a stage runs: forced, never ran, or every component that changed.

    ``files``: per upstream stage, what :func:`_upstream_files` gives (its outputs' files then
    and now), so that a changed upstream output says how many of its files differ.
    """
    if force:
        return "forced (--force)"
    old = prev.get("components")
    if not prev:
        return "never ran"
    if not old:
        return "its last run predates content fingerprints"
    reasons = []
    if old.get("notebook") != comps["notebook"]:
        reasons.append(f"notebooks/{st.notebook.name} changed")
    if old.get("params") != comps["params"]:
        reasons.append(f"params/{profile}/{st.params_file.name} changed")
    for d, dig in comps["data"].items():
        if old.get("data", {}).get(d) != dig:
            n = files_differing({"by_file": old.get("data_files", {}).get(d, {})}, {"by_file": comps["data_files"][d]})
            reasons.append(f"input data changed: data/{profile}/{d} ({n} file(s) differ)")
    for up, now in comps["upstream"].items():
        reasons += _upstream_reasons(up, old.get("upstream", {}).get(up, {}), now, profile, (files or {}).get(up))
    return "; ".join(reasons) or "its last run did not finish"


def _upstream_reasons(up: str, before: dict, now: dict, profile: str, files: dict | None) -> list[str]:
    """What changed of one upstream stage since the stage after it ran: its run, or its outputs."""
    if before.get("run_id") != now.get("run_id"):
        return [f"upstream {up} re-ran"]
    reasons = []
    for folder, digest in now.get("outputs", {}).items():
        was = before.get("outputs", {}).get(folder)
        if was == digest:
            continue
        n = None
        if files and files["then_digests"].get(folder) == was and folder in files["then"]:
            n = files_differing({"by_file": files["then"][folder]}, {"by_file": files["now"].get(folder, {})})
        count = f"{n} file(s) differ" if n is not None else ""
        if folder == "run_folder":
            reasons.append(f"outputs of upstream {up} changed: runs/{profile}/{up}" + (f" ({count})" if count else ""))
        else:
            reasons.append(f"input data changed: data/{profile}/{folder} ({count + '; ' if count else ''}written by {up})")
    return reasons


def count_failed_cases(out_dir: Path) -> int:
    """Rows of a stage's ``failed_cases.csv`` (0 when it wrote none)."""
    f = out_dir / FAILED_CASES_CSV
    if not f.exists():
        return 0
    with open(f, newline="") as fh:
        return max(0, sum(1 for _ in csv.reader(fh)) - 1)


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
    (running -> failed; the caller writes ok). Returns the seconds it ran; raises
    :class:`StageFailedError`."""
    import papermill as pm  # heavy (jupyter client, nbformat): only a run needs it

    stamp = out_dir / STAMP
    _write_stamp(out_dir, {"fingerprint": fp, "status": "running"})
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
    return time.perf_counter() - t0


def run(profile: str = "synthetic", force: bool = False, stages_spec: str | None = None,
        notebook_dir: Path | None = None, params_dir: Path | None = None, kernel: str | None = None,
        report: bool = True, log=print) -> dict:
    """Run the pipeline under the profile's lock. Returns ``{stage: "ran" | "skipped"}``;
    raises on the first failure (:class:`StageFailedError`), on a user error
    (:class:`UsageError`, :class:`lib.core.params.ParamsError`) and when another run holds the
    lock (:class:`lib.app.lock.RunLockedError`). Failed cases per stage: ``pipeline.json``.

    Args:
        profile: ``synthetic``, ``ci`` or ``paper``.
        force: re-run stages even when up to date.
        stages_spec: restrict to some stages (``"02-04"``); upstream fingerprints still chain.
        notebook_dir, params_dir: alternative folders (tests).
        kernel: Jupyter kernel name (default: the notebook's own, ``python3`` of this env).
        report: build ``runs/<profile>/report.html`` at the end.
    """
    paths = for_profile(check_profile_name(profile))
    all_stages = discover_stages(profile, notebook_dir, params_dir)
    if not all_stages:
        raise UsageError(f"no notebooks found in {notebook_dir or _params.NOTEBOOK_DIR}")
    selected = {s.name for s in select_stages(all_stages, stages_spec)}
    values = _validated_params(all_stages)  # every params file, before running anything
    lock = RunLock(paths.runs)
    try:
        lock.acquire()  # before any stamp is read
    except PermissionError as exc:
        raise StageFailedError(f"{paths.runs}: cannot take the run lock ({exc.strerror}: {exc.filename}); "
                               f"is the folder read-only?") from None
    try:
        if lock.took_over:
            log(f"lock of pid {lock.took_over.get('pid')} taken over (that run ended without finishing)")
        return _run_locked(paths, profile, all_stages, selected, values, force, kernel, report, log)
    finally:
        lock.release()


def _stage_dir(paths, st: Stage) -> Path:
    return paths.stage(st.name) if st.name in _known_stages() else paths.runs / st.name


def _run_locked(paths, profile, all_stages, selected, values, force, kernel, report, log) -> dict:
    status: dict[str, str] = {}
    failed_cases: dict[str, int] = {}
    upstream: dict[str, dict] = {}  # per earlier stage: run id and output digests (fingerprinted)
    files: dict[str, dict] = {}  # per earlier stage: its outputs' files then and now (for the log)
    cache = DigestCache.load(paths.runs / ".digests.json")
    t_total = time.perf_counter()
    try:
        for i, st in enumerate(all_stages, 1):
            out_dir = _stage_dir(paths, st)
            comps = components(st, profile, dict(upstream), cache)
            fp = fingerprint_of(comps)
            prev = _read_stamp(out_dir / STAMP)
            head = f"[{i}/{len(all_stages)}] {st.name}"
            if st.name in selected and (force or prev.get("fingerprint") != fp or prev.get("status") != "ok"):
                _prepare(paths, out_dir, head, prev, fp, force, log, why_rerun(st, profile, prev, comps, force, files))
                secs = _execute_stage(st, out_dir, fp, values[st.name], kernel, head)
                prev = _finish_stage(profile, st, out_dir, fp, comps, secs, cache)
                n = prev["failed_cases"]
                tail = f" -- {n} failed case(s) (see {out_dir / FAILED_CASES_CSV})" if n else ""
                log(f"{head}: done in {secs:.1f} s{tail}")
                status[st.name], failed_cases[st.name] = "ran", n
            elif st.name in selected:
                log(f"{head}: up to date, skipped (ran {prev.get('finished', '?')}, {prev.get('seconds', 0):.0f} s)")
                status[st.name] = "skipped"
                failed_cases[st.name] = int(prev.get("failed_cases", 0))
            upstream[st.name], files[st.name] = _upstream_entry(prev, profile, out_dir, st.name, cache)
    finally:
        cache.save()
    total = time.perf_counter() - t_total
    summary = {"profile": profile, "stages": status, "failed_cases": failed_cases,
               "failed_cases_files": {s: str(_stage_dir(paths, st) / FAILED_CASES_CSV)
                                      for st in all_stages if (s := st.name) in failed_cases and failed_cases[s]},
               "total_seconds": round(total, 1)}
    write_text(paths.runs / "pipeline.json", json.dumps(summary, indent=2) + "\n")
    n_failed = sum(failed_cases.values())
    log(f"pipeline {profile}: {sum(v == 'ran' for v in status.values())} ran, "
        f"{sum(v == 'skipped' for v in status.values())} skipped, total {total:.1f} s"
        + (f"; {n_failed} failed case(s) listed" if n_failed else ""))
    if report:
        log(f"report: {build_report(profile)}")
    return status


def _finish_stage(profile: str, st: Stage, out_dir: Path, fp: str, comps: dict, secs: float,
                  cache: DigestCache) -> dict:
    """Write the ``ok`` stamp of a stage that ran: a new run id, its failed cases, the components
    of its fingerprint and the digests (and files) of its outputs. Returns the stamp."""
    outputs = stage_outputs(profile, out_dir, st.name, cache)
    stamp = {"fingerprint": fp, "status": "ok", "seconds": round(secs, 2),
             "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "run_id": uuid.uuid4().hex,
             "failed_cases": count_failed_cases(out_dir), "components": comps, "outputs": _summary(outputs),
             "output_files": {k: v["by_file"] for k, v in outputs.items()}}
    _write_stamp(out_dir, stamp)
    return {**stamp, "_fresh": True}  # its outputs were just digested: not again


def _upstream_entry(prev: dict, profile: str, out_dir: Path, stage: str, cache: DigestCache) -> tuple[dict, dict]:
    """What later stages' fingerprints hold of a stage (its last run's id and its outputs now),
    and its outputs' files when it ran and now (to count what differs; not fingerprinted)."""
    if prev.get("status") == "ok" and "output_files" in prev and prev.get("_fresh"):
        outputs = {k: {"digest": prev["outputs"][k], "by_file": v} for k, v in prev["output_files"].items()}
    else:
        outputs = stage_outputs(profile, out_dir, stage, cache)
    entry = {"run_id": prev.get("run_id", "never ran" if not prev else "unknown"), "outputs": _summary(outputs)}
    return entry, {"then_digests": prev.get("outputs", {}), "then": prev.get("output_files", {}),
                   "now": {k: v["by_file"] for k, v in outputs.items()}}


def _write_stamp(out_dir: Path, stamp: dict) -> None:
    try:
        write_text(out_dir / STAMP, json.dumps(stamp) + "\n")
    except PermissionError as exc:
        raise StageFailedError(f"{out_dir}: cannot write the stage stamp ({exc.strerror}); "
                               f"is the folder read-only?") from None


def _prepare(paths, out_dir: Path, head: str, prev: dict, fp: str, force: bool, log, reason: str) -> None:
    """Set a stale stage's previous outputs aside, or resume an interrupted run; log why it runs."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        resume = not force and prev.get("fingerprint") == fp and prev.get("status") in ("running", "failed")
        if prev and not resume:
            kept = set_aside(out_dir, paths.runs / PREVIOUS / out_dir.name)
            if kept:
                log(f"{head}: outputs of its previous run moved to {kept}")
    except PermissionError as exc:
        raise StageFailedError(f"{out_dir}: cannot prepare the stage folder ({exc.strerror}: "
                               f"{exc.filename}); is it read-only?") from None
    if resume:
        log(f"{head}: resuming its interrupted run (same notebook, params and inputs)")
    else:
        log(f"{head}: re-running: {reason}" if prev else f"{head}: first run")
    log(f"{head}: running with params/{paths.profile}/{out_dir.name}.yaml ...")


def _known_stages() -> set[str]:
    return set(STAGES)


class StageFailedError(RuntimeError):
    """A notebook raised; the message has the stage, the cell and the error."""


def main(argv=None) -> int:
    """``spine1k reproduce``; returns the exit status (:data:`EXIT_OK`, :data:`EXIT_STAGE_FAILED`,
    :data:`EXIT_USAGE`, :data:`EXIT_FAILED_CASES`, :data:`EXIT_LOCKED`)."""
    ap = argparse.ArgumentParser(prog="spine1k reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="synthetic", help="synthetic | ci | paper")
    ap.add_argument("--force", action="store_true", help="re-run stages even when up to date")
    ap.add_argument("--stages", default=None, help="subset, e.g. 02-04 or 00,03")
    args = ap.parse_args(argv)
    try:
        run(args.profile, force=args.force, stages_spec=args.stages)
    except (UsageError, _params.ParamsError) as exc:
        print(f"spine1k reproduce: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunLockedError as exc:
        print(f"spine1k reproduce: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except StageFailedError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_STAGE_FAILED
    summary = json.loads((for_profile(args.profile).runs / "pipeline.json").read_text())
    return EXIT_FAILED_CASES if sum(summary.get("failed_cases", {}).values()) else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
