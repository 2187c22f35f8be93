"""Integrity checks of images, masks and predictions before anything uses them (file and fault named).

The one typed check every stage calls (modelled on nnU-Net's ``verify_dataset_integrity``):

* :func:`check_image` - an image: readable, 3D, valid spacing, no NaN/inf;
* :func:`check_mask` - a label map (a truth, or a prediction checked against a reference grid):
  readable, 3D, valid spacing, finite integer values (a float map holding integers passes),
  no negative value, values within ``allowed_labels``, optionally not empty, and on the
  reference's grid (shape, and affine within ``affine_atol_mm`` mm);
* :func:`check_pair` / :func:`verify_case` - an image and its mask together (list / raise).

Each problem is a :class:`Fault` with a ``kind`` from :data:`FAULT_KINDS`; :class:`IntegrityError`
carries them. Grids are compared in the files' own voxel order and affines (``grid="file"``), or
after reorientation to RAS+ (``grid="ras"``: the same voxels written in another axis order
pass). The affine tolerance is in mm: the largest distance between the world positions that the
two affines give one voxel of the grid (over its corners).

Each file is read once; the checks on a loaded :class:`lib.io.Volume` (:func:`image_faults`,
:func:`mask_faults`) let a caller that needs the data anyway (the evaluation) check what it
read (:func:`load_checked`) without reading it again.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nibabel import orientations

from lib.io.nifti import NiftiReadError, Volume, load_ct, load_volume, open_nifti

FAULT_KINDS = ("unreadable", "not_3d", "bad_spacing", "non_finite", "not_integer", "shape", "affine",
               "unknown_label", "negative_label", "empty")
"""What can be wrong with a file: missing / truncated / not NIfTI; not 3D; zero, non-finite or
singular spacing; NaN/inf values; a non-integer label value; mask shape or affine differing from
its image's; label values outside the allowed ones; negative labels; an all-zero mask."""

GENERIC_FAULT = "error"
"""Kind of a :class:`Fault` built without one (e.g. from an exception message)."""

DEFAULT_AFFINE_ATOL_MM = 1e-3
"""Largest accepted offset (mm) between the voxel positions of a mask's and its image's affines."""

GRIDS = ("file", "ras")

_CHUNK_VOXELS = 1 << 22
"""Voxels per slab when scanning label values (bounds the temporary memory)."""


@dataclass(frozen=True)
class Fault:
    """One integrity problem: the file, what is wrong with it, and its kind (:data:`FAULT_KINDS`)."""

    path: str
    message: str
    kind: str = GENERIC_FAULT

    def __post_init__(self):
        if self.kind not in FAULT_KINDS and self.kind != GENERIC_FAULT:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class IntegrityError(ValueError):
    """Raised with one or more :class:`Fault` s; ``str()`` names each file and fault."""

    def __init__(self, faults: Iterable[Fault]):
        self.faults = list(faults)
        super().__init__("; ".join(str(f) for f in self.faults) or "integrity check failed")

    @property
    def kinds(self) -> list[str]:
        """The faults' kinds, each once, in the order they were found."""
        return list(dict.fromkeys(f.kind for f in self.faults))

    @property
    def paths(self) -> list[str]:
        """The files with a fault, each once."""
        return list(dict.fromkeys(f.path for f in self.faults))


def _read_fault(path: str | Path, exc: Exception) -> Fault:
    """The :class:`Fault` of a file that :func:`lib.io.load_volume` could not read."""
    text = str(exc)
    message = text.split(": ", 1)[1] if text.startswith(f"{path}: ") else text
    if not isinstance(exc, NiftiReadError):
        message = f"unreadable NIfTI ({type(exc).__name__}: {exc})"
    if "expected a 3D volume" in message:
        kind = "not_3d"
    elif "voxel spacing" in message:
        kind = "bad_spacing"
    else:
        kind = "unreadable"
    return Fault(str(path), message, kind)


def load_checked(path: str | Path, canonical: bool = True, kind: str = "any") -> tuple[Volume | None, list[Fault]]:
    """Read a NIfTI file and turn any failure into a :class:`Fault`.

    Checks what reading needs: the file exists and decodes (gzip intact), is 3D, has positive
    finite spacing and a non-singular affine.

    Args:
        kind: ``"any"``: values as stored (:func:`lib.io.load_volume`); ``"image"``: a CT
            (:func:`lib.io.load_ct`: int16 or float32); ``"mask"``: a label map
            (:func:`read_mask`: the smallest integer type, the value scan in ``meta``).

    Returns:
        ``(volume, [])``, or ``(None, [fault])`` (kind ``unreadable``, ``not_3d`` or ``bad_spacing``).
    """
    loaders = {"any": load_volume, "image": load_ct, "mask": read_mask}
    if kind not in loaders:
        raise ValueError(f"kind must be one of {sorted(loaders)}, got {kind!r}")
    try:
        vol = loaders[kind](path, canonical=canonical)
    except Exception as exc:  # NiftiReadError, or whatever nibabel raises on a damaged header
        return None, [_read_fault(path, exc)]
    lin = np.asarray(vol.original_affine, dtype=np.float64)[:3, :3]
    det = float(np.linalg.det(lin)) if np.isfinite(lin).all() else math.nan
    scale = float(np.prod(np.sqrt((lin ** 2).sum(axis=0))))
    if not math.isfinite(det) or abs(det) <= 1e-6 * scale:
        return None, [Fault(str(path), f"singular or non-finite affine (voxel axes {lin.tolist()})", "bad_spacing")]
    return vol, []


def image_faults(vol: Volume, path: str | Path | None = None) -> list[Fault]:
    """Faults of a loaded image: NaN/inf voxels (``non_finite``, with the count)."""
    where = str(path if path is not None else vol.path)
    arr = vol.array
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            return [Fault(where, f"{bad} NaN/inf voxels of {arr.size}", "non_finite")]
    return []


@dataclass
class LabelScan:
    """What one pass over a label map found.

    Attributes:
        counts: voxels per integer value (finite, integral voxels only; negatives included).
        non_finite: NaN/inf voxels.
        non_integer: finite voxels that are not integers.
        example: one non-integer value (NaN when there is none).
        numeric: False for a dtype that holds no numbers (nothing else is then filled in).
    """

    counts: dict[int, int] = field(default_factory=dict)
    non_finite: int = 0
    non_integer: int = 0
    example: float = math.nan
    numeric: bool = True


def _count_into(counts: dict[int, int], values: np.ndarray) -> None:
    """Add the voxel counts of integer ``values`` (1-D) to ``counts``."""
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi < 65536 and np.can_cast(values.dtype, np.intp):
        per_value = np.bincount(values, minlength=hi + 1)
        for v in np.flatnonzero(per_value).tolist():
            counts[v] = counts.get(v, 0) + int(per_value[v])
        return
    vals, ns = np.unique(values, return_counts=True)
    for v, n in zip(vals.tolist(), ns.tolist(), strict=True):
        counts[int(v)] = counts.get(int(v), 0) + int(n)


def _scan_slab(scan: LabelScan, slab: np.ndarray) -> None:
    flat = slab.reshape(-1)
    if flat.dtype == bool:
        _count_into(scan.counts, flat.view(np.uint8))
    elif np.issubdtype(flat.dtype, np.integer):
        _count_into(scan.counts, flat)
    else:
        finite = np.isfinite(flat)
        bad = int(flat.size - np.count_nonzero(finite))
        scan.non_finite += bad
        vals = flat[finite] if bad else flat
        integral = vals == np.round(vals)
        if not integral.all():
            scan.non_integer += int(vals.size - np.count_nonzero(integral))
            if math.isnan(scan.example):
                scan.example = float(vals[~integral][0])
            vals = vals[integral]
        _count_into(scan.counts, vals.astype(np.int64))


def scan_labels(arr: np.ndarray) -> LabelScan:
    """Label values of a mask in one pass (slab by slab along the last axis, bounded memory)."""
    scan = LabelScan()
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        scan.numeric = False
        return scan
    if arr.ndim == 0 or arr.size == 0:
        return scan
    per_slice = max(1, arr.size // arr.shape[-1])
    step = max(1, _CHUNK_VOXELS // per_slice)
    for k in range(0, arr.shape[-1], step):
        _scan_slab(scan, arr[..., k:k + step])
    return scan


_MASK_DTYPES = (np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int32, np.int64)


def smallest_int_dtype(lo: int, hi: int) -> np.dtype:
    """The smallest integer dtype holding ``lo..hi`` (unsigned when ``lo >= 0``)."""
    for dt in _MASK_DTYPES:
        info = np.iinfo(dt)
        if (lo >= 0 or info.min < 0) and info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise ValueError(f"label values {lo}..{hi} exceed int64")


def _integer_slab(slab: np.ndarray) -> np.ndarray:
    """A slab as integers: float voxels that are NaN/inf or not integral become 0 (the scan
    counts them)."""
    if slab.dtype == bool:
        return slab.view(np.uint8)
    if np.issubdtype(slab.dtype, np.integer):
        return slab
    ok = np.isfinite(slab)
    ok &= slab == np.round(np.where(ok, slab, 0))
    return np.where(ok, slab, 0).astype(np.int64)


def read_mask(path: str | Path, canonical: bool = True) -> Volume:
    """Read a label map slab by slab into the smallest integer type that holds its values.

    A float64 mask (as VerSe stores them) of 512 x 512 x 800 voxels thus costs its uint8 result
    (210 MB) and one slab, never the 1.7 GB float64 copy. The values are scanned on the way
    (``meta["label_scan"]``: a :class:`LabelScan` that :func:`mask_faults` reuses); voxels that
    are NaN/inf or not integral are counted there and stored as 0, so check the scan (or use
    :func:`load_mask`, which raises on them). ``meta["stored_dtype"]`` is the file's dtype.

    Raises:
        lib.io.NiftiReadError: as :func:`lib.io.load_volume`.
    """
    f = open_nifti(path)
    scan = LabelScan()
    if not np.issubdtype(f.stored_dtype, np.number):
        scan.numeric = False
        vol = f.volume(f.read(), canonical)
    else:
        out: np.ndarray | None = None
        for k0, k1, slab in f.slabs():
            _scan_slab(scan, slab)
            ints = _integer_slab(slab)
            if ints.size:
                lo, hi = int(ints.min()), int(ints.max())
                if out is None:
                    out = np.zeros(f.shape, dtype=smallest_int_dtype(min(lo, 0), hi), order="F")
                elif not (np.iinfo(out.dtype).min <= lo and hi <= np.iinfo(out.dtype).max):
                    info = np.iinfo(out.dtype)
                    out = out.astype(smallest_int_dtype(min(lo, info.min, 0), max(hi, info.max)))
                out[:, :, k0:k1] = ints
        vol = f.volume(out if out is not None else np.zeros(f.shape, np.uint8, order="F"), canonical)
    vol.meta["label_scan"] = scan
    vol.meta["stored_dtype"] = str(f.stored_dtype)
    return vol


def load_mask(path: str | Path, canonical: bool = True) -> Volume:
    """A label map in the smallest integer type that holds it (:func:`read_mask`), after checking
    that every value is a finite integer.

    Raises:
        IntegrityError: unreadable file, NaN/inf or non-integer values (kinds ``unreadable``,
            ``not_3d``, ``bad_spacing``, ``non_finite``, ``not_integer``; file and fault named).
    """
    vol, faults = load_checked(path, canonical, kind="mask")
    if vol is not None:
        scan = vol.meta["label_scan"]
        faults = [f for f in _value_faults(scan, str(path), np.dtype(vol.meta["stored_dtype"]), None, False)
                  if f.kind in ("non_finite", "not_integer")]
    if faults:
        raise IntegrityError(faults)
    return vol


def label_counts(arr: np.ndarray) -> dict[int, int]:
    """Voxels per integer label value of a mask (NaN, inf and non-integer voxels left out)."""
    return scan_labels(arr).counts


def _file_shape(vol: Volume) -> tuple[int, ...]:
    """Shape in the file's own voxel order."""
    if vol.header is not None:
        return tuple(int(n) for n in vol.header.get_data_shape()[:3])
    return tuple(int(n) for n in np.asarray(vol.to_original(vol.array)).shape)


def _grid(vol: Volume, grid: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(affine, shape)`` of a volume in the file's voxel order or in RAS+ order."""
    aff, shape = np.asarray(vol.original_affine, dtype=np.float64), _file_shape(vol)
    if grid == "file":
        return aff, shape
    ornt = orientations.io_orientation(aff)
    to_ras = orientations.ornt_transform(ornt, orientations.axcodes2ornt(("R", "A", "S")))
    ras_shape = [0, 0, 0]
    for i in range(3):
        ras_shape[int(ornt[i, 0])] = shape[i]
    return aff @ orientations.inv_ornt_aff(to_ras, shape), tuple(ras_shape)


def affine_offset_mm(a: np.ndarray, b: np.ndarray, shape: Iterable[int]) -> float:
    """Largest distance (mm) between the world positions two affines give one voxel of a grid of
    ``shape`` (attained at a corner of the grid)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0.0, max(int(n) - 1, 0)) for n in shape])])
    return float(np.sqrt(((corners @ d[:3].T) ** 2).sum(axis=1)).max())


def grid_faults(vol: Volume, reference: Volume, path: str | Path | None = None,
                reference_path: str | Path | None = None, affine_atol_mm: float = DEFAULT_AFFINE_ATOL_MM,
                grid: str = "file") -> list[Fault]:
    """Faults of a mask that does not lie on its reference's voxel grid: ``shape``, or ``affine``
    (offset over ``affine_atol_mm`` mm, the message gives it). Both files named."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    where = str(path if path is not None else vol.path)
    ref = str(reference_path if reference_path is not None else reference.path)
    order = "" if grid == "file" else " (RAS+ order)"
    a, shape = _grid(vol, grid)
    b, ref_shape = _grid(reference, grid)
    if shape != ref_shape:
        return [Fault(where, f"shape {shape} differs from reference shape {ref_shape}{order} ({ref})", "shape")]
    off = affine_offset_mm(a, b, shape)
    if not off <= affine_atol_mm:
        return [Fault(where, f"affine differs from the reference affine by up to {off:.4g} mm "
                             f"(tolerance {affine_atol_mm:g} mm){order} ({ref})", "affine")]
    return []


def _label_list(values: Iterable[int], limit: int = 20) -> str:
    vals = sorted(values)
    return str(vals) if len(vals) <= limit else f"{vals[:limit]} and {len(vals) - limit} more"


def _value_faults(scan: LabelScan, where: str, dtype: np.dtype, allowed_labels: Iterable[int] | None,
                  require_nonempty: bool) -> list[Fault]:
    if not scan.numeric:
        return [Fault(where, f"label map of dtype {dtype} is not numeric", "not_integer")]
    faults = []
    if scan.non_finite:
        faults.append(Fault(where, f"label map contains {scan.non_finite} NaN/inf voxels", "non_finite"))
    if scan.non_integer:
        faults.append(Fault(where, f"label map has {scan.non_integer} non-integer voxels (dtype {dtype}), "
                                   f"e.g. {scan.example:g}", "not_integer"))
    negative = [v for v in scan.counts if v < 0]
    if negative:
        faults.append(Fault(where, f"negative label values {_label_list(negative)}", "negative_label"))
    if allowed_labels is not None:
        allowed = {int(v) for v in allowed_labels} | {0}
        unknown = [v for v in scan.counts if v > 0 and v not in allowed]
        if unknown:
            faults.append(Fault(where, f"unexpected label values {_label_list(unknown)}", "unknown_label"))
    if require_nonempty and not faults and not any(n for v, n in scan.counts.items() if v > 0):
        faults.append(Fault(where, "mask is empty (no voxel with a label > 0)", "empty"))
    return faults


def mask_faults(vol: Volume, reference: Volume | None = None, *, allowed_labels: Iterable[int] | None = None,
                require_nonempty: bool = False, affine_atol_mm: float = DEFAULT_AFFINE_ATOL_MM,
                grid: str = "file", path: str | Path | None = None) -> list[Fault]:
    """Faults of a loaded label map (a truth, or a prediction against its reference grid).

    Args:
        vol: the mask as read.
        reference: the image (or truth) whose grid the mask must lie on; None = no grid check.
        allowed_labels: accepted label values besides 0; None = any non-negative integer.
        require_nonempty: an all-zero mask is a fault (``empty``).
        affine_atol_mm: largest accepted voxel-position offset between the affines (mm).
        grid: ``"file"`` compares the files' own voxel order and affines, ``"ras"`` both after
            reorientation to RAS+.
        path: the name used in the faults (default ``vol.path``).
    """
    where = str(path if path is not None else vol.path)
    scan = vol.meta.get("label_scan") if vol.meta else None
    dtype = np.dtype(vol.meta["stored_dtype"]) if scan is not None else vol.array.dtype
    faults = _value_faults(scan if scan is not None else scan_labels(vol.array), where, dtype, allowed_labels,
                           require_nonempty)
    if reference is not None:
        faults += grid_faults(vol, reference, where, None, affine_atol_mm, grid)
    return faults


def check_image(path: str | Path) -> list[Fault]:
    """Faults of an image file: unreadable, not 3D, bad spacing, NaN/inf voxels. Empty when usable."""
    vol, faults = load_checked(path, canonical=False, kind="image")
    return faults if vol is None else image_faults(vol, path)


def _reference_volume(reference: str | Path | Volume | None) -> tuple[Volume | None, list[Fault]]:
    if reference is None or isinstance(reference, Volume):
        return reference, []
    try:  # only its grid is compared: the header is enough
        return open_nifti(reference).header_volume(), []
    except Exception as exc:  # NiftiReadError or a damaged header
        return None, [_read_fault(reference, exc)]


def check_mask(path: str | Path, reference_image: str | Path | Volume | None = None, *,
               allowed_labels: Iterable[int] | None = None, require_nonempty: bool = False,
               affine_atol_mm: float = DEFAULT_AFFINE_ATOL_MM, grid: str = "file") -> list[Fault]:
    """Faults of a mask or prediction file (see :func:`mask_faults`); the grid is checked against
    ``reference_image`` (a path or a loaded volume) when it is given and readable (an unreadable
    reference is not this mask's fault: check it with :func:`check_image`). Empty when usable."""
    vol, faults = load_checked(path, canonical=False, kind="mask")
    if vol is None:
        return faults
    ref, ref_faults = _reference_volume(reference_image)
    return mask_faults(vol, None if ref_faults else ref, allowed_labels=allowed_labels,
                       require_nonempty=require_nonempty, affine_atol_mm=affine_atol_mm, grid=grid, path=path)


def check_pair(image_path: str | Path, mask_path: str | Path | None = None,
               allowed_labels: Iterable[int] | None = None, affine_atol_mm: float = DEFAULT_AFFINE_ATOL_MM,
               *, require_nonempty: bool = False) -> list[Fault]:
    """Check an image (and its mask) before anything uses them; each file is read once.

    The image: readable (gzip intact), 3D, positive finite spacing, no NaN/inf. The mask: the
    same, integer values (a float map holding integers passes), none negative, within
    ``allowed_labels`` (0 always allowed), not empty with ``require_nonempty``, and the image's
    shape and affine (within ``affine_atol_mm`` mm) in the files' own voxel order.

    Returns:
        A list of :class:`Fault` s, empty when the pair is usable. Each names its file.
    """
    if mask_path is None:
        return check_image(image_path)
    return _read_pair(image_path, mask_path, allowed_labels, affine_atol_mm, require_nonempty, canonical=False)[2]


def _read_pair(image_path: str | Path, mask_path: str | Path, allowed_labels: Iterable[int] | None,
               affine_atol_mm: float, require_nonempty: bool, canonical: bool,
               ) -> tuple[Volume | None, Volume | None, list[Fault]]:
    """Read a CT (:func:`lib.io.load_ct`) and its mask (:func:`read_mask`), each once; their faults."""
    img, faults = load_checked(image_path, canonical=canonical, kind="image")
    if img is not None:
        faults = image_faults(img, image_path)
    msk, mask_read = load_checked(mask_path, canonical=canonical, kind="mask")
    if msk is None:
        return img, None, faults + mask_read
    return img, msk, faults + mask_faults(msk, img, allowed_labels=allowed_labels, require_nonempty=require_nonempty,
                                          affine_atol_mm=affine_atol_mm, path=mask_path)


def load_pair(image_path: str | Path, mask_path: str | Path, allowed_labels: Iterable[int] | None = None,
              affine_atol_mm: float = DEFAULT_AFFINE_ATOL_MM, *, require_nonempty: bool = False,
              canonical: bool = True) -> tuple[Volume, Volume]:
    """Read a CT (:func:`lib.io.load_ct`) and its mask (:func:`read_mask`), each once, and check them
    as :func:`check_pair` does.

    Returns:
        ``(image, mask)`` in RAS+ order (``canonical``).

    Raises:
        IntegrityError: every fault of the pair, each naming its file.
    """
    img, msk, faults = _read_pair(image_path, mask_path, allowed_labels, affine_atol_mm, require_nonempty, canonical)
    if faults:
        raise IntegrityError(faults)
    return img, msk


def verify_case(image_path: str | Path, mask_path: str | Path | None = None, *,
                allowed_labels: Iterable[int] | None = None, require_nonempty: bool = False,
                affine_atol_mm: float = DEFAULT_AFFINE_ATOL_MM) -> None:
    """:func:`check_pair`, raising :class:`IntegrityError` with every fault when there is one."""
    faults = check_pair(image_path, mask_path, allowed_labels, affine_atol_mm, require_nonempty=require_nonempty)
    if faults:
        raise IntegrityError(faults)


def require_pair(image_path: str | Path, mask_path: str | Path | None = None,
                 allowed_labels: Iterable[int] | None = None, affine_atol_mm: float = DEFAULT_AFFINE_ATOL_MM,
                 ) -> None:
    """Like :func:`check_pair` but raise :class:`IntegrityError` on any fault (:func:`verify_case`)."""
    verify_case(image_path, mask_path, allowed_labels=allowed_labels, affine_atol_mm=affine_atol_mm)
