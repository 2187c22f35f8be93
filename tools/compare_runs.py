"""Compare two runs of the study table by table and mask by mask (refactor check).

    python tools/compare_runs.py RUNS_A RUNS_B [--data-a DATA_A --data-b DATA_B] [--profile ci]

Every CSV and JSON under ``RUNS_x/<profile>/`` (stage tables, evaluation summaries) is compared
cell by cell; columns and keys that hold wall times (``seconds``, ``*_s``, ``elapsed``, ``time``,
``finished``) are skipped, and the two roots are replaced by ``<runs>`` / ``<data>`` in text
cells so that absolute paths compare equal. Every ``.nii.gz`` under both trees (predictions,
corrected masks, accepted ``gt`` masks of the release) is compared voxel by voxel with its affine.
Exit status 1 when anything differs; each difference is printed with file, row and column.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

TIME_KEY = re.compile(r"(^|_)(seconds|s|elapsed|elapsed_s|time|times|finished|started_at|finished_at|at|"
                      r"time_utc|epoch_s|cpu_s|call_seconds|generate_s|write_s|mean_s|median_s|max_s|"
                      r"mean_ms_per_mvoxel|total_s|mvox_per_s|slab_s|s_per_slice|full_case_s_estimate|"
                      r"seconds_per_scan|train_seconds|timings_s|git_sha|environment|fingerprint)$", re.IGNORECASE)
SKIP_FILES = {"conversion_times.csv", "generation_time.csv", "run_record.json", "pipeline.json",
              "train_result.json", ".stage.json"}


def _norm_text(v: str, roots: dict[str, str]) -> str:
    for root, tag in roots.items():
        v = v.replace(root, tag)
    return v


def _same(a, b, roots) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return _norm_text(str(a), roots) == _norm_text(str(b), roots)
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    if math.isnan(fa) and math.isnan(fb):
        return True
    return fa == fb


def compare_csv(pa: Path, pb: Path, roots_a, roots_b, out: list[str]) -> None:
    a, b = pd.read_csv(pa, keep_default_na=False), pd.read_csv(pb, keep_default_na=False)
    cols = [c for c in a.columns if not TIME_KEY.search(str(c))]
    if list(a.columns) != list(b.columns):
        out.append(f"{pa.name}: columns differ: {list(a.columns)} vs {list(b.columns)}")
        return
    if len(a) != len(b):
        out.append(f"{pa}: {len(a)} rows vs {len(b)}")
        return
    for c in cols:
        for i, (x, y) in enumerate(zip(a[c], b[c], strict=True)):
            xs = _norm_text(str(x), roots_a)
            ys = _norm_text(str(y), roots_b)
            if xs == ys:
                continue
            try:
                if float(xs) == float(ys) or (math.isnan(float(xs)) and math.isnan(float(ys))):
                    continue
            except ValueError:
                pass
            out.append(f"{pa}: row {i} column {c!r}: {xs!r} vs {ys!r}")


def _walk_json(a, b, where: str, roots_a, roots_b, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if TIME_KEY.search(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{where}: key {k!r} only in {'b' if k not in a else 'a'}")
                continue
            _walk_json(a[k], b[k], f"{where}.{k}", roots_a, roots_b, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: list lengths {len(a)} vs {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _walk_json(x, y, f"{where}[{i}]", roots_a, roots_b, out)
    elif isinstance(a, str) and isinstance(b, str):
        if _norm_text(a, roots_a) != _norm_text(b, roots_b):
            out.append(f"{where}: {a!r} vs {b!r}")
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        out.append(f"{where}: {a!r} vs {b!r}")


def compare_json(pa: Path, pb: Path, roots_a, roots_b, out: list[str]) -> None:
    try:
        a, b = json.loads(pa.read_text()), json.loads(pb.read_text())
    except ValueError as exc:
        out.append(f"{pa}: not JSON ({exc})")
        return
    _walk_json(a, b, str(pa), roots_a, roots_b, out)


def compare_nifti(pa: Path, pb: Path, out: list[str]) -> None:
    ia, ib = nib.load(str(pa)), nib.load(str(pb))
    if ia.shape != ib.shape or not np.array_equal(ia.affine, ib.affine):
        out.append(f"{pa}: shape/affine {ia.shape} vs {ib.shape}")
        return
    da, db = np.asarray(ia.dataobj), np.asarray(ib.dataobj)
    if da.dtype != db.dtype or not np.array_equal(da, db):
        out.append(f"{pa}: voxels differ ({int((da != db).sum())} of {da.size}; dtypes {da.dtype} {db.dtype})")


def compare_trees(root_a: Path, root_b: Path, roots_a, roots_b, out: list[str], pattern_ok) -> int:
    files_a = {p.relative_to(root_a) for p in root_a.rglob("*") if p.is_file() and pattern_ok(p)}
    files_b = {p.relative_to(root_b) for p in root_b.rglob("*") if p.is_file() and pattern_ok(p)}
    for rel in sorted(files_a ^ files_b):
        out.append(f"only in {'a' if rel in files_a else 'b'}: {rel}")
    n = 0
    for rel in sorted(files_a & files_b):
        pa, pb = root_a / rel, root_b / rel
        n += 1
        if pa.suffix == ".csv":
            compare_csv(pa, pb, roots_a, roots_b, out)
        elif pa.suffix == ".json":
            compare_json(pa, pb, roots_a, roots_b, out)
        elif pa.name.endswith(".nii.gz"):
            compare_nifti(pa, pb, out)
    return n


def _wanted(p: Path) -> bool:
    if p.name in SKIP_FILES or ".partial" in p.parts or ".previous" in p.parts:
        return False
    if "cache" in p.parts or "work" in p.parts and p.suffix == ".npy":
        return False
    return p.suffix in (".csv", ".json") or p.name.endswith(".nii.gz")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs_a", type=Path)
    ap.add_argument("runs_b", type=Path)
    ap.add_argument("--data-a", type=Path)
    ap.add_argument("--data-b", type=Path)
    ap.add_argument("--profile", default="ci")
    ap.add_argument("--max-lines", type=int, default=60)
    args = ap.parse_args(argv)
    roots_a = {str(args.runs_a.resolve()): "<runs>"}
    roots_b = {str(args.runs_b.resolve()): "<runs>"}
    if args.data_a and args.data_b:
        roots_a[str(args.data_a.resolve())] = "<data>"
        roots_b[str(args.data_b.resolve())] = "<data>"
    out: list[str] = []
    n = compare_trees(args.runs_a / args.profile, args.runs_b / args.profile, roots_a, roots_b, out, _wanted)
    if args.data_a and args.data_b:
        n += compare_trees(args.data_a / args.profile / "CTSpine1K", args.data_b / args.profile / "CTSpine1K",
                           roots_a, roots_b, out, _wanted)
    for line in out[: args.max_lines]:
        print(line)
    if len(out) > args.max_lines:
        print(f"... {len(out) - args.max_lines} more")
    print(f"{n} files compared, {len(out)} difference(s)")
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main())
