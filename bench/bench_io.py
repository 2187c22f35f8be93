"""Benchmark: reading a CT volume, the pipeline's most repeated cost.

Times loading one 512x512x500 int16 volume (realistic CT-like content, compressed at nibabel's
default level) with: nibabel + the standard library's gzip, nibabel + python-isal (what
``lib.io`` registers), ``lib.io.load_volume`` end to end (isal + canonical reorientation),
indexed_gzip when installed, and an uncompressed ``.npy``. Prints seconds and ratios.

    python bench/bench_io.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import openers

from lib import io


def _ct_like(shape, seed=0):
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(x - shape[0] / 2, (y - shape[1] / 2) * 1.3)
    body = np.where(r < shape[0] * 0.42, 40, -1000).astype(np.int16)
    vol = np.repeat(body[:, :, None], shape[2], axis=2)
    vol += rng.normal(0, 20, size=shape).astype(np.int16)  # scanner noise: makes gzip work
    return vol


def _time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256x256x200 instead of 512x512x500")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    shape = (256, 256, 200) if args.quick else (512, 512, 500)
    vol = _ct_like(shape)
    with tempfile.TemporaryDirectory() as d:
        gz = Path(d) / "ct.nii.gz"
        npy = Path(d) / "ct.npy"
        io.save_volume(vol, np.diag([0.76, 0.76, 1.1, 1.0]), gz)
        np.save(npy, vol)
        size_mb = gz.stat().st_size / 2**20
        fast = openers.ImageOpener.compress_ext_map[".gz"]

        def nib_read():
            return np.asanyarray(nib.load(str(gz)).dataobj)

        results = {}
        std = io.NIBABEL_GZ_OPENER
        openers.Opener.compress_ext_map[".gz"] = openers.ImageOpener.compress_ext_map[".gz"] = std
        results["nibabel + stdlib gzip"] = _time(nib_read, args.repeat)
        try:
            import indexed_gzip  # noqa: F401

            igz = (lambda f, mode="rb", **k: indexed_gzip.IndexedGzipFile(f), ("mode",))
            openers.Opener.compress_ext_map[".gz"] = openers.ImageOpener.compress_ext_map[".gz"] = igz
            results["nibabel + indexed_gzip"] = _time(nib_read, args.repeat)
        except ImportError:
            pass
        openers.Opener.compress_ext_map[".gz"] = openers.ImageOpener.compress_ext_map[".gz"] = fast
        results["nibabel + isal (lib.io)"] = _time(nib_read, args.repeat)
        results["lib.io.load_volume (isal + RAS)"] = _time(lambda: io.load_volume(gz), args.repeat)
        results["numpy .npy (uncompressed)"] = _time(lambda: np.load(npy), args.repeat)
    base = results["nibabel + stdlib gzip"]
    print(f"NIfTI load, {shape[0]}x{shape[1]}x{shape[2]} int16, {size_mb:.0f} MB .nii.gz, median of {args.repeat}")
    for name, t in results.items():
        print(f"  {name:34s} {t:7.3f} s   {base / t:6.1f}x vs stdlib gzip")


if __name__ == "__main__":
    main()
