"""Benchmark: DICOM series -> NIfTI, correctness and time per series, three converters.

Converters compared on series written by ``lib.io.dicom_write.write_dicom_series`` (so the true
affine is known exactly):

* ``lib.io.dicom_read`` (pydicom-based, what the curation stage uses);
* SimpleITK ``ImageSeriesReader`` (GDCM sorting by position), written with ``sitk.WriteImage``;
* ``dcm2niix`` (the PyPI package's binary, ``-z y``), when installed.

Correctness: every output is loaded with ``lib.io.load_volume`` (canonical RAS order) and
compared with the truth (voxels equal, largest affine difference in mm) for axial series in
ascending, descending and shuffled file order, an oblique (30 deg) and a sagittal series.
Fault detection: whether a series with a missing slice / mixed series UIDs / no PixelSpacing
is refused or flagged (a warning counts) instead of converted silently.
Time: median wall seconds per axial series of the benchmark size, including the NIfTI write.

    python bench/bench_convert.py [--quick] [--repeat N] [--slices N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from lib import io
from lib.io import dicom_read as dicom
from lib.io import dicom_write


def _ct_like(shape, seed=0):
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(x - shape[0] / 2, (y - shape[1] / 2) * 1.3)
    body = np.where(r < shape[0] * 0.42, 40, -1000).astype(np.int16)
    vol = np.repeat(body[:, :, None], shape[2], axis=2)
    vol += rng.normal(0, 20, size=shape).astype(np.int16)
    vol[shape[0] // 2 - 8: shape[0] // 2 + 8, shape[1] // 2 + 10: shape[1] // 2 + 30, :] = 700  # "spine"
    return vol


def _affines():
    ax = np.array([[0.78, 0, 0, -200.0], [0, 0.78, 0, -180.0], [0, 0, 1.25, -400.0], [0, 0, 0, 1]])
    th = np.deg2rad(30)
    rot = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    obl = np.eye(4)
    obl[:3, :3] = rot @ np.diag([0.78, 0.78, 1.25])
    obl[:3, 3] = [10, -20, 30]
    sag = np.eye(4)
    sag[:3, :3] = np.array([[0, 0, 1.5], [0.9, 0, 0], [0, 0.9, 0]])
    sag[:3, 3] = [-60, -100, -120]
    return {"axial": ax, "oblique30": obl, "sagittal": sag}


# ----------------------------------------------------------------------------- converters


def conv_lib(folder: Path, out: Path) -> tuple[Path | None, str]:
    try:
        dicom.convert_series(dicom.list_dicom_files(folder), out / "lib.nii.gz")
    except dicom.SeriesError as exc:
        return None, str(exc)
    return out / "lib.nii.gz", ""


@contextlib.contextmanager
def _captured_stderr():
    """Capture what C++ code (ITK) writes to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        box: list[str] = []
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read().decode("utf-8", "replace"))


def _sitk_read(folder: Path):
    import SimpleITK as sitk

    warnings: list[str] = []
    reader = sitk.ImageSeriesReader()
    with _captured_stderr() as err:
        ids = reader.GetGDCMSeriesIDs(str(folder))
        names = reader.GetGDCMSeriesFileNames(str(folder), ids[0]) if ids else []
        reader.SetFileNames(names)
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            img, warnings = None, [str(exc).splitlines()[-1]]
    if len(ids) != 1:
        warnings.append(f"{len(ids)} series ids")
    warnings += [ln.strip() for ln in err[0].splitlines() if "nonuniform" in ln.lower() or "missing" in ln.lower()]
    return img, "; ".join(warnings)


def conv_sitk(folder: Path, out: Path) -> tuple[Path | None, str]:
    import SimpleITK as sitk

    img, note = _sitk_read(folder)
    if img is None:
        return None, note
    path = out / "sitk.nii.gz"
    sitk.WriteImage(img, str(path), useCompression=True)
    return path, note


def conv_sitk_libwrite(folder: Path, out: Path) -> tuple[Path | None, str]:
    """SimpleITK reading, the same NIfTI writer (lib.io.nifti) (isolates the reading cost)."""
    import SimpleITK as sitk

    img, note = _sitk_read(folder)
    if img is None:
        return None, note
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    path = out / "sitk_lib.nii.gz"
    io.save_volume(arr.astype(np.int16), dicom.LPS_TO_RAS @ lps, path)
    return path, note


def _dcm2niix_bin() -> str | None:
    try:
        import dcm2niix

        return str(dcm2niix.bin)
    except ImportError:
        return shutil.which("dcm2niix")


def conv_dcm2niix(folder: Path, out: Path) -> tuple[Path | None, str]:
    exe = _dcm2niix_bin()
    proc = subprocess.run([exe, "-z", "y", "-b", "n", "-f", "d2n", "-o", str(out), str(folder)],
                          capture_output=True, text=True)
    outs = sorted(out.glob("d2n*.nii.gz"))
    generic = ("protocol name", "determine manufacturer", "unable to determine")
    msg = " | ".join(line for line in (proc.stdout + proc.stderr).splitlines()
                     if ("warning" in line.lower() or "error" in line.lower())
                     and not any(g in line.lower() for g in generic))
    if proc.returncode != 0 or not outs:
        return None, msg or f"exit {proc.returncode}"
    if len(outs) > 1:
        msg = f"{len(outs)} output files; " + msg
    return outs[0], msg


CONVERTERS = {"lib.io.dicom_read (pydicom)": conv_lib, "SimpleITK ImageSeriesReader": conv_sitk,
              "SimpleITK read + lib.io write": conv_sitk_libwrite}
if _dcm2niix_bin():
    CONVERTERS["dcm2niix"] = conv_dcm2niix


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _compare(path: Path, truth_arr, truth_affine) -> tuple[bool, float]:
    got = io.load_volume(path)
    with tempfile.TemporaryDirectory() as d:
        tp = io.save_volume(truth_arr, truth_affine, Path(d) / "t.nii.gz")
        truth = io.load_volume(tp)
        same = got.shape == truth.shape and np.array_equal(np.asarray(got.array), np.asarray(truth.array))
        err = float(np.abs(got.affine - truth.affine).max()) if got.shape == truth.shape else float("inf")
    return same, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256x256 slices instead of 512x512")
    ap.add_argument("--slices", type=int, default=None, help="slices of the timed series (default 200, quick 60)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n_xy = 256 if args.quick else 512
    nz = args.slices or (60 if args.quick else 200)
    small = _ct_like((96, 80, 24), seed=1)
    tags = {"PatientID": "BENCH", "Manufacturer": "SYNTH"}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        print(f"converters: {', '.join(CONVERTERS)}")
        print("\ncorrectness (voxels equal / max affine error mm / note):")
        for gname, aff in _affines().items():
            for order in dicom_write.SLICE_ORDERS if gname == "axial" else ("shuffled",):
                folder = root / f"{gname}_{order}"
                dicom_write.write_dicom_series(small, aff, folder, tags, slice_order=order)
                for cname, conv in CONVERTERS.items():
                    out = root / "out" / f"{gname}_{order}_{_slug(cname)}"
                    out.mkdir(parents=True)
                    path, note = conv(folder, out)
                    if path is None:
                        print(f"  {gname:9s} {order:10s} {cname:32s} FAILED {note[:80]}")
                        continue
                    same, err = _compare(path, small, aff)
                    print(f"  {gname:9s} {order:10s} {cname:32s} {str(same):5s} {err:.2e} {note[:60]}")
        print("\nfault detection (refused or warned = detected):")
        aff = _affines()["axial"]
        faulty = {}
        f = root / "missing"
        dicom_write.write_dicom_series(small, aff, f, tags, drop_slices=[11])
        faulty["missing slice"] = f
        f = root / "mixed"
        dicom_write.write_dicom_series(small, aff, f, tags, series_uid="1.2.3.4.1")
        for p in sorted(f.glob("*.dcm"))[::3]:
            ds = pydicom.dcmread(p)
            ds.SeriesInstanceUID = "1.2.3.4.2"
            ds.save_as(p)
        faulty["mixed series UIDs"] = f
        f = root / "nospacing"
        dicom_write.write_dicom_series(small, aff, f, tags)
        for p in sorted(f.glob("*.dcm")):
            ds = pydicom.dcmread(p)
            del ds.PixelSpacing
            ds.save_as(p)
        faulty["no PixelSpacing"] = f
        for fname, folder in faulty.items():
            for cname, conv in CONVERTERS.items():
                out = root / "out" / f"{_slug(fname)}_{_slug(cname)}"
                out.mkdir(parents=True)
                path, note = conv(folder, out)
                detected = path is None or bool(note)
                print(f"  {fname:18s} {cname:32s} {'detected' if detected else 'SILENT'}: "
                      f"{(note or 'converted')[:90]}")

        print(f"\ntime per axial series {n_xy}x{n_xy}x{nz} (median of {args.repeat}, incl. .nii.gz write):")
        big = _ct_like((n_xy, n_xy, nz), seed=2)
        folder = root / "timed"
        dicom_write.write_dicom_series(big, aff, folder, tags, slice_order="shuffled")
        results = {}
        for cname, conv in CONVERTERS.items():
            times = []
            for r in range(args.repeat):
                out = root / "out" / f"timed_{_slug(cname)}_{r}"
                out.mkdir(parents=True)
                t0 = time.perf_counter()
                path, _ = conv(folder, out)
                times.append(time.perf_counter() - t0)
                shutil.rmtree(out)
            results[cname] = statistics.median(times)
        ref = results["lib.io.dicom_read (pydicom)"]
        for cname, t in results.items():
            print(f"  {cname:32s} {t:7.2f} s  ({t / nz * 1000:.1f} ms/slice, {t / ref:.2f}x lib.io.dicom_read)")


if __name__ == "__main__":
    main()
