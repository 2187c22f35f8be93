"""Multi-process training: job files for ``torchrun --nproc_per_node N -m lib.ml.ddp --job FILE``.

Each process takes every N-th item of every batch (the global batch is the same for any N); gradients are
averaged by DDP (gloo on CPU, NCCL on GPUs); rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lib.io.atomic import write_text
from lib.ml.device import dist_info
from lib.ml.plans import Plan, plan_from_dict, plan_to_dict
from lib.ml.trainer import TrainResult, train


def write_job(path: str | Path, cases: Sequence[Sequence[str]], out_dir: str | Path, plan: Plan | None = None,
              **kwargs: Any) -> Path:
    """Write a JSON job file for ``python -m lib.ml.ddp --job FILE`` / ``torchrun ... -m lib.ml.ddp``.

    ``kwargs`` are :func:`train` keyword arguments (JSON-serialisable values).
    """
    job = {"cases": [list(map(str, c)) for c in cases], "out_dir": str(out_dir),
           "plan": plan_to_dict(plan) if plan is not None else None, "kwargs": kwargs}
    return write_text(path, json.dumps(job, indent=1, default=str) + "\n")


def run_job(path: str | Path) -> TrainResult:
    """Run a job file written by :func:`write_job` (in every torchrun process)."""
    job = json.loads(Path(path).read_text())
    plan = plan_from_dict(job["plan"]) if job.get("plan") else None
    kwargs = dict(job.get("kwargs", {}))
    if kwargs.get("val_cases"):
        kwargs["val_cases"] = [tuple(c) for c in kwargs["val_cases"]]
    return train([tuple(c) for c in job["cases"]], job["out_dir"], plan, **kwargs)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.ml.ddp",
                                 description="Train from a job file; multi-GPU: torchrun --nproc_per_node N -m lib.ml.ddp --job FILE")
    ap.add_argument("--job", required=True, help="JSON job file written by lib.ml.ddp.write_job")
    args = ap.parse_args(list(argv) if argv is not None else None)
    res = run_job(args.job)
    rank, world, _ = dist_info()
    if rank == 0:
        print(json.dumps(res.to_json()))
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
