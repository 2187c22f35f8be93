"""Paper-scale memory and time: one 512 x 512 x 800 case laid out like a real VerSe download.

    python bench/bench_paper_scale.py [--quick] [--case-dir DIR] [--steps load,selection,...] [--json PATH]

The case (written once, kept under ``--case-dir``, default ``runs/bench/paper_scale``): a CT of
512 x 512 x 800 voxels (0.78 x 0.78 x 0.8 mm, int16 HU) and its vertebra mask stored as
**float64**, as real VerSe masks are, both in VerSe's PIR voxel order
(``sub-verse900_ct.nii.gz``, ``sub-verse900_seg-vert_msk.nii.gz``). ``--quick`` writes a
256 x 256 x 200 case instead (for tests of this script).

Every step runs in a fresh Python process, so its peak resident memory (``ru_maxrss``) is the
step's own; the process's memory after its imports (numpy, torch, nibabel, the workspace) is
printed beside it as ``base``:

* ``load``: the mask and the CT as each step gets them (:func:`lib.io.load_mask` and
  :func:`lib.io.load_ct` where they exist, else ``load_volume`` as stored);
* ``selection``: 02's VerSe selection of the scan (:func:`lib.datasets.verse.inspect_verse_case`);
* ``fingerprint``: nnU-Net-style fingerprint (:func:`lib.ml.planning.fingerprint_case`);
* ``cache``: the training cache of the paper plan (:func:`lib.ml.cache.cache_case`);
* ``inference``: :func:`lib.ml.inference.predict_case` with the paper plan (one 3d_fullres
  stage, its patch, overlap 0.5, 26 classes) and a trivial network (one 1x1x1 convolution), so
  the figure holds no network activations; ``activations`` adds the peak of one forward pass
  of the real paper network on one window (what a real network adds on top);
* ``evaluation``: :func:`lib.evaluation.folders.evaluate_pair` of the prediction against the mask;
* ``monai``: the named competitor for the sliding window, MONAI's ``sliding_window_inference``
  (full-volume all-class output buffer, same trivial network, same patch and overlap) on the
  first 160 slices (the whole volume's 26-class float32 buffer alone would be 22 GB), with
  ours on the same slab for the ratio.

Seconds are wall clock, with one torch/BLAS thread (``1 core``) and with all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FULL = {"shape": (512, 512, 800), "spacing": (0.78, 0.78, 0.8)}
QUICK = {"shape": (256, 256, 200), "spacing": (1.56, 1.56, 3.2)}
STEPS = ("load", "selection", "fingerprint", "cache", "inference", "activations", "evaluation", "monai")
CASE = "sub-verse900"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------- the case


def _phantom(shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (RAS order, int16 HU) and its vertebra labels 1..24 (C1..L5)."""
    nx, ny, nz = shape
    x = (np.arange(nx) - nx / 2) * spacing[0]
    y = (np.arange(ny) - ny / 2) * spacing[1]
    body = (x[:, None] / (0.42 * nx * spacing[0])) ** 2 + (y[None, :] / (0.36 * ny * spacing[1])) ** 2 <= 1
    column = x[:, None] ** 2 + (y[None, :] + 0.12 * ny * spacing[1]) ** 2 <= (0.035 * nx * spacing[0] + 6) ** 2
    ct = np.full(shape, -1000, dtype=np.int16)
    mask = np.zeros(shape, dtype=np.uint8)
    rng = np.random.default_rng(0)
    z_mm = np.arange(nz) * spacing[2]
    top, bottom = 0.04 * z_mm[-1], 0.96 * z_mm[-1]
    edges = np.linspace(bottom, top, 25)  # 24 vertebrae, L5 at the bottom (RAS: z up)
    for k in range(nz):
        sl = np.where(body, 40, -1000).astype(np.int16)
        level = np.searchsorted(-edges, -z_mm[k]) if top <= z_mm[k] <= bottom else 0
        if 1 <= level <= 24:
            lo, hi = edges[level], edges[level - 1]
            if z_mm[k] > lo + 0.12 * (hi - lo):  # the disc below each body stays unlabelled
                sl[column] = 400
                mask[:, :, k][column] = 25 - level if level else 0
        ct[:, :, k] = sl + rng.integers(-20, 20, size=(nx, ny), dtype=np.int16)
    return ct, mask


def write_case(case_dir: Path, shape, spacing) -> dict[str, str]:
    """The CT (int16) and its float64 mask in PIR voxel order, VerSe file names; reused when present."""
    import nibabel as nib

    case_dir.mkdir(parents=True, exist_ok=True)
    ct_path = case_dir / f"{CASE}_ct.nii.gz"
    msk_path = case_dir / f"{CASE}_seg-vert_msk.nii.gz"
    stamp = case_dir / "case.json"
    want = {"shape": list(shape), "spacing": list(spacing), "version": 1}
    if ct_path.exists() and msk_path.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return {"image": str(ct_path), "mask": str(msk_path)}
    ct, mask = _phantom(shape, spacing)
    # RAS -> PIR: file axis 0 = P (-y), 1 = I (-z), 2 = R (x)
    to_file = lambda a: np.ascontiguousarray(np.transpose(a, (1, 2, 0))[::-1, ::-1, :])  # noqa: E731
    nx, ny, nz = shape
    aff = np.zeros((4, 4))
    aff[0, 2] = spacing[0]
    aff[1, 0] = -spacing[1]
    aff[2, 1] = -spacing[2]
    aff[:3, 3] = [-nx * spacing[0] / 2, ny * spacing[1] / 2, nz * spacing[2]]
    aff[3, 3] = 1
    for arr, path, dtype in ((ct, ct_path, np.int16), (mask, msk_path, np.float64)):
        img = nib.Nifti1Image(to_file(arr).astype(dtype), aff)
        img.set_qform(aff, 1)
        img.set_sform(aff, 1)
        nib.save(img, str(path))
        del img
    stamp.write_text(json.dumps(want))
    return {"image": str(ct_path), "mask": str(msk_path)}


# --------------------------------------------------------------------------- steps (child process)


def _paper_plan(shape, spacing):
    from lib.ml import planning

    rng = np.random.default_rng(0)
    per = [{"case_id": f"c{i}", "shape": list(shape), "spacing_mm": list(spacing), "labels": list(range(1, 26)),
            "fg_extent_mm": [60.0, 60.0, 0.9 * shape[2] * spacing[2]],
            "fg_samples": rng.normal(400, 200, 500).tolist()} for i in range(4)]
    return planning.plan_experiment(planning.summarise_fingerprint(per), "paper")


def _trivial_model(plan):
    import torch

    from lib.ml.inference import LoadedModel

    st = plan.stages[0]
    net = torch.nn.Conv3d(st.in_channels, st.n_classes(plan), 1).eval()
    return LoadedModel(plan, {st.name: net}, torch.device("cpu"))


def _load(case):
    import lib.io as io

    if hasattr(io, "load_mask"):
        m = io.load_mask(case["mask"])
        c = io.load_ct(case["image"])
    else:  # before issue 17: as stored
        m = io.load_volume(case["mask"])
        c = io.load_volume(case["image"])
    return {"mask_dtype": str(m.array.dtype), "ct_dtype": str(c.array.dtype)}


def _selection(case):
    from lib.datasets.verse import inspect_verse_case

    row = inspect_verse_case({"case_id": CASE, "image": case["image"], "mask": case["mask"]})
    return {"usable": bool(row["usable"]), "reason": row["reason"], "n_vertebrae": int(row["n_vertebrae"])}


def _fingerprint(case):
    from lib.ml.planning import fingerprint_case

    fp = fingerprint_case((CASE, case["image"], case["mask"]))
    return {"labels": len(fp["labels"])}


def _cache(case, work: Path, shape, spacing):
    from lib.ml.cache import CacheJob, cache_case
    from lib.ml.plans import plan_to_dict

    plan = _paper_plan(shape, spacing)
    folder = work / "cache"
    shutil.rmtree(folder, ignore_errors=True)
    meta = cache_case(CacheJob(CASE, case["image"], case["mask"], (str(folder),), plan_to_dict(plan),
                               (plan.stages[0].name,)))
    return {"stored_shape": list(np.load(folder / f"{CASE}_seg.npy", mmap_mode="r").shape), "stages": len(meta)}


def _inference(case, work: Path, shape, spacing):
    from lib.ml.inference import predict_case

    plan = _paper_plan(shape, spacing)
    out = work / f"{CASE}_pred.nii.gz"
    out.unlink(missing_ok=True)
    predict_case(_trivial_model(plan), case["image"], out, overwrite=True)
    return {"patch": list(plan.stages[0].patch_size), "spacing_mm": list(plan.stages[0].spacing_mm),
            "classes": plan.stages[0].n_classes(plan)}


def _activations(case, work: Path, shape, spacing):
    import torch

    from lib.ml.networks import build_network

    plan = _paper_plan(shape, spacing)
    st = plan.stages[0]
    net = build_network(plan, st).eval()
    x = torch.zeros((1, st.in_channels, *st.patch_size))
    before = _current_rss_mb()
    with torch.no_grad():
        net(x)
    return {"patch": list(st.patch_size), "rss_before_forward_mb": round(before, 1)}


def _evaluation(case, work: Path):
    from lib.evaluation.folders import evaluate_pair

    pred = work / f"{CASE}_pred.nii.gz"
    rows = evaluate_pair(CASE, case["mask"], pred if pred.exists() else case["mask"], hd95="pooled")
    return {"rows": len(rows), "prediction": "inference output" if pred.exists() else "the truth itself"}


def _monai(case, work: Path, shape, spacing):
    import torch
    from monai.inferers import sliding_window_inference

    from lib.ml.sliding_window import sliding_window

    plan = _paper_plan(shape, spacing)
    st = plan.stages[0]
    net = _trivial_model(plan).nets[st.name]
    n_cls = st.n_classes(plan)
    nz = min(160, shape[2])
    img = np.random.default_rng(0).normal(0, 1, (shape[0], shape[1], nz)).astype(np.float32)
    which = os.environ["BENCH_MONAI_WHICH"]
    t0 = time.perf_counter()
    if which == "ours":
        out = np.zeros(img.shape, np.uint8)

        def consume(z0, z1, probs):
            out[..., z0:z1] = probs.argmax(0)

        sliding_window(net, img, st.patch_size, n_cls, consume, overlap=plan.inference["overlap"])
    else:
        with torch.no_grad():
            y = sliding_window_inference(torch.from_numpy(img)[None, None], st.patch_size, 1, net,
                                         overlap=plan.inference["overlap"], mode="gaussian", sigma_scale=0.125)
            y.argmax(1)
    return {"which": which, "slab": [shape[0], shape[1], nz], "inner_seconds": time.perf_counter() - t0}


def run_step(step: str, case_dir: Path, shape, spacing) -> dict:
    base = _current_rss_mb()
    case = {"image": str(case_dir / f"{CASE}_ct.nii.gz"), "mask": str(case_dir / f"{CASE}_seg-vert_msk.nii.gz")}
    work = case_dir / "work"
    work.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    fn = {"load": lambda: _load(case), "selection": lambda: _selection(case),
          "fingerprint": lambda: _fingerprint(case), "cache": lambda: _cache(case, work, shape, spacing),
          "inference": lambda: _inference(case, work, shape, spacing),
          "activations": lambda: _activations(case, work, shape, spacing),
          "evaluation": lambda: _evaluation(case, work), "monai": lambda: _monai(case, work, shape, spacing)}[step]
    info = fn()
    return {"step": step, "seconds": time.perf_counter() - t0, "peak_mb": _rss_mb(), "base_mb": base, **info}


# --------------------------------------------------------------------------- driver


def _child(step: str, args, threads: int, extra_env: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "SPINE1K_BENCH_THREADS": str(threads), "PYTHONPATH": os.environ.get("BENCH_LIB_ROOT", str(REPO)),
           **(extra_env or {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--case-dir", str(args.case_dir)]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=env["PYTHONPATH"])
    if out.returncode != 0:
        return {"step": step, "error": (out.stderr or out.stdout).strip().splitlines()[-1:], "threads": threads}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["threads"] = threads
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 256 x 256 x 200 case (tests)")
    ap.add_argument("--case-dir", type=Path, default=None)
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--threads", default="1,all", help="thread counts to time: 1, all, or both")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    geo = QUICK if args.quick else FULL
    if args.case_dir is None:
        args.case_dir = REPO / "runs" / "bench" / ("paper_scale_quick" if args.quick else "paper_scale")
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("SPINE1K_BENCH_THREADS", "1")))
        print(json.dumps(run_step(args.child, args.case_dir, geo["shape"], geo["spacing"]), default=str))
        return 0
    all_cores = len(os.sched_getaffinity(0))
    thread_list = sorted({1 if t == "1" else all_cores for t in args.threads.split(",")})
    t0 = time.perf_counter()
    write_case(args.case_dir, geo["shape"], geo["spacing"])
    print(f"case {geo['shape']} at {geo['spacing']} mm (CT int16, mask float64, PIR) in {args.case_dir} "
          f"({time.perf_counter() - t0:.0f} s); lib from {os.environ.get('BENCH_LIB_ROOT', REPO)}")
    results = []
    for step in args.steps.split(","):
        runs = [None] if step == "monai" else thread_list
        for threads in runs:
            if step == "monai":
                for which in ("ours", "monai"):
                    r = _child(step, args, all_cores, {"BENCH_MONAI_WHICH": which})
                    results.append(r)
                    _print_row(r)
                continue
            if step in ("load", "selection", "fingerprint", "activations", "evaluation") and threads != thread_list[0]:
                continue  # single-threaded numpy/nibabel code: one timing says it
            r = _child(step, args, threads)
            results.append(r)
            _print_row(r)
    _print_ratios(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".part")
        tmp.write_text(json.dumps({"shape": geo["shape"], "spacing": geo["spacing"], "results": results}, indent=1,
                                  default=str))
        tmp.replace(args.json)
    return 1 if any("error" in r for r in results) else 0


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"  {r['step']:12s} threads {r['threads']}: FAILED {r['error']}")
        return
    extra = {k: v for k, v in r.items() if k not in ("step", "seconds", "peak_mb", "base_mb", "threads")}
    print(f"  {r['step']:12s} threads {r['threads']:>2}: {r['seconds']:7.1f} s, peak {r['peak_mb'] / 1024:5.2f} GB "
          f"(base {r['base_mb'] / 1024:.2f} GB) {extra}")


def _print_ratios(results: list[dict]) -> None:
    ok = [r for r in results if "error" not in r]
    inf = [r for r in ok if r["step"] == "inference"]
    act = [r for r in ok if r["step"] == "activations"]
    if inf and act:
        added = act[0]["peak_mb"] - act[0]["rss_before_forward_mb"]
        print(f"inference with the paper network's activations: about {(inf[0]['peak_mb'] + added) / 1024:.2f} GB "
              f"({inf[0]['peak_mb'] / 1024:.2f} GB trivial network + {added / 1024:.2f} GB for one forward pass "
              f"of patch {act[0]['patch']})")
    ours = next((r for r in ok if r.get("which") == "ours"), None)
    monai = next((r for r in ok if r.get("which") == "monai"), None)
    if ours and monai:
        print(f"sliding window on {ours['slab']}: ours {ours['inner_seconds']:.1f} s, peak {ours['peak_mb'] / 1024:.2f} GB"
              f" | MONAI sliding_window_inference {monai['inner_seconds']:.1f} s, peak {monai['peak_mb'] / 1024:.2f} GB"
              f" | time ratio MONAI/ours {monai['inner_seconds'] / ours['inner_seconds']:.2f}, "
              f"memory ratio {monai['peak_mb'] / ours['peak_mb']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
