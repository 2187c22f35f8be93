"""Benchmark: synthetic CT generation time per case, at the synthetic grid and at paper scale.

Measures, in one run:
  * lib.synthetic.phantom.generate_case per field of view at the synthetic grid (params/synthetic);
  * one paper-scale case (512 x 512, 0.75 mm in-plane, 0.8 mm slices, abdomen = COLONOG-like);
  * the shared rendering of a patient's two CT-colonography positions (generate_scans) against
    two independent generate_case calls;
  * the DICOM series writer (pre-encoded fixed elements) against pydicom's dcmwrite per slice;
  * the deterministic NIfTI writer (isal gzip, mtime 0) against nibabel.save.

Usage:
    python bench/bench_phantom.py            # full (paper-scale case takes a minute or two)
    python bench/bench_phantom.py --quick    # smaller paper-scale stand-in (256 x 256, 1.5 mm)

Writes ``<runs>/bench/bench_phantom.json`` (read by notebooks/00_sources.ipynb's closing note).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.core import paths  # noqa: E402
from lib.io import save_volume, write_text  # noqa: E402
from lib.io.dicom_write import write_dicom_series  # noqa: E402
from lib.synthetic.phantom import CaseSpec, generate_case, generate_scans, plan_grid  # noqa: E402


def _time(fn, repeat: int = 1):
    best, out = None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def bench_cases(quick: bool) -> list[dict]:
    syn = [
        ("synthetic", "COLONOG-like abdomen", CaseSpec(seed=1, fov="abdomen", spacing_mm=(2.0, 2.0, 1.75), colon_gas=True)),
        ("synthetic", "HNSCC-like neck", CaseSpec(seed=2, fov="neck", spacing_mm=(2.0, 2.0, 2.0))),
        ("synthetic", "MSD-like abdomen", CaseSpec(seed=3, fov="abdomen", spacing_mm=(2.0, 2.0, 2.5), contrast_phase="portal")),
        ("synthetic", "COVID-like chest 4.5 mm", CaseSpec(seed=4, fov="chest", spacing_mm=(2.0, 2.0, 4.5), lung_opacity=0.2)),
        ("synthetic", "VerSe complete", CaseSpec(seed=5, fov="whole", spacing_mm=(2.0, 2.0, 2.0), center_on_spine=True,
                                                 fov_xy_mm=240.0)),
        ("synthetic", "VerSe cropped", CaseSpec(seed=6, fov="verse_crop", spacing_mm=(2.0, 2.0, 2.0))),
    ]
    if quick:
        paper = [("paper (quick stand-in)", "abdomen 256^2 1.5 mm",
                  CaseSpec(seed=1, fov="abdomen", spacing_mm=(1.5, 1.5, 1.6), fov_xy_mm=384.0, colon_gas=True))]
    else:
        paper = [("paper", "COLONOG-like abdomen 512^2",
                  CaseSpec(seed=1, fov="abdomen", spacing_mm=(0.75, 0.75, 0.8), fov_xy_mm=384.0, colon_gas=True)),
                 ("paper", "COVID-like chest 512^2 4.5 mm",
                  CaseSpec(seed=4, fov="chest", spacing_mm=(0.79, 0.79, 4.5), fov_xy_mm=404.5, lung_opacity=0.2))]
    rows = []
    for scale, name, spec in syn + paper:
        dt, case = _time(lambda spec=spec: generate_case(spec), repeat=2 if scale == "synthetic" else 1)
        n = int(np.prod(case.ct.shape))
        rows.append(dict(scale=scale, fov=name, shape="x".join(map(str, case.ct.shape)),
                         spacing_mm=", ".join(f"{v:g}" for v in spec.spacing_mm), generate_s=round(dt, 3),
                         mvox_per_s=round(n / dt / 1e6, 2), labels=len(case.centroids)))
        print(f"{scale:>22} | {name:<30} | {rows[-1]['shape']:>13} | {dt:7.2f} s | {rows[-1]['mvox_per_s']:6.1f} Mvox/s")
    return rows


def bench_pair() -> dict:
    sup = CaseSpec(seed=7, fov="abdomen", spacing_mm=(2.0, 2.0, 1.75), colon_gas=True)
    shape, aff = plan_grid(sup)
    zr = (float(aff[2, 3]), float(aff[2, 3] + (shape[2] - 1) * aff[2, 2]))
    sup = CaseSpec(seed=7, fov="abdomen", spacing_mm=(2.0, 2.0, 1.75), colon_gas=True, z_range_mm=zr)
    pro = CaseSpec(seed=7, fov="abdomen", spacing_mm=(2.0, 2.0, 1.75), colon_gas=True, z_range_mm=zr,
                   position="prone", scan_seed=1)
    t_pair, _ = _time(lambda: generate_scans([sup, pro]))
    t_two, _ = _time(lambda: (generate_case(sup), generate_case(pro)))
    print(f"supine+prone: generate_scans {t_pair:.2f} s vs 2 x generate_case {t_two:.2f} s "
          f"(x{t_two / t_pair:.2f})")
    return dict(generate_scans_s=round(t_pair, 3), two_generate_case_s=round(t_two, 3), speedup=round(t_two / t_pair, 2))


def bench_writers() -> dict:
    import nibabel as nib
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    case = generate_case(CaseSpec(seed=8, fov="abdomen", spacing_mm=(2.0, 2.0, 2.0)))
    ct = case.ct[:, :, :120]
    tags = {"PatientName": "BENCH^X", "PatientID": "B1", "StudyDate": "20070101"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t_fast, _ = _time(lambda: write_dicom_series(ct, case.affine, tmp / "fast", tags), repeat=3)

        def naive():
            out = tmp / "naive"
            out.mkdir(exist_ok=True)
            for k in range(ct.shape[2]):
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                meta.MediaStorageSOPInstanceUID = f"1.2.3.{k + 1}"
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds = FileDataset(str(out / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
                for key, val in tags.items():
                    setattr(ds, key, val)
                ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, f"1.2.3.{k + 1}", "CT"
                ds.ImagePositionPatient = [0, 0, k]
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.PixelSpacing = [2, 2]
                ds.Rows, ds.Columns = ct.shape[1], ct.shape[0]
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
                ds.PixelData = np.ascontiguousarray(ct[:, :, k].T).tobytes()
                pydicom.dcmwrite(str(out / f"{k}.dcm"), ds, enforce_file_format=True)

        t_naive, _ = _time(naive, repeat=3)
        t_nii, _ = _time(lambda: save_volume(case.ct, case.affine, tmp / "a.nii.gz"), repeat=3)
        t_nib, _ = _time(lambda: nib.save(nib.Nifti1Image(case.ct, case.affine), str(tmp / "b.nii.gz")), repeat=3)
    n = ct.shape[2]
    print(f"DICOM series ({n} slices {ct.shape[0]}x{ct.shape[1]}, best of 3): write_dicom_series {t_fast:.2f} s "
          f"({1000 * t_fast / n:.2f} ms/slice, full tag set, atomic series) vs a minimal pydicom dcmwrite loop "
          f"{t_naive:.2f} s (ratio {t_naive / t_fast:.2f})")
    print(f"NIfTI {case.ct.shape}: deterministic isal gzip {t_nii:.2f} s vs nibabel.save {t_nib:.2f} s "
          f"(x{t_nib / t_nii:.2f})")
    return dict(dicom_fast_s=round(t_fast, 3), dicom_pydicom_s=round(t_naive, 3), slices=n,
                nifti_isal_s=round(t_nii, 3), nifti_nibabel_s=round(t_nib, 3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="paper-scale stand-in at 1.5 mm instead of 0.75 mm")
    args = ap.parse_args(argv)
    print("generation time per case (best of 2 at the synthetic grid; 1 run at paper scale)")
    cases = bench_cases(args.quick)
    pair = bench_pair()
    writers = bench_writers()
    out = dict(when=_dt.datetime.now().isoformat(timespec="seconds"), quick=args.quick, cases=cases, pair=pair,
               writers=writers)
    path = paths.runs_root() / "bench" / "bench_phantom.json"
    write_text(path, json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
