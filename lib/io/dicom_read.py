"""DICOM CT series: discovery, geometry validation and conversion to NIfTI.

The converter is pydicom-based (chosen over SimpleITK's ImageSeriesReader and dcm2niix by the
measurements in ``bench/bench_convert.py``: equal geometry, every fault reported by name, and
no slower on CT series). Geometry follows the DICOM standard, not file order or convenience tags:

* slice order from ``ImagePositionPatient`` projected on the slice normal
  (``row cosine x column cosine`` of ``ImageOrientationPatient``), never from file names,
  ``InstanceNumber`` or ``SliceLocation``;
* orientation from ``ImageOrientationPatient``; in-plane spacing from ``PixelSpacing``
  (``[between rows, between columns]`` mm); the slice step from the positions themselves,
  ``(last - first) / (n - 1)``, never from ``SliceThickness`` (a reconstruction thickness
  that may differ from the spacing);
* the NIfTI affine is RAS: DICOM patient coordinates are LPS, so x and y change sign.

Voxel order of the output: array ``(i, j, k)`` = (column, row, slice in ascending position
along the normal), so pixel ``(row r, column c)`` of the k-th sorted slice is voxel
``(c, r, k)``. Values are Hounsfield units (``stored * RescaleSlope + RescaleIntercept``),
int16.

Faults that make a series unusable are reported, all of them, as :class:`SeriesFault` s with
a check name, a message, the measured value and the threshold: mixed series UIDs, missing
``PixelSpacing`` / ``ImagePositionPatient`` / ``ImageOrientationPatient``, inconsistent
orientation or matrix size, duplicate positions, missing slices (a gap in the positions),
inconsistent spacing, positions off a straight line, gantry tilt above a limit, multi-frame
files, non-CT modality.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from nibabel import orientations
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from lib.io.nifti import Volume, load_volume, save_volume, to_canonical_order

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates (LPS) -> NIfTI world (RAS): flip x and y."""

SUMMARY_KEYWORDS = (
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientPosition",
    "SeriesDescription", "StudyDate", "StudyTime", "SeriesNumber", "ImageType",
)
"""Header fields read from one file per series during discovery (kept in memory only)."""


@dataclass(frozen=True)
class SeriesFault:
    """One reason a series cannot be converted.

    Attributes:
        check: short name (``missing_slices``, ``mixed_series``, ``missing_pixel_spacing`` ...).
        message: what is wrong, in words, with positions in mm where relevant.
        measured: the measured value (count, mm, degrees) or None.
        threshold: the limit it was compared with, or None.
    """

    check: str
    message: str
    measured: float | str | None = None
    threshold: float | str | None = None

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


class SeriesError(ValueError):
    """A series that cannot be converted; carries every :class:`SeriesFault` found."""

    def __init__(self, where: str, faults: Sequence[SeriesFault]):
        self.where = where
        self.faults = list(faults)
        super().__init__(f"{where}: " + "; ".join(str(f) for f in self.faults))


@dataclass
class SeriesGeometry:
    """Validated geometry of a series.

    Attributes:
        affine: 4x4 voxel -> world (RAS, mm) of the ``(column, row, slice)`` array.
        shape: ``(columns, rows, slices)``.
        order: indices into the dataset list, in ascending position along the normal.
        slice_spacing_mm: median distance between consecutive slices along the normal.
        step_lps: mm vector from one slice position to the next (LPS).
        tilt_deg: angle between the slice step and the slice normal (gantry tilt).
        z_source: where the slice step came from: ``positions`` (two or more slices),
            else ``SpacingBetweenSlices`` / ``SliceThickness`` (single-slice series).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    order: list[int]
    slice_spacing_mm: float
    step_lps: np.ndarray
    tilt_deg: float = 0.0
    z_source: str = "positions"

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array's three axes."""
        return tuple(float(x) for x in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


@dataclass
class DicomVolume:
    """A converted series: HU array, RAS affine, geometry and the first slice's header."""

    array: np.ndarray
    affine: np.ndarray
    geometry: SeriesGeometry
    header: Dataset
    files: list[Path] = field(default_factory=list)


@dataclass
class SeriesRef:
    """A series found on disk: its folder, files and a few header fields of one file.

    ``summary`` holds :data:`SUMMARY_KEYWORDS` as strings (missing -> ``""``). It may hold
    dates; it is for selection in memory and must not be written out.
    """

    folder: Path
    files: list[Path]
    summary: dict[str, str]

    @property
    def series_uid(self) -> str:
        return self.summary.get("SeriesInstanceUID", "")


# ----------------------------------------------------------------------------- reading


def is_dicom_file(path: Path) -> bool:
    """True for a file with the ``DICM`` marker at byte 128, or a ``.dcm`` suffix."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def list_dicom_files(folder: str | Path) -> list[Path]:
    """DICOM files directly inside ``folder`` (not recursive), sorted by name; hidden and
    temporary files (``.name``) are skipped."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def read_dataset(path: str | Path, pixels: bool = True) -> Dataset:
    """Read one DICOM file (``force=True`` for files without the preamble).

    Raises:
        SeriesError: unreadable or not DICOM, naming the file.
    """
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as exc:
        raise SeriesError(str(path), [SeriesFault("unreadable", f"{type(exc).__name__}: {exc}")]) from exc


def summarize(ds: Dataset, keywords: Iterable[str] = SUMMARY_KEYWORDS) -> dict[str, str]:
    """``{keyword: str(value)}`` for the given keywords (``""`` when absent)."""
    out = {}
    for kw in keywords:
        val = ds.get(kw, "")
        if isinstance(val, pydicom.multival.MultiValue):
            val = "\\".join(str(v) for v in val)
        out[kw] = str(val) if val is not None else ""
    return out


def discover_series(root: str | Path) -> list[SeriesRef]:
    """Every folder under ``root`` holding DICOM files, one :class:`SeriesRef` per folder.

    Only the first file (by name) of each folder is read (header only), so discovery is
    cheap; whether all files of a folder belong to one series is checked at conversion
    (:func:`check_series`).

    Returns:
        Series sorted by folder path. Unreadable first files give a summary with
        ``"_error"`` set rather than an exception, so one bad folder does not stop discovery.
    """
    root = Path(root)
    refs: list[SeriesRef] = []
    if not root.exists():
        return refs
    folders = sorted({p.parent for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")})
    for folder in folders:
        files = list_dicom_files(folder)
        if not files:
            continue
        try:
            summary = summarize(read_dataset(files[0], pixels=False))
        except SeriesError as exc:
            summary = {k: "" for k in SUMMARY_KEYWORDS} | {"_error": str(exc)}
        refs.append(SeriesRef(folder, files, summary))
    return refs


# ----------------------------------------------------------------------------- geometry


def _floats(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n and np.all(np.isfinite(arr)) else None


def _series_faults(datasets: Sequence[Dataset], require_ct: bool) -> list[SeriesFault]:
    """Faults of the series as a whole: mixed series UIDs, non-CT modality, multi-frame files."""
    faults: list[SeriesFault] = []
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(uids) > 1:
        faults.append(SeriesFault("mixed_series", f"{len(uids)} different SeriesInstanceUIDs in one series folder "
                                  f"({', '.join(u or '<none>' for u in uids[:4])}{' ...' if len(uids) > 4 else ''})",
                                  len(uids), 1))
    modalities = sorted({str(ds.get("Modality", "")) for ds in datasets})
    if require_ct and modalities != ["CT"]:
        faults.append(SeriesFault("modality", f"Modality {modalities}, expected CT", "/".join(modalities), "CT"))
    frames = [int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets]
    if max(frames) > 1:
        faults.append(SeriesFault("multi_frame", f"multi-frame file with {max(frames)} frames (enhanced CT is not supported)",
                                  max(frames), 1))
    return faults


def _attribute_faults(n: int, ps: list, iop: list, ipp: list, rows: set[int], cols: set[int]) -> list[SeriesFault]:
    """Missing or invalid geometry attributes and differing matrix sizes.

    Args:
        n: number of files.
        ps, iop, ipp: per file ``PixelSpacing`` (mm), ``ImageOrientationPatient``,
            ``ImagePositionPatient`` (mm) as arrays, None where missing or invalid.
        rows, cols: the distinct ``Rows`` / ``Columns`` values.
    """
    faults: list[SeriesFault] = []
    checks = {"PixelSpacing": "missing_pixel_spacing", "ImageOrientationPatient": "missing_orientation",
              "ImagePositionPatient": "missing_position"}
    for name, vals in (("PixelSpacing", ps), ("ImageOrientationPatient", iop), ("ImagePositionPatient", ipp)):
        missing = sum(v is None for v in vals)
        if missing:
            faults.append(SeriesFault(checks[name], f"{name} missing or invalid in {missing} of {n} files", missing, 0))
    if any(v is not None and np.any(v <= 0) for v in ps):
        faults.append(SeriesFault("missing_pixel_spacing", "PixelSpacing not positive", "<=0", ">0"))
    if len(rows) > 1 or len(cols) > 1:
        faults.append(SeriesFault("inconsistent_matrix", f"matrix sizes differ between files (rows {sorted(rows)}, "
                                  f"columns {sorted(cols)})", f"{sorted(rows)}x{sorted(cols)}", "one size"))
    return faults


def _orientation_faults(ps: list[np.ndarray], iop: list[np.ndarray]) -> list[SeriesFault]:
    """Orientation or pixel spacing (mm) that differ between files; row/column cosines of the
    first file that are not two orthonormal vectors."""
    faults: list[SeriesFault] = []
    ps0, iop0 = ps[0], iop[0]
    if max(float(np.abs(v - iop0).max()) for v in iop) > 1e-4:
        dev = max(float(np.abs(v - iop0).max()) for v in iop)
        faults.append(SeriesFault("inconsistent_orientation", f"ImageOrientationPatient differs between files by up to {dev:.3g}",
                                  round(dev, 6), 1e-4))
    if max(float(np.abs(v - ps0).max() / ps0.max()) for v in ps) > 1e-4:
        faults.append(SeriesFault("inconsistent_pixel_spacing", "PixelSpacing differs between files",
                                  "/".join(sorted({f"{v[0]:g}x{v[1]:g}" for v in ps})), "one spacing"))
    row_dir, col_dir = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        faults.append(SeriesFault("invalid_orientation", f"ImageOrientationPatient {iop0.tolist()} is not two orthonormal vectors",
                                  float(row_dir @ col_dir), 1e-3))
    return faults


def _single_slice_step(ds0: Dataset, normal: np.ndarray) -> tuple[float, np.ndarray, str]:
    """Slice step of a one-slice series, from the header (no second position to measure it).

    Returns:
        ``(spacing_z, step, z_source)``: spacing in mm, step vector in mm (LPS) along the
        normal, and the tag it came from (``SpacingBetweenSlices``, ``SliceThickness`` or
        ``assumed 1 mm``).
    """
    thick = _floats([ds0.get("SpacingBetweenSlices")], 1) if ds0.get("SpacingBetweenSlices") else None
    z_source = "SpacingBetweenSlices"
    if thick is None:
        thick = _floats([ds0.get("SliceThickness")], 1) if ds0.get("SliceThickness") else None
        z_source = "SliceThickness"
    if thick is None or thick[0] <= 0:
        thick, z_source = np.array([1.0]), "assumed 1 mm"
    spacing_z = float(thick[0])
    return spacing_z, normal * spacing_z, z_source


def _spacing_faults(steps: np.ndarray, dist: np.ndarray, spacing_tolerance: float) -> tuple[float, list[SeriesFault]]:
    """Median slice spacing (mm) and the gaps (missing slices) and uneven steps around it.

    Args:
        steps: mm between consecutive sorted slices along the normal.
        dist: sorted slice positions along the normal (mm).
        spacing_tolerance: largest allowed relative deviation of a step from the median.
    """
    faults: list[SeriesFault] = []
    spacing_z = float(np.median(steps))
    gaps = np.flatnonzero(steps >= 1.5 * spacing_z)
    if gaps.size:
        missing = int(sum(round(steps[g] / spacing_z) - 1 for g in gaps))
        where_mm = ", ".join(f"{dist[g]:.2f}..{dist[g + 1]:.2f} mm" for g in gaps[:3])
        faults.append(SeriesFault("missing_slices", f"{missing} slice(s) missing: gap(s) of "
                                  f"{', '.join(f'{steps[g]:.2f}' for g in gaps[:3])} mm for a {spacing_z:.3f} mm spacing "
                                  f"at {where_mm} along the normal", missing, 0))
    rel = np.abs(steps - spacing_z) / spacing_z
    rel[gaps] = 0.0
    if rel.max() > spacing_tolerance:
        k = int(np.argmax(rel))
        faults.append(SeriesFault("inconsistent_spacing", f"slice step {steps[k]:.3f} mm differs from the median "
                                  f"{spacing_z:.3f} mm by {100 * rel[k]:.1f} %", round(float(rel.max()), 4),
                                  spacing_tolerance))
    return spacing_z, faults


def _line_faults(pos: np.ndarray, normal: np.ndarray, line_tolerance_mm: float,
                 max_tilt_deg: float) -> tuple[np.ndarray, float, list[SeriesFault]]:
    """Slice step (mm, LPS) and tilt (degrees) of sorted positions; faults for positions off a
    straight line (more than ``line_tolerance_mm``) and a tilt above ``max_tilt_deg``."""
    faults: list[SeriesFault] = []
    step = (pos[-1] - pos[0]) / (len(pos) - 1)
    # positions must lie on one straight line: otherwise no affine describes the grid
    u = (pos[-1] - pos[0]) / np.linalg.norm(pos[-1] - pos[0])
    rel_pos = pos - pos[0]
    off = float(np.linalg.norm(rel_pos - np.outer(rel_pos @ u, u), axis=1).max())
    if off > line_tolerance_mm:
        faults.append(SeriesFault("non_collinear", f"slice positions leave the straight line by up to {off:.3f} mm",
                                  round(float(off), 4), line_tolerance_mm))
    cosang = abs(float(step @ normal)) / float(np.linalg.norm(step))
    tilt = math.degrees(math.acos(min(1.0, cosang)))
    if tilt > max_tilt_deg:
        faults.append(SeriesFault("gantry_tilt", f"slices are sheared by {tilt:.2f} deg (gantry tilt); "
                                  f"not resampled here", round(tilt, 3), max_tilt_deg))
    return step, tilt, faults


def _stack_step(pos: np.ndarray, dist: np.ndarray, normal: np.ndarray, spacing_tolerance: float,
                line_tolerance_mm: float, max_tilt_deg: float) -> tuple[float, np.ndarray | None, float, list[SeriesFault]]:
    """Slice spacing (mm), step (mm, LPS) and tilt (degrees) of two or more sorted slices.

    Returns:
        ``(spacing_z, step, tilt_deg, faults)``; with duplicate positions only that fault
        (step None): spacing and gaps mean nothing then.
    """
    steps = np.diff(dist)
    dup = int((steps < 1e-3).sum())
    if dup:
        return 0.0, None, 0.0, [SeriesFault("duplicate_positions", f"{dup} slice(s) share a position with another slice "
                                            f"(repeated acquisition or mixed series?)", dup, 0)]
    spacing_z, faults = _spacing_faults(steps, dist, spacing_tolerance)
    step, tilt, line = _line_faults(pos, normal, line_tolerance_mm, max_tilt_deg)
    return spacing_z, step, tilt, faults + line


def check_series(datasets: Sequence[Dataset], where: str = "series", *, spacing_tolerance: float = 0.05,
                 max_tilt_deg: float = 0.5, line_tolerance_mm: float = 0.1,
                 require_ct: bool = True) -> tuple[SeriesGeometry | None, list[SeriesFault]]:
    """Validate the headers of a series and derive its geometry.

    Args:
        datasets: one dataset per file (pixel data not needed), any order.
        where: name for messages (a series UID or folder).
        spacing_tolerance: largest allowed relative deviation of a slice step from the median
            step; a step of 1.5 median steps or more is a gap (missing slices).
        max_tilt_deg: largest allowed angle between the slice step and the slice normal.
        line_tolerance_mm: largest allowed distance of a slice position from the straight
            line through the first and last positions.
        require_ct: fault a modality other than CT.

    Returns:
        ``(geometry, faults)``; geometry is None when any fault was found.
    """
    n = len(datasets)
    if n == 0:
        return None, [SeriesFault("empty", "no DICOM files", 0, 1)]
    ps = [_floats(ds.get("PixelSpacing"), 2) for ds in datasets]
    iop = [_floats(ds.get("ImageOrientationPatient"), 6) for ds in datasets]
    ipp = [_floats(ds.get("ImagePositionPatient"), 3) for ds in datasets]
    rows = {int(ds.get("Rows", 0) or 0) for ds in datasets}
    cols = {int(ds.get("Columns", 0) or 0) for ds in datasets}
    faults = _series_faults(datasets, require_ct) + _attribute_faults(n, ps, iop, ipp, rows, cols)
    if faults:
        return None, faults
    faults = _orientation_faults(ps, iop)
    if faults:
        return None, faults
    row_dir = iop[0][:3] / np.linalg.norm(iop[0][:3])
    col_dir = iop[0][3:] / np.linalg.norm(iop[0][3:])
    normal = np.cross(row_dir, col_dir)

    pos = np.stack(ipp)
    dist = pos @ normal
    order = [int(i) for i in np.argsort(dist, kind="stable")]
    pos, dist = pos[order], dist[order]
    nz = len(order)
    tilt, z_source = 0.0, "positions"
    if nz == 1:
        spacing_z, step, z_source = _single_slice_step(datasets[0], normal)
    else:
        spacing_z, step, tilt, faults = _stack_step(pos, dist, normal, spacing_tolerance, line_tolerance_mm,
                                                    max_tilt_deg)
    if faults:
        return None, faults
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[0][1]   # column index i moves along the row direction
    lps[:3, 1] = col_dir * ps[0][0]   # row index j moves along the column direction
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    shape = (int(next(iter(cols))), int(next(iter(rows))), nz)
    return SeriesGeometry(LPS_TO_RAS @ lps, shape, order, spacing_z, step, tilt, z_source), []


# ----------------------------------------------------------------------------- pixels


_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian


def _raw_pixels(ds: Dataset) -> np.ndarray | None:
    """Stored values of an uncompressed little-endian 16-bit greyscale slice, straight from the
    bytes (several times faster than the generic decoder); None for anything else."""
    meta = getattr(ds, "file_meta", None)
    tsuid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if (tsuid not in _UNCOMPRESSED or int(ds.get("BitsAllocated", 0) or 0) != 16
            or int(ds.get("SamplesPerPixel", 1) or 1) != 1 or "PixelData" not in ds):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    dtype = np.dtype("<i2") if int(ds.get("PixelRepresentation", 0) or 0) == 1 else np.dtype("<u2")
    buf = ds.PixelData
    if len(buf) < rows * cols * 2:
        return None
    pix = np.frombuffer(buf, dtype=dtype, count=rows * cols).reshape(rows, cols)
    bits = int(ds.get("BitsStored", 16) or 16)
    if bits < 16:  # mask unused high bits (and sign-extend signed data)
        pix = pix.astype(np.int32)
        mask = (1 << bits) - 1
        pix = pix & mask
        if dtype.kind == "i":
            pix = np.where(pix >= 1 << (bits - 1), pix - (1 << bits), pix)
    return pix


def _slice_hu(ds: Dataset, path: Path) -> np.ndarray:
    """One slice in HU, shape (rows, columns): int32 when slope 1 and integer intercept,
    else float64."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    pix = _raw_pixels(ds)
    if pix is not None:
        if slope == 1.0 and intercept == int(intercept):
            return pix.astype(np.int32) + int(intercept)
        return pix.astype(np.float64) * slope + intercept
    try:
        pix = ds.pixel_array
    except Exception as exc:  # compressed syntax without a decoder, truncated pixel data ...
        try:
            import SimpleITK as sitk  # optional heavy dependency: a decoder for compressed pixel data

            pix = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0]
        except Exception:
            raise SeriesError(str(path), [SeriesFault("pixel_data", f"cannot decode pixel data ({type(exc).__name__}: {exc})")]) from exc
    return pix.astype(np.float64) * slope + intercept


def read_series(files: Sequence[str | Path], where: str | None = None, **check_kw) -> DicomVolume:
    """Read a DICOM CT series into an HU volume with its RAS affine.

    Args:
        files: the series' files, any order.
        where: name used in error messages (default: the folder of the first file).
        **check_kw: tolerances passed to :func:`check_series`.

    Returns:
        :class:`DicomVolume` with ``array`` int16 HU of shape (columns, rows, slices).

    Raises:
        SeriesError: every fault found (geometry, mixed series, unreadable files).
    """
    paths = [Path(f) for f in files]
    where = where or (str(paths[0].parent) if paths else "series")
    if not paths:
        raise SeriesError(where, [SeriesFault("empty", "no DICOM files", 0, 1)])
    dss = [read_dataset(p, pixels=True) for p in paths]
    geo, faults = check_series(dss, where, **check_kw)
    if faults:
        raise SeriesError(where, faults)
    nx, ny, nz = geo.shape
    vol = np.empty((nx, ny, nz), dtype=np.int16)
    for k, idx in enumerate(geo.order):
        hu = _slice_hu(dss[idx], paths[idx])
        if hu.shape != (ny, nx):
            raise SeriesError(where, [SeriesFault("pixel_data", f"{paths[idx].name}: pixel array {hu.shape} "
                                                  f"differs from Rows x Columns {(ny, nx)}")])
        if hu.dtype.kind == "f":
            hu = np.rint(hu)
        vol[:, :, k] = np.clip(hu, -32768, 32767).T
    header = dss[geo.order[0]].copy()
    if "PixelData" in header:
        del header.PixelData
    return DicomVolume(vol, geo.affine, geo, header, [paths[i] for i in geo.order])


@dataclass
class ConversionResult:
    """What :func:`convert_series` wrote."""

    path: Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    seconds: float


def convert_series(files: Sequence[str | Path], out_path: str | Path, where: str | None = None,
                   **check_kw) -> ConversionResult:
    """Convert a DICOM CT series to NIfTI (int16 HU, RAS affine, atomic write, no free-text
    header fields: see :func:`lib.io.save_volume`).

    Raises:
        SeriesError: the series is unusable; nothing is written.
    """
    t0 = time.perf_counter()
    vol = read_series(files, where=where, **check_kw)
    save_volume(vol.array, vol.affine, out_path, dtype=np.int16)
    return ConversionResult(Path(out_path), vol.geometry.shape, vol.geometry.spacing, vol.affine,
                            time.perf_counter() - t0)


# ----------------------------------------------------------------------------- SimpleITK reader


def read_series_sitk(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a DICOM series with SimpleITK (GDCM sorts slices by position) in HU.

    Returns:
        (array, affine): array (x, y, z) in the file's row/column/slice order, as float32 HU;
        affine the RAS voxel -> world matrix (LPS from DICOM converted to RAS).
    """
    import SimpleITK as sitk  # optional heavy dependency: only this cross-check reader needs it

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    if not names:
        raise FileNotFoundError(f"{folder}: no DICOM series")
    reader.SetFileNames(names)
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    direction = np.array(img.GetDirection(), float).reshape(3, 3)
    lps_affine = np.eye(4)
    lps_affine[:3, :3] = direction * np.array(img.GetSpacing(), float)
    lps_affine[:3, 3] = img.GetOrigin()
    return arr.astype(np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine


def read_source_volume(sources_root: Path, image_path: str):
    """Load one source image (DICOM series folder or NIfTI) as a canonical :class:`lib.io.Volume`."""
    p = Path(sources_root) / image_path
    if p.is_dir():
        arr, aff = read_series_sitk(p)
        ornt = orientations.io_orientation(aff)
        can = np.ascontiguousarray(to_canonical_order(arr, ornt))
        ras = orientations.axcodes2ornt(("R", "A", "S"))
        can_aff = aff @ orientations.inv_ornt_aff(orientations.ornt_transform(ornt, ras), arr.shape)
        return Volume(can, can_aff, aff, ornt, None, p)
    return load_volume(p, canonical=True)
